"""The simulator's rate limiting, judged over real HTTP against a real subprocess."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ratequeue.sim.process import SimHandle, start_sim

pytestmark = [pytest.mark.timeout(30), pytest.mark.e2e]  # the simulator runs as a subprocess

GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?(s|ms|µs|ns))$|^0s$")
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
MESSAGES = [{"role": "user", "content": "Count the tokens of this short prompt."}]
BASELINE: dict[str, Any] = {
    "models": None,
    "rpm": 10_000,
    "tpm": 10_000_000,
    "charge_rule": "sum",
    "prompt_estimate": "tiktoken",
    "retry_after": True,
    "ratelimit_headers": True,
    "quota_usd": None,
    "api_key": None,
    "fail_rate": 0.0,
    "slow_rate": 0.0,
    "latency_ms": 0.0,
    "per_token_ms": 0.0,
    "burst_seconds": 60.0,
    "seed": 0,
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim([]) as handle:
        yield handle


@pytest.fixture
def client(sim: SimHandle) -> Iterator[httpx.Client]:
    sim.configure(**BASELINE)
    sim.reset()
    with httpx.Client(base_url=sim.url, timeout=10) as c:
        yield c


def chat(client: httpx.Client, model: str = "gpt-4o", **extra: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, **extra})


def prompt_tokens(client: httpx.Client, model: str = "gpt-4o") -> int:
    """The prompt size of MESSAGES, as the simulator counts it (read on a model with room)."""
    return int(chat(client, model + "-probe", max_tokens=1).json()["usage"]["prompt_tokens"])


def test_headers_on_success_and_on_429(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 2, "tpm": 30_000}})
    responses = [chat(client, max_tokens=10) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    for r in responses:
        for name in RATE_HEADERS:
            assert name in r.headers, name
        assert int(r.headers["x-ratelimit-remaining-tokens"]) >= 0
        assert GO_DURATION.match(r.headers["x-ratelimit-reset-requests"])
        assert GO_DURATION.match(r.headers["x-ratelimit-reset-tokens"])
        assert re.fullmatch(r"req_[0-9a-f]{32}", r.headers["x-request-id"])
    assert responses[0].headers["x-ratelimit-limit-requests"] == "2"
    assert responses[0].headers["x-ratelimit-limit-tokens"] == "30000"
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["1", "0", "0"]
    # A full minute of 2 RPM refills one request in 30 s: the first reset is at most 30 s.
    assert responses[0].headers["x-ratelimit-reset-requests"] in ("30s", "29.999s", "29.998s")
    assert len({r.headers["x-request-id"] for r in responses}) == 3


def test_requests_429_wording_and_retry_after(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 2}})
    chat(client), chat(client)
    r = chat(client)
    assert r.status_code == 429
    err = r.json()["error"]
    match = re.fullmatch(
        r"Rate limit reached for gpt-4o in organization org-sim on requests per min \(RPM\): Limit 2, "
        r"Used 2, Requested 1\. Please try again in (\S+)\. Visit https://platform\.openai\.com/account/"
        r"rate-limits to learn more\.",
        err["message"],
    )
    assert match, err["message"]
    assert (err["type"], err["param"], err["code"]) == ("requests", None, "rate_limit_exceeded")
    wait_ms = int(r.headers["retry-after-ms"])
    assert 29_000 < wait_ms <= 30_000  # one request refills in 60 / 2 s
    assert r.headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    assert match.group(1) == f"{wait_ms / 1000:g}s"


def test_tokens_429_wording_matches_bucket_math(client: httpx.Client, sim: SimHandle) -> None:
    prompt = prompt_tokens(client)
    sim.configure(models={"gpt-4o": {"tpm": 6_000}})  # refills 100 tokens/s
    first = chat(client, max_tokens=5_000)
    assert first.status_code == 200
    r = chat(client, max_tokens=2_000)
    assert r.status_code == 429
    err = r.json()["error"]
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    requested = prompt + 2_000
    match = re.fullmatch(
        rf"Rate limit reached for gpt-4o in organization org-sim on tokens per min \(TPM\): Limit 6000, "
        rf"Used {6_000 - remaining}, Requested {requested}\. Please try again in (\d+(?:\.\d+)?)s\. "
        r"Visit https://platform\.openai\.com/account/rate-limits to learn more\.",
        err["message"],
    )
    assert match, err["message"]
    assert (err["type"], err["code"]) == ("tokens", "rate_limit_exceeded")
    wait = float(match.group(1))
    # The bucket holds between `remaining` and `remaining + 1` tokens, refilling at 100/s.
    assert (requested - remaining - 1) / 100 <= wait <= (requested - remaining) / 100 + 0.001
    assert int(r.headers["retry-after-ms"]) == round(wait * 1000)


def test_refused_tokens_still_debit_a_request(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 10, "tpm": 1_000}})
    assert chat(client, max_tokens=900).status_code == 200
    r = chat(client, max_tokens=900)
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert r.headers["x-ratelimit-remaining-requests"] == "8"
    stats = sim.stats()
    assert stats["r429"]["tokens"] == 1 and stats["accepted_requests"] == 1


def test_waiting_retry_after_ms_is_enough(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 1_000, "tpm": 12_000}})  # 200 tokens/s
    assert chat(client, max_tokens=11_800).status_code == 200  # leaves < 200 tokens
    r = chat(client, max_tokens=300)
    assert r.status_code == 429
    wait = int(r.headers["retry-after-ms"]) / 1000
    assert 0.3 < wait < 1.0
    time.sleep(wait)
    assert chat(client, max_tokens=300).status_code == 200


def test_retry_after_can_be_switched_off(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 1}}, retry_after=False)
    chat(client)
    r = chat(client)
    assert r.status_code == 429
    assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert "x-ratelimit-remaining-requests" in r.headers


def test_cli_flags_drop_headers() -> None:
    with start_sim(["--model", "gpt-4o:rpm=1", "--no-retry-after", "--no-ratelimit-headers"]) as sim:
        with httpx.Client(base_url=sim.url, timeout=10) as c:
            assert chat(c).status_code == 200
            r = chat(c)
        assert r.status_code == 429
        assert not [h for h in r.headers if h.startswith(("x-ratelimit", "retry-after"))]
        assert r.headers["x-request-id"].startswith("req_")


def test_request_too_large_is_permanent(client: httpx.Client, sim: SimHandle) -> None:
    prompt = prompt_tokens(client)
    sim.configure(models={"gpt-4o": {"tpm": 30_000}})
    r = chat(client, max_tokens=30_000)
    assert r.status_code == 429
    assert r.json() == {
        "error": {
            "message": "Request too large for gpt-4o in organization org-sim on tokens per min (TPM): "
            f"Limit 30000, Requested {prompt + 30_000}. The input or output tokens must be reduced in "
            "order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert r.headers["x-ratelimit-remaining-tokens"] == "30000"  # nothing was charged
    assert sim.stats()["r429"]["too_large"] == 1


def test_charge_rule_sum_vs_max_seen_in_remaining_tokens(client: httpx.Client, sim: SimHandle) -> None:
    prompt = prompt_tokens(client)
    sim.configure(models={"gpt-4o": {"tpm": 100_000}})

    def drop() -> int:
        sim.reset()  # a full bucket: no refill can blur the drop
        r = chat(client, max_tokens=1_000, n=2)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        return 100_000 - int(r.headers["x-ratelimit-remaining-tokens"])

    assert drop() == prompt + 2_000
    sim.configure(charge_rule="max")
    assert drop() == 2_000
    sim.configure(models={"gpt-4o": {"max_output": 10}})
    sim.reset()
    r = chat(client)  # no max sent: the model's default max output is charged
    assert 100_000 - int(r.headers["x-ratelimit-remaining-tokens"]) == max(prompt, 10)


def test_prompt_estimate_chars(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(prompt_estimate="chars")
    content = "y" * 396
    r = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": content}]},
    )
    assert r.json()["usage"]["prompt_tokens"] == math.ceil((len("user") + 396) / 4)


def test_burst_seconds_limits_capacity(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 600, "burst_seconds": 1}})  # capacity 10, 10/s
    statuses = [chat(client, max_tokens=1).status_code for _ in range(15)]
    assert statuses.count(200) in range(10, 13) and statuses[:10] == [200] * 10
    assert 429 in statuses


def test_context_length_exceeded(client: httpx.Client, sim: SimHandle) -> None:
    prompt = prompt_tokens(client)
    sim.configure(models={"gpt-4o": {"context": 100}})
    r = chat(client, max_tokens=200)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": f"This model's maximum context length is 100 tokens. However, you requested "
        f"{prompt + 200} tokens ({prompt} in the messages, 200 in the completion). Please reduce "
        "the length of the messages or completion.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    long = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 300}]},
    )
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert "x-ratelimit-remaining-tokens" in long.headers


def test_insufficient_quota_after_spend(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(quota_usd=0.0001)
    ok = chat(client, "gpt-4o-mini", max_tokens=50)
    assert ok.status_code == 200
    usage = ok.json()["usage"]
    spend = sim.stats()["spend_usd"]
    assert spend == pytest.approx((usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.60) / 1e6)
    sim.configure(quota_usd=spend)  # now used up
    r = chat(client, "gpt-4o-mini", max_tokens=50)
    assert r.status_code == 429
    assert r.json() == {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert sim.stats()["r429"]["insufficient_quota"] == 1
