"""The simulator's self-hosted dialect (vLLM/Ollama-like) over real HTTP: any model, no key, no rate-limit
headers, a fixed capacity with a bounded queue, latency that grows with load, /v1/models, /tokenize and the
server's own counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ratequeue.sim.config import SimConfig
from ratequeue.sim.engine import Engine
from ratequeue.sim.gate import Gate
from ratequeue.sim.keys import NO_KEY, fingerprint
from ratequeue.sim.process import SimHandle, start_sim
from ratequeue.sim.selfhosted import SelfHosted
from ratequeue.sim.stats import Stats

pytestmark = [pytest.mark.timeout(30), pytest.mark.e2e]  # the simulator runs as a subprocess

BASELINE: dict[str, Any] = {
    "api_key": None,
    "strict_models": False,
    "max_concurrency": 4,
    "queue_depth": 4,
    "overload_status": 503,
    "latency_ms": 0.0,
    "per_token_ms": 0.0,
    "load_slowdown": 1.0,
    "tokenize": True,
}
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    args = ["--dialect", "openai-compatible", "--model", "llama3.1:8b:context=8192", "--model",
            "mistralai/Mistral-7B-Instruct"]
    with start_sim(args) as handle:
        yield handle


@pytest.fixture
def client(sim: SimHandle) -> Iterator[httpx.Client]:
    sim.configure(**BASELINE)
    sim.reset()
    with httpx.Client(base_url=sim.url, timeout=10) as c:
        yield c


def chat(client: httpx.Client, model: str = "llama3.1:8b", **headers: str) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 1}
    return client.post("/v1/chat/completions", json=body, headers=headers)


async def burst(url: str, n: int, model: str = "llama3.1:8b") -> list[tuple[int, Any, float]]:
    """``n`` requests at once: (status, body, seconds) each."""
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=httpx.Limits(max_connections=n)) as c:
        async def one(i: int) -> tuple[int, Any, float]:
            started = time.monotonic()
            r = await c.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 1},
                             headers={"X-Client-Request-Id": f"job-{i}"})
            return r.status_code, r.json(), time.monotonic() - started

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_any_model_no_key_no_ratelimit_headers(client: httpx.Client, sim: SimHandle) -> None:
    for model in ("llama3.1:8b", "some/unlisted-model"):
        r = chat(client, model)
        assert r.status_code == 200 and r.json()["model"] == model
        assert not [h for h in r.headers if h.startswith("x-ratelimit") or h.startswith("retry-after")]
    listed = client.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["llama3.1:8b", "mistralai/Mistral-7B-Instruct"]
    assert listed["data"][0]["max_model_len"] == 8192 and listed["data"][0]["owned_by"] == "vllm"
    assert client.get("/v1/nowhere").json() == {"detail": "Not Found"}
    sim.configure(strict_models=True)
    r = chat(client, "gpt-4o")
    assert r.status_code == 404 and r.json()["object"] == "error" and r.json()["type"] == "NotFoundError"
    r = client.post("/v1/chat/completions", json={"model": "llama3.1:8b", "messages": MESSAGES, "max_tokens": 9000})
    assert r.status_code == 400 and "maximum context length is 8192" in r.json()["message"]


def test_optional_key_and_key_record(client: httpx.Client, sim: SimHandle) -> None:
    assert chat(client, **{"X-Client-Request-Id": "anon"}).status_code == 200
    sim.configure(api_key="local-secret-key-123")
    r = chat(client)
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    ok = chat(client, Authorization="Bearer local-secret-key-123", **{"X-Client-Request-Id": "keyed"})
    assert ok.status_code == 200
    stats = sim.stats()
    assert stats["keys_by_client_id"] == {"anon": {NO_KEY: 1}, "keyed": {fingerprint("local-secret-key-123"): 1}}
    assert stats["keys_by_model"]["llama3.1:8b"] == {NO_KEY: 2, fingerprint("local-secret-key-123"): 1}


def test_capacity_queue_and_overload(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(latency_ms=300)  # long enough that all 12 arrive while the first 4 are served
    results = asyncio.run(burst(sim.url, 12))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 8 + [503] * 4  # 4 served at once, 4 waiting, 4 refused
    refused = next(body for status, body, _ in results if status == 503)
    assert refused == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    queued = sorted(seconds for status, _, seconds in results if status == 200)[4:]
    assert min(queued) >= 0.6  # waited for a place, then served
    server = sim.stats()["server"]
    assert server == {"max_concurrent": 4, "max_queued": 4, "overloaded": 4, "served": 8}
    assert sim.stats()["by_status"] == {"200": 8, "503": 4}
    sim.configure(overload_status=429, queue_depth=0)
    results = asyncio.run(burst(sim.url, 6))
    assert sorted(status for status, _, _ in results) == [200] * 4 + [429] * 2


def test_latency_grows_with_load(client: httpx.Client, sim: SimHandle) -> None:
    sim.configure(per_token_ms=200)  # one output token per request (max_tokens 1)
    results = asyncio.run(burst(sim.url, 4))
    # The last admitted is served with 4 in service: 200 ms x (1 + 1 x 4 / 4) = 400 ms.
    assert max(seconds for _, _, seconds in results) >= 0.4


def test_latency_formula() -> None:
    """The delay of an answer, exactly: base + per-token time x (1 + slowdown x in service / capacity)."""
    config = SimConfig().updated({"dialect": "openai-compatible", "latency_ms": 50, "per_token_ms": 10,
                                  "max_concurrency": 8, "load_slowdown": 2.0})
    server = SelfHosted(Engine(config))
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 1}
    assert server.handle("chat", body, None, 1).delay == pytest.approx(0.050 + 0.010 * (1 + 2 * 1 / 8))
    assert server.handle("chat", body, None, 8).delay == pytest.approx(0.050 + 0.010 * 3)


def test_tokenize_matches_usage(client: httpx.Client, sim: SimHandle) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    tokenized = client.post("/tokenize", json={"model": "llama3.1:8b", "prompt": prompt}).json()
    usage = client.post("/v1/completions", json={"model": "llama3.1:8b", "prompt": prompt, "max_tokens": 3}).json()
    assert tokenized["count"] == usage["usage"]["prompt_tokens"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == 8192
    by_chat = client.post("/tokenize", json={"model": "llama3.1:8b", "messages": MESSAGES}).json()
    assert by_chat["count"] == chat(client).json()["usage"]["prompt_tokens"]
    assert sim.stats()["tokenized"] == 2
    sim.configure(tokenize=False)
    assert client.post("/tokenize", json={"model": "llama3.1:8b", "prompt": prompt}).status_code == 404


def test_gate_passes_places_on_in_order_and_forgets_a_cancelled_waiter() -> None:
    async def scenario() -> list[str]:
        gate = Gate(lambda: 1, lambda: 2, Stats())
        order: list[str] = []
        assert await gate.enter()

        async def wait(name: str) -> None:
            await gate.enter()
            order.append(name)

        gone = asyncio.create_task(wait("gone"))
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0)
        assert not await gate.enter()  # one in service, two waiting: full
        gone.cancel()
        await asyncio.sleep(0)
        gate.leave()  # the place skips the cancelled waiter
        await second
        assert gate.in_service == 1
        gate.leave()
        assert gate.in_service == 0
        return order

    assert asyncio.run(scenario()) == ["second"]
