"""The simulator's Azure OpenAI dialect over real HTTP: deployment paths, api-version, api-key / Entra ID,
per-deployment limits over 1 s / 10 s windows and their headers, the daily quota, the content filter and the
per-request key record."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ratequeue.sim.keys import fingerprint
from ratequeue.sim.process import SimHandle, start_sim

pytestmark = [pytest.mark.timeout(30), pytest.mark.e2e]  # the simulator runs as a subprocess

KEY = "azure-key-0123456789abcdef"
OTHER_KEY = "azure-key-second-account-9876"
TOKEN = "entra-token-eyJ0eXAiOiJKV1Qi"
VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Say something."}]
BASELINE: dict[str, Any] = {
    "deployments": None,
    "tpm": 1_000_000,
    "api_key": KEY,
    "accept_keys": [],
    "per_key_buckets": False,
    "entra_token": TOKEN,
    "azure_window": 10,
    "azure_token_window": None,
    "azure_odd_headers": 0.0,
    "daily_quota_tokens": None,
    "content_filter_words": [],
    "content_filter_output_words": [],
    "context": 128_000,
}
RATE_429 = re.compile(
    r"^Requests to the (\w+) Operation under Azure OpenAI API version (\S+) have exceeded (token|call) rate "
    r"limit of your current OpenAI S0 pricing tier\. Please retry after (\d+) seconds\."
)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim(["--dialect", "azure", "--api-key", KEY]) as handle:
        yield handle


@pytest.fixture
def client(sim: SimHandle) -> Iterator[httpx.Client]:
    sim.configure(**BASELINE)
    sim.configure(deployments=["chat:model=gpt-4o-mini:tpm=20000", "emb:model=text-embedding-3-small:tpm=60000"])
    sim.reset()
    with httpx.Client(base_url=sim.url, timeout=10, headers={"api-key": KEY}) as c:
        yield c


def chat(
    client: httpx.Client, deployment: str = "chat", version: str | None = VERSION, max_tokens: int | None = 20,
    content: str = "Say something.", **headers: str,
) -> httpx.Response:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    query = f"?api-version={version}" if version else ""
    return client.post(f"/openai/deployments/{deployment}/chat/completions{query}", json=body, headers=headers)


def test_deployment_paths_and_answers(client: httpx.Client) -> None:
    r = chat(client)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "gpt-4o-mini"  # the deployment's model, not its name
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["prompt_filter_results"][0]["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}
    assert r.headers["apim-request-id"] and re.fullmatch(r"[0-9a-f-]{36}", r.headers["x-request-id"])
    assert "openai-organization" not in r.headers
    emb = client.post(f"/openai/deployments/emb/embeddings?api-version={VERSION}", json={"input": ["a", "b c"]})
    assert emb.status_code == 200 and len(emb.json()["data"]) == 2
    resp = client.post(f"/openai/responses?api-version={VERSION}", json={"model": "chat", "input": "Hi",
                                                                          "max_output_tokens": 16})
    assert resp.status_code == 200 and resp.json()["object"] == "response"


def test_api_version_deployment_and_credentials(client: httpx.Client, sim: SimHandle) -> None:
    r = chat(client, version=None)
    assert r.status_code == 404 and r.json() == {"error": {"code": "404", "message": "Resource not found"}}
    r = chat(client, deployment="gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "DeploymentNotFound"
    r = chat(client, **{"api-key": "wrong-key-000000000000"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "401"
    assert r.json()["error"]["message"].startswith("Access denied due to invalid subscription key")
    with httpx.Client(base_url=sim.url, timeout=10) as bare:
        assert chat(bare).status_code == 401
        assert chat(bare, Authorization=f"Bearer {TOKEN}").status_code == 200
        r = chat(bare, Authorization="Bearer not-the-token")
        assert r.status_code == 401 and r.json()["error"]["message"].startswith("Unauthorized. Access token")
    assert "wrong-key" not in json.dumps(sim.stats()) and KEY not in json.dumps(sim.config())


def test_rpm_derived_and_headers_per_window(client: httpx.Client, sim: SimHandle) -> None:
    first = chat(client)
    # 20,000 TPM -> 120 RPM (6 per 1,000 TPM), reported per 10 s window: 20 requests, 3,333 tokens.
    assert first.headers["x-ratelimit-limit-requests"] == "20"
    assert first.headers["x-ratelimit-limit-tokens"] == "3333"
    assert first.headers["x-ratelimit-remaining-requests"] == "19"
    assert not any(h.startswith("x-ratelimit-reset") for h in first.headers)
    second = chat(client)
    assert int(second.headers["x-ratelimit-remaining-requests"]) == 18
    sim.configure(azure_window=1, deployments={"chat": {"rpm": 600}})  # an override of the derived RPM
    assert chat(client).headers["x-ratelimit-limit-requests"] == "10"


def test_call_and_token_limits_answer_azure_429s(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(azure_window=1, deployments={"chat": {"tpm": 60_000, "rpm": 180}})  # 3 requests a second
    codes = [chat(client, max_tokens=10) for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    refused = codes[3]
    assert refused.status_code == 429
    match = RATE_429.match(refused.json()["error"]["message"])
    assert match is not None and match.groups()[:3] == ("ChatCompletions_Create", VERSION, "call")
    assert refused.json()["error"]["code"] == "429"
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000 and refused.headers["retry-after"] == match.group(4) == "1"
    sim.reset()
    tokens = chat(client, max_tokens=990)  # 1,000 tokens a second: the window holds one of these
    assert tokens.status_code == 200
    refused = chat(client, max_tokens=990)
    assert refused.status_code == 429 and RATE_429.match(refused.json()["error"]["message"]).group(3) == "token"
    assert sim.stats()["r429"]["tokens"] == 1 and sim.stats()["r429"]["requests"] == 0


def test_missing_max_tokens_charges_the_whole_context(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(deployments={"chat": {"tpm": 60_000, "context": 4000}})  # a 10 s window of 10,000
    before = int(chat(client, max_tokens=1).headers["x-ratelimit-remaining-tokens"])
    after = int(chat(client, max_tokens=None).headers["x-ratelimit-remaining-tokens"])
    assert 3900 <= before - after <= 4001  # prompt + the rest of the context, less the refill in between


def test_daily_quota_refuses_for_a_day_until_reset_or_raised(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(daily_quota_tokens=100)
    assert chat(client, max_tokens=60).status_code == 200
    assert chat(client, max_tokens=60).status_code == 200  # about 70 each: 140 charged, the 100 spent
    refused = chat(client, max_tokens=60)
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].endswith("Please retry after 86400 seconds.")
    assert refused.headers["retry-after"] == "86400" and refused.headers["retry-after-ms"] == "86400000"
    stats = sim.stats()
    assert stats["r429"]["daily_quota"] == 1 and stats["daily_tokens"]["chat"] >= 100
    sim.daily_reset()  # a new day
    assert [chat(client, max_tokens=60).status_code for _ in range(3)] == [200, 200, 429]
    sim.configure(deployments={"chat": {"daily_tokens": 10_000}})  # a raised quota, as a support ticket does
    assert chat(client, max_tokens=60).status_code == 200


def test_content_filter_on_prompt_and_output(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(content_filter_words=["forbidden"], content_filter_output_words=["spicy"])
    r = chat(client, content="Tell me something FORBIDDEN.")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "content_filter" and error["param"] == "prompt" and error["status"] == 400
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["violence"] == {"filtered": True, "severity": "high"}
    r = chat(client, content="Write something spicy.")
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert choice["content_filter_results"]["violence"]["filtered"] is True
    assert sim.stats()["filtered"] == {"prompt": 1, "output": 1}


def test_each_request_records_its_key_per_deployment_and_job(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(accept_keys=[OTHER_KEY], per_key_buckets=True)
    for job in range(4):
        key = KEY if job % 2 == 0 else OTHER_KEY
        assert chat(client, **{"api-key": key, "X-Client-Request-Id": f"job-{job}"}).status_code == 200
    assert chat(client, deployment="nope", **{"X-Client-Request-Id": "job-x"}).status_code == 404
    stats = sim.stats()
    mine, theirs = fingerprint(KEY), fingerprint(OTHER_KEY)
    assert stats["keys_by_client_id"] == {
        "job-0": {mine: 1}, "job-1": {theirs: 1}, "job-2": {mine: 1}, "job-3": {theirs: 1}, "job-x": {mine: 1},
    }
    assert stats["keys_by_model"]["chat"] == {mine: 2, theirs: 2}
    # Each account its own buckets: the second key's first call sees a full window.
    assert chat(client, **{"api-key": OTHER_KEY}).headers["x-ratelimit-remaining-requests"] == "17"
    assert KEY not in json.dumps(stats) and OTHER_KEY not in json.dumps(sim.config())


def test_odd_headers(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(azure_odd_headers=1.0)
    r = chat(client)
    assert r.status_code == 200
    assert (r.headers["x-ratelimit-remaining-requests"], r.headers["x-ratelimit-remaining-tokens"]) == ("-1", "0")
