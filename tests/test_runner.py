"""JobRunner in the test process: the real Redis, an upstream faked with ``httpx.MockTransport``.

Each test submits a batch with the producer's client, claims its jobs as a worker's engine does,
runs them through a ``JobRunner`` whose ``UpstreamClient`` has the mock transport injected, and
then reads what Redis holds (results, errors, attempts, the parked record, the deferred set) and
which calls the fake upstream saw. No worker process, no sleeps: what runs in the background is
awaited, or polled with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import Settings, load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.producer.api import Client
from ratequeue.worker.chargerule import ChargeRuleCheck
from ratequeue.worker.limiter import Limiter
from ratequeue.worker.parking import Parking, pair_field
from ratequeue.worker.policy import Backoff
from ratequeue.worker.runner import JobRunner
from ratequeue.worker.store import JobStore
from ratequeue.worker.upstream import Timeouts, UpstreamClient
from tests.conftest import async_wait_until

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
KEY = "sk-test-0123456789abcdef"
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
         "prompt_tokens_details": {"cached_tokens": 4}}
OK = {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}], "usage": USAGE}
Reply = Callable[[httpx.Request], httpx.Response]


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=OK, headers={"x-request-id": "req_ok"})


def error(status: int, message: str, etype: str = "", code: str = "", **headers: str) -> Reply:
    body = {"error": {"message": message, "type": etype, "code": code or None}}
    return lambda request: httpx.Response(status, json=body, headers=headers)


class Upstream:
    """The fake upstream: answers each call with the next reply (the last one repeats); keeps the calls."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[float, httpx.Request]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        reply = self.replies[min(len(self.calls), len(self.replies) - 1)]
        self.calls.append((time.monotonic(), request))
        return reply(request)

    def jobs(self) -> list[str]:
        """custom_id of each call, in order (from the x-client-request-id header)."""
        return [r.headers["x-client-request-id"].split("/", 1)[1] for _, r in self.calls]


def job(cid: str, content: str = "hi", max_tokens: int = 5) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": body}


@dataclasses.dataclass
class World:
    """What a test reads: the batch in Redis, the runner, the fake upstream."""

    settings: Settings
    batch_id: str
    runner: JobRunner
    upstream: Upstream
    rclient: redis.Redis
    account: str = ""

    def hget(self, key: str, field: str) -> Any:
        raw = self.rclient.hget(key, field)
        return None if raw is None else orjson.loads(raw)

    def result(self, cid: str) -> Any:
        return self.hget(keys.batch_results(self.batch_id), cid)

    def error(self, cid: str) -> Any:
        return self.hget(keys.batch_errors(self.batch_id), cid)

    def attempts(self, cid: str) -> int:
        return int(self.rclient.hget(keys.batch_attempts(self.batch_id), cid) or 0)

    def deferred(self, cid: str) -> float | None:
        """Seconds from now until the deferred job is due, or None if it is not deferred."""
        score = self.rclient.zscore(keys.deferred_jobs(), f"{self.batch_id}{DEFERRED_SEP}{cid}")
        return None if score is None else score / 1000.0 - time.time()

    async def run(self, *cids: str, started: float | None = None, runner: JobRunner | None = None) -> list[bool]:
        """Claim the jobs and run them all at once, as a worker's engine runs a chunk."""
        runner = runner or self.runner
        state = await runner.store.batch_state(self.batch_id)
        assert state is not None
        self.account = state.account
        claimed = await runner.store.claim_pending(self.batch_id, list(cids), f"test-{time.monotonic()}", 60.0)
        assert [j.custom_id for j, _ in claimed] == list(cids)
        return list(await asyncio.gather(*(runner.run(state, j, s if started is None else started)
                                           for j, s in claimed)))


@pytest.fixture
def world(redis_url: str, tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[World]]:
    @contextlib.asynccontextmanager
    async def make(jobs: list[dict[str, Any]], *replies: Reply, worker_env: dict[str, str] | None = None,
                   **env: str) -> AsyncIterator[World]:
        """``env`` configures the producer and the worker; ``worker_env`` the worker only."""
        common = {
            "RATEQUEUE_REDIS_URL": redis_url, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "https://upstream.test",
            "RATEQUEUE_DATA_DIR": str(tmp_path / "data"), "RATEQUEUE_MAX_ATTEMPTS": "3",
            "RATEQUEUE_DEFER_AFTER": "2", **env,
        }
        batch_id = Client(load_settings(common)).submit_batch(jobs).batch_id
        settings = load_settings({**common, **(worker_env or {})})
        upstream = Upstream(*replies)
        aredis = aioredis.Redis.from_url(redis_url)
        store = JobStore(aredis)
        client = UpstreamClient(settings.base_url, KEY, transport=httpx.MockTransport(upstream),
                                timeouts=Timeouts(read=5.0), max_response_bytes=settings.max_response_bytes)
        runner = JobRunner(settings, load_model_table(settings), Limiter(aredis), store, client, Parking(aredis))
        runner.settler.backoff = Backoff(base=0.01, cap=0.05)  # the jitter's shape is test_feedback's business
        rclient = redis.Redis.from_url(redis_url)
        try:
            yield World(settings, batch_id, runner, upstream, rclient)
        finally:
            await runner.reconciler.flush()
            await client.aclose()
            await aredis.aclose()
            rclient.close()

    return make


def test_a_success_is_stored_with_its_usage_and_cost(world: Any) -> None:
    async def scenario() -> None:
        async with world([job("a")], ok) as w:
            assert await w.run("a") == [True]
            line = w.result("a")
            assert line["response"] == {"status_code": 200, "request_id": "req_ok", "body": OK}
            meta = w.rclient.hgetall(keys.batch_meta(w.batch_id))
            assert (int(meta[b"prompt_tokens"]), int(meta[b"completion_tokens"]), int(meta[b"cached_tokens"])) == (
                9, 3, 4)
            spec = w.runner.table.get(MODEL)
            assert float(meta[b"cost_usd"]) == pytest.approx(spec.cost_usd(9, 4, 3))
            (_, request), = w.upstream.calls
            assert request.headers["authorization"] == f"Bearer {KEY}"
            assert orjson.loads(request.content)["max_tokens"] == 5
            assert w.error("a") is None and w.attempts("a") == 0

    asyncio.run(scenario())


def test_a_429_retries_after_a_not_before_every_worker_honours(world: Any) -> None:
    limited = error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded",
                    **{"retry-after-ms": "800", "x-ratelimit-limit-requests": "500",
                       "x-ratelimit-remaining-requests": "0"})

    async def scenario() -> None:
        # A deferral window of 10 s (the module's 2 s was passed on a loaded machine: b deferred).
        async with world([job("a"), job("b")], limited, ok, RATEQUEUE_DEFER_AFTER="10") as w:
            # A second worker: its own runner, gates and Redis client, on the same Redis.
            other = JobRunner(w.settings, w.runner.table, Limiter(w.runner.store.redis), JobStore(w.runner.store.redis),
                              w.runner.client, Parking(w.runner.store.redis))
            first = asyncio.ensure_future(w.run("a"))
            await async_wait_until(lambda: w.upstream.calls, 5, "the first call")
            assert await w.run("b", runner=other) == [True]
            assert await first == [True]
            (refused, _), (second, _), (third, _) = w.upstream.calls
            assert second - refused >= 0.75 and third - refused >= 0.75  # both waited out the 800 ms
            # A rate-limit refusal is waiting, not a failed attempt (issue 11): nothing is counted.
            assert w.attempts("a") == 0 and w.result("a") is not None and w.result("b") is not None
            last = w.hget(keys.batch_last_failure(w.batch_id), "a")  # kept for a deadline's history
            assert last == {"status": 429, "message": "Rate limit reached for requests"}

    asyncio.run(scenario())


@pytest.mark.parametrize(("reply", "reason"), [
    (error(429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota"), "insufficient_quota"),
    (error(401, f"Incorrect API key provided: {KEY}", "invalid_request_error", "invalid_api_key"), "invalid_api_key"),
])
def test_a_spent_quota_or_a_refused_key_parks_the_pair(world: Any, reply: Reply, reason: str) -> None:
    async def scenario() -> None:
        async with world([job("a"), job("b")], reply, RATEQUEUE_PARK_COOLDOWN="30") as w:
            assert await w.run("a") == [False]  # deferred, not failed
            parked = w.hget(keys.parked_pairs(), pair_field(w.account, MODEL))
            assert parked["reason"] == reason and parked["cooldown"] == 30.0
            assert KEY not in parked["message"]  # redacted: an upstream error may echo the key
            assert 25 < (w.deferred("a") or 0) <= 30
            assert await w.run("b") == [False]  # parked: no call, no probe before the cooldown
            assert w.upstream.jobs() == ["a"] and w.error("a") is None and w.attempts("a") == 0
            assert w.deferred("b") is not None

    asyncio.run(scenario())


def test_a_probe_that_succeeds_unparks_the_pair(world: Any) -> None:
    async def scenario() -> None:
        async with world([job("a")], ok) as w:
            state = await w.runner.store.batch_state(w.batch_id)
            assert state is not None
            await w.runner.parking.park(state.account, MODEL, "insufficient_quota", "spent", 0.05)
            await async_wait_until(lambda: not w.rclient.exists(keys.probe_lock(state.account, MODEL)), 5,
                                   "the cooldown")
            w.runner.parking = Parking(w.runner.store.redis, cache_ttl=0)  # see the park at once
            w.runner.settler.parking = w.runner.parking
            assert await w.run("a") == [True]
            assert w.rclient.hlen(keys.parked_pairs()) == 0

    asyncio.run(scenario())


def test_a_400_fails_at_once_with_the_body(world: Any) -> None:
    bad = error(400, "This model's maximum context length is 128000 tokens.", "invalid_request_error",
                "context_length_exceeded", **{"x-request-id": "req_400"})

    async def scenario() -> None:
        async with world([job("a")], bad) as w:
            assert await w.run("a") == [True]
            line = w.error("a")
            assert line["response"]["status_code"] == 400 and line["response"]["request_id"] == "req_400"
            assert line["response"]["body"]["error"]["code"] == "context_length_exceeded"
            assert len(w.upstream.calls) == 1 and w.attempts("a") == 0 and w.result("a") is None

    asyncio.run(scenario())


def test_a_5xx_is_retried_then_succeeds(world: Any) -> None:
    async def scenario() -> None:
        async with world([job("a")], error(503, "overloaded", "server_error"), error(500, "oops"), ok) as w:
            assert await w.run("a") == [True]
            assert w.upstream.jobs() == ["a", "a", "a"] and w.attempts("a") == 2
            assert w.result("a")["response"]["body"] == OK

    asyncio.run(scenario())


def test_max_attempts_gives_up_with_the_history(world: Any) -> None:
    async def scenario() -> None:
        async with world([job("a")], error(502, "bad gateway")) as w:
            assert await w.run("a") == [True]
            err = w.error("a")["error"]
            assert err["code"] == "max_attempts_exceeded"
            assert err["history"] == {"attempts": 3, "last_status": 502, "last_message": "bad gateway"}
            assert len(w.upstream.calls) == 3

    asyncio.run(scenario())


def test_an_invalid_json_200_is_retried_then_failed_with_its_first_bytes(world: Any) -> None:
    broken = lambda request: httpx.Response(200, content=b'{"id": "chatcmpl-1", "choices": [')  # noqa: E731

    async def scenario() -> None:
        async with world([job("a")], broken) as w:
            assert await w.run("a") == [True]
            err = w.error("a")["error"]
            assert err["code"] == "max_attempts_exceeded" and err["history"]["attempts"] == 3
            assert "not valid JSON" in err["message"] and '{"id": "chatcmpl-1", "choices": [' in err["message"]
            assert len(w.upstream.calls) == 3

    asyncio.run(scenario())


def test_a_timeout_is_retried(world: Any) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    async def scenario() -> None:
        async with world([job("a")], timeout, ok) as w:
            assert await w.run("a") == [True]
            assert len(w.upstream.calls) == 2 and w.attempts("a") == 1
            last = w.hget(keys.batch_last_failure(w.batch_id), "a")
            assert last == {"status": 0, "message": "timeout: ReadTimeout"}

    asyncio.run(scenario())


def test_a_request_too_large_fails_without_a_call(world: Any) -> None:
    # The worker's limit is lower than the producer's (the limits were lowered after the submit).
    async def scenario() -> None:
        async with world([job("a", max_tokens=5000)], ok, worker_env={"RATEQUEUE_MODEL_GPT_4O_MINI_TPM": "4000"}) as w:
            assert await w.run("a") == [True]
            err = w.error("a")["error"]
            assert err["code"] == "request_too_large" and err["param"] == "body"
            assert w.upstream.calls == []

    asyncio.run(scenario())


def test_a_job_past_its_deadline_gives_up_without_a_call(world: Any) -> None:
    async def scenario() -> None:
        async with world([job("a")], ok, RATEQUEUE_JOB_DEADLINE="60") as w:
            assert await w.run("a", started=time.time() - 61) == [True]
            assert w.error("a")["error"]["code"] == "deadline_exceeded" and w.upstream.calls == []

    asyncio.run(scenario())


def test_waiting_too_long_for_capacity_defers_the_job(world: Any) -> None:
    # 12 RPM with 5 s of burst: the bucket holds one request; the first goes at once, the second
    # would wait ~5 s, past defer_after.
    async def scenario() -> None:
        async with world([job("a"), job("b")], ok, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="12",
                         RATEQUEUE_DEFER_AFTER="0.3") as w:
            done = await w.run("a", "b")
            assert sorted(done) == [False, True]
            late = "ab"[done.index(False)]
            assert w.upstream.jobs() == ["ab"[done.index(True)]]
            assert 0 < (w.deferred(late) or 0) <= 6 and w.attempts(late) == 0
            assert w.rclient.hget(keys.batch_claims(w.batch_id), late) is None  # its lease is dropped

    asyncio.run(scenario())


def test_a_learned_charge_rule_prices_the_next_job(world: Any) -> None:
    # Configured "max", the server charges "sum": after two answers the runner switches rules, and
    # a job that fits the TPM limit under max but not under sum fails without a call.
    limit, level = 600_000, 300_000
    big = "word " * 60_000  # ~60k prompt tokens + 16k output: max ~60k, sum ~76k
    bucket = {"level": float(level), "at": 0.0, "charge": 0}

    def server(request: httpx.Request) -> httpx.Response:
        # The server's bucket: refilled at limit/60 per second, charged under the sum rule.
        now = time.monotonic()
        if bucket["at"]:
            bucket["level"] += limit / 60 * (now - bucket["at"])
        bucket["level"] -= bucket["charge"]
        bucket["at"] = now
        return httpx.Response(200, json=OK, headers={
            "x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": str(int(bucket["level"]))})

    async def scenario() -> None:
        jobs = [job("s1", "hello " * 1000, 1000), job("s2", "hello " * 1000, 1000), job("big", big, 16_000)]
        async with world(jobs, server, RATEQUEUE_MODEL_GPT_4O_MINI_CHARGE_RULE="max",
                         RATEQUEUE_MODEL_GPT_4O_MINI_TPM="70000", RATEQUEUE_BURST_SECONDS="60",
                         RATEQUEUE_LEARN_LIMITS="0") as w:
            # Judge after every answer, not over 2 s windows of 10 requests, and follow the first verdict.
            w.runner.learned.rules.check = ChargeRuleCheck(window=0.0, min_requests=1)
            w.runner.learned.rules.confirmations = 1
            spec = w.runner.table.get(MODEL)
            state = await w.runner.store.batch_state(w.batch_id)
            assert state is not None and spec.charge_rule == "max"
            for cid in ("s1", "s2"):  # one at a time: the server's arithmetic needs answers in order
                [(stored, started)] = await w.runner.store.claim_pending(w.batch_id, [cid], "t", 60.0)
                bucket["charge"] = stored.charge_under("sum")
                assert await w.runner.run(state, stored, started) is True
            assert w.runner.learned.rule(pair_field(state.account, MODEL), spec).combine == "sum"
            assert await w.run("big") == [True]
            err = w.error("big")["error"]
            assert err["code"] == "request_too_large" and w.upstream.jobs() == ["s1", "s2"]

    asyncio.run(scenario())


def test_under_the_sum_rule_the_servers_prompt_count_corrects_the_bucket(world: Any) -> None:
    # The server counted 9 prompt tokens (USAGE); the difference from our count goes back to the
    # shared bucket. (The check compared the ChargeRule with the string "sum": it never ran.)
    async def scenario() -> None:
        async with world([job("a", "hello " * 50)], ok, RATEQUEUE_MODEL_GPT_4O_MINI_CHARGE_RULE="sum") as w:
            deltas: list[int] = []
            add = w.runner.reconciler.add

            def recording_add(*args: Any, **kwargs: Any) -> None:
                deltas.append(kwargs["token_delta"])
                add(*args, **kwargs)

            w.runner.reconciler.add = recording_add
            assert await w.run("a") == [True]
            assert deltas and deltas[-1] > 40  # ~52 counted by us, 9 by the server

    asyncio.run(scenario())
