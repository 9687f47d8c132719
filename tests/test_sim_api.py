"""The simulator's API surface over real HTTP: response shapes, errors, faults, stats, control endpoints."""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ratequeue.sim.keys import fingerprint
from ratequeue.sim.process import SimError, SimHandle, start_sim

pytestmark = [pytest.mark.timeout(30), pytest.mark.e2e]  # the simulator runs as a subprocess

BASELINE: dict[str, Any] = {
    "models": None,
    "rpm": 100_000,
    "tpm": 100_000_000,
    "strict_models": False,
    "api_key": None,
    "accept_keys": [],
    "per_key_buckets": False,
    "fail_rate": 0.0,
    "slow_rate": 0.0,
    "slow_ms": 0.0,
    "latency_ms": 0.0,
    "per_token_ms": 0.0,
    "seed": 0,
}
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim(["--seed", "0"]) as handle:
        yield handle


@pytest.fixture
def client(sim: SimHandle) -> Iterator[httpx.Client]:
    sim.configure(**BASELINE)
    sim.reset()
    with httpx.Client(base_url=sim.url, timeout=10) as c:
        yield c


def post(client: httpx.Client, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(path, json=body, headers=headers)


def test_chat_shape_and_n_choices(client: httpx.Client) -> None:
    r = post(
        client,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES, "n": 3, "max_completion_tokens": 50},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini" and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    words = [len(c["message"]["content"].split()) for c in body["choices"]]
    assert all(10 <= w <= 50 for w in words)  # 0.2..1.0 x max_completion_tokens
    assert all(c["message"]["role"] == "assistant" for c in body["choices"])
    assert {c["finish_reason"] for c in body["choices"]} <= {"stop", "length"}
    usage = body["usage"]
    assert usage["completion_tokens"] == sum(words)  # filler words are one token each
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    again = post(
        client,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES, "n": 3, "max_completion_tokens": 50},
    ).json()
    assert again["usage"] == usage  # same seed and prompt: same output


def test_other_endpoint_shapes(client: httpx.Client) -> None:
    resp = post(
        client,
        "/v1/responses",
        {"model": "gpt-4.1", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 20},
    ).json()
    assert resp["object"] == "response" and resp["id"].startswith("resp_")
    text = resp["output"][0]["content"][0]
    assert text["type"] == "output_text" and len(text["text"].split()) == resp["usage"]["output_tokens"]
    assert resp["usage"]["total_tokens"] == resp["usage"]["input_tokens"] + resp["usage"]["output_tokens"]

    comp = post(
        client,
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "n": 2, "max_tokens": 5},
    ).json()
    assert comp["object"] == "text_completion" and len(comp["choices"]) == 4
    assert comp["usage"]["prompt_tokens"] == 2

    emb = post(client, "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["one", "two three"]})
    data = emb.json()
    assert data["object"] == "list" and [d["index"] for d in data["data"]] == [0, 1]
    assert len(data["data"][0]["embedding"]) == 1536
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    small = post(
        client,
        "/v1/embeddings",
        {
            "model": "text-embedding-3-large",
            "input": [[1, 2, 3]],
            "dimensions": 8,
            "encoding_format": "base64",
        },
    ).json()
    raw = base64.b64decode(small["data"][0]["embedding"])
    vector = struct.unpack("<8f", raw)
    assert sum(x * x for x in vector) == pytest.approx(1.0, rel=1e-5)
    assert small["usage"]["prompt_tokens"] == 3


def test_bad_requests(client: httpx.Client, sim: SimHandle) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(client, "/v1/chat/completions", {"model": "gpt-4o"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    r = post(client, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"
    sim.configure(strict_models=True, models={"gpt-4o": {"rpm": 10}})
    r = post(client, "/v1/chat/completions", {"model": "gpt-5-imaginary", "messages": MESSAGES})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(client, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}).status_code == 200


def test_api_key(client: httpx.Client, sim: SimHandle) -> None:
    key = "sk-test-0123456789-secret-abcd"
    sim.configure(api_key=key)
    body = {"model": "gpt-4o", "messages": MESSAGES}
    missing = post(client, "/v1/chat/completions", body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong_key = "sk-wrong-9876543210-secret-wxyz"
    wrong = post(client, "/v1/chat/completions", body, Authorization=f"Bearer {wrong_key}")
    message = wrong.json()["error"]["message"]
    assert wrong.status_code == 401 and "sk-...wxyz" in message
    assert wrong_key not in message and "9876543210" not in message
    assert post(client, "/v1/chat/completions", body, Authorization=f"Bearer {key}").status_code == 200
    assert key not in str(sim.config())  # the control endpoint masks it too


def test_key_record_per_model_and_client_id(client: httpx.Client, sim: SimHandle) -> None:
    """Which key each call came with (a fingerprint): two accounts' keys on one server, each its own buckets."""
    first, second = "sk-account-one-0123456789", "sk-account-two-9876543210"
    sim.configure(api_key=first, accept_keys=[second], per_key_buckets=True, models={"gpt-4o": {"rpm": 10}})
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    for job, key in (("a", first), ("b", second), ("c", second)):
        r = post(client, "/v1/chat/completions", body, Authorization=f"Bearer {key}", **{"X-Client-Request-Id": job})
        assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "8"  # the second account's own bucket: 2 of 10 used
    stats = sim.stats()
    assert stats["keys_by_client_id"] == {"a": {fingerprint(first): 1}, "b": {fingerprint(second): 1},
                                          "c": {fingerprint(second): 1}}
    assert stats["keys_by_model"] == {"gpt-4o": {fingerprint(first): 1, fingerprint(second): 2}}
    assert first not in str(stats) and second not in str(sim.config())


def fire(client: httpx.Client, count: int) -> list[int]:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}
    return [post(client, "/v1/chat/completions", body).status_code for _ in range(count)]


def test_fault_injection_is_seeded_and_charged(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(fail_rate=0.3, seed=7)
    sim.reset()
    first = fire(client, 300)
    counts = Counter(first)
    assert set(counts) == {200, 500, 502, 503}
    assert 60 <= 300 - counts[200] <= 120
    stats = sim.stats()
    assert stats["faults"] == {str(code): counts[code] for code in (500, 502, 503)}
    assert stats["accepted_requests"] == 300  # faults happen after charging the buckets
    assert stats["by_model"]["gpt-4o-mini"]["requests_ok"] == counts[200]
    sim.reset()
    assert fire(client, 300) == first  # same seed, same sequence
    sim.configure(seed=8)
    assert fire(client, 300) != first
    r = post(client, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
    sim.configure(fail_rate=1.0)
    bodies = {}
    for _ in range(30):
        r = post(client, "/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
        bodies[r.status_code] = r.json()["error"]
        assert "x-ratelimit-remaining-requests" in r.headers
    assert bodies[500]["type"] == "server_error" and bodies[502]["type"] == "cf_bad_gateway"
    assert "overloaded" in bodies[503]["message"]


def test_latency_and_slow_requests(client: httpx.Client, sim: SimHandle) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}
    sim.configure(latency_ms=200)
    start = time.perf_counter()
    r = post(client, "/v1/chat/completions", body)
    assert time.perf_counter() - start >= 0.2
    completion = r.json()["usage"]["completion_tokens"]
    sim.configure(latency_ms=0, per_token_ms=30)
    start = time.perf_counter()
    post(client, "/v1/chat/completions", body)
    assert time.perf_counter() - start >= completion * 0.03
    sim.configure(per_token_ms=0, slow_rate=1.0, slow_ms=300)
    start = time.perf_counter()
    post(client, "/v1/chat/completions", body)
    assert time.perf_counter() - start >= 0.3
    assert sim.stats()["faults"]["slow"] == 1


def test_slow_requests_do_not_block_others(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(latency_ms=500)
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}

    async def burst() -> float:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as ac:
            start = time.perf_counter()
            results = await asyncio.gather(*(ac.post("/v1/chat/completions", json=body) for _ in range(10)))
            assert all(r.status_code == 200 for r in results)
            return time.perf_counter() - start

    assert asyncio.run(burst()) < 2.0  # ten 500 ms requests overlap


def test_stats_and_calls_by_client_id(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(models={"gpt-4o": {"rpm": 3}})
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    for job in ("job-a", "job-a", "job-b", "job-a"):
        post(client, "/v1/chat/completions", body, **{"X-Client-Request-Id": job})
    post(client, "/v1/chat/completions", body)
    stats = sim.stats()
    assert stats["calls_by_client_id"] == {"job-a": 3, "job-b": 1}
    assert stats["by_status"] == {"200": 3, "429": 2}
    assert stats["requests_total"] == 5
    assert stats["r429"] == {"tokens": 0, "requests": 2, "too_large": 0, "insufficient_quota": 0}
    assert stats["accepted_requests"] == 3
    timeline = stats["timeline"]
    assert timeline[0]["t"] == 0
    assert sum(s["requests_ok"] for s in timeline) == 3 and sum(s["r429"] for s in timeline) == 2
    assert sum(s["tokens_charged_ok"] for s in timeline) == stats["tokens_charged"] > 0
    assert "timeline" not in sim.stats(timeline=False)
    sim.reset()
    cleared = sim.stats()
    assert cleared["requests_total"] == 0 and cleared["calls_by_client_id"] == {}
    assert post(client, "/v1/chat/completions", body).status_code == 200  # reset refilled the bucket


def test_runtime_config(client: httpx.Client, sim: SimHandle) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    new = sim.configure(models={"gpt-4o": {"tpm": 1234, "rpm": 7}}, charge_rule="max")
    assert new["models"]["gpt-4o"] == {"rpm": 7, "tpm": 1234} and new["charge_rule"] == "max"
    r = post(client, "/v1/chat/completions", body)
    assert r.headers["x-ratelimit-limit-tokens"] == "1234" and r.headers["x-ratelimit-limit-requests"] == "7"
    sim.configure(models={"gpt-4o": "tpm=5000"})
    r = post(client, "/v1/chat/completions", body)
    assert r.headers["x-ratelimit-limit-tokens"] == "5000" and r.headers["x-ratelimit-limit-requests"] == "7"
    sim.configure(ratelimit_headers=False)
    assert "x-ratelimit-limit-tokens" not in post(client, "/v1/chat/completions", body).headers
    with pytest.raises(SimError, match="fail_rate"):
        sim.configure(fail_rate=5)
    assert sim.config()["fail_rate"] == 0.0  # a refused change applies nothing
    assert client.get("/health").json() == {"status": "ok"}


def test_start_sim_failure_and_stop() -> None:
    with pytest.raises(SimError, match="model"):
        start_sim(["--model", "gpt-4o:rpm=notanumber"], timeout=10)
    handle = start_sim(["--rpm", "5"])
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", handle.url)
    assert handle.config()["rpm"] == 5
    handle.stop()
    assert handle.process.poll() is not None and not handle.healthy()
