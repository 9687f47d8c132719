"""Shared accounts (issue 11): a 429 never fails a job, and another client's spending slows
ratequeue down instead of drawing a 429 storm. Simulator + real Redis + real worker processes."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError
from ratequeue.jobstore.keys import bucket_key
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import BucketLimits, Limiter, SyncLimiter
from tests.conftest import base_env, private_redis, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def _job(n: int) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"item {n}"}], "max_tokens": 5}


def _submit(client: Client, jobs: int) -> str:
    batch_id = client.open_batch()
    for n in range(jobs):
        client.submit_job(_job(n), custom_id=f"j-{n}", batch_id=batch_id)
    client.close_batch(batch_id)
    return batch_id


@pytest.mark.e2e
def test_rate_limit_refusals_are_not_attempts(redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    """With one attempt allowed, jobs the server refuses with 429s still complete: waiting for
    capacity is not a failed attempt (a 5xx would have failed them)."""
    # 60 RPM in 1 s slices: the server holds one request at a time, so a first burst draws 429s.
    with start_sim(["--rpm", "60", "--burst-seconds", "1", "--latency-ms", "20"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MAX_ATTEMPTS="1", RATEQUEUE_JOB_DEADLINE="120")
        start_worker(env)
        client = Client(load_settings(env), publish=None)
        batch_id = _submit(client, 8)
        batch = client.wait(batch_id, timeout=90)
        refused = sim.stats()["r429"]["requests"]
    assert refused > 0, "the server never refused: the test proves nothing"
    assert batch["request_counts"] == {"total": 8, "completed": 8, "failed": 0}


class ForeignClient:
    """Another service on the same key: sends at a fixed pace whatever the answers (in a thread)."""

    def __init__(self, url: str, per_second: float) -> None:
        self.url, self.interval = url, 1.0 / per_second
        self.answers: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "other"}], "max_tokens": 5}
        with httpx.Client(base_url=self.url, headers={"Authorization": "Bearer sk-other"}, timeout=10) as http:
            next_at = time.monotonic()
            while not self._stop.is_set():
                self.answers[http.post("/v1/chat/completions", json=body).status_code] += 1
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> ForeignClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


@pytest.mark.e2e
def test_a_foreign_client_slows_ratequeue_down(redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    """Another client spends half of the key's RPM: ratequeue gets the rest from the server's
    headers instead of sending at the full limit into 429s, and no job fails."""
    jobs = 200
    with start_sim(["--rpm", "1200", "--burst-seconds", "2", "--latency-ms", "50"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_BURST_SECONDS="2",
                       RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1200")
        client = Client(load_settings(env), publish=None)
        with ForeignClient(sim.url, per_second=10):
            time.sleep(2)  # the other client is already spending when ratequeue starts
            start_worker(env)
            batch_id = _submit(client, jobs)
            batch = client.wait(batch_id, timeout=120)
        calls = sum(n for cid, n in sim.stats()["calls_by_client_id"].items() if cid.startswith(batch_id))
    assert batch["request_counts"] == {"total": jobs, "completed": jobs, "failed": 0}
    refused = calls - jobs  # each job succeeded once; every other call was a 429
    # Measured 0 in 3 runs; 4.3-6.5% before the opening claimed 40% of the server's remaining at half
    # the limits (17.7% once: its slow start ended before the bucket took the first answer, and a
    # whole bucket went out at the full limits within the 50 ms flush). Before the shared share: 33%.
    assert refused <= 0.04 * calls, f"{refused} of ratequeue's {calls} calls were 429s"


def _share_of(url: str) -> float | None:
    """The share in the deployment's shared bucket (reconcile.lua's fs), None before any."""
    r = redis.Redis.from_url(url, decode_responses=True)
    for key in r.scan_iter(match="*bucket:*", count=100):
        if not key.endswith(("}:window", "}:slowstart")) and (share := r.hget(key, "fs")) is not None:
            return float(share)
    return None


@pytest.mark.e2e
def test_two_deployments_on_one_key_converge(tmp_path: Path, start_worker: StartWorker) -> None:
    """Two deployments that know nothing of each other (each its own Redis) on one key: both read
    the same remaining at their opening; claiming all of it, each spent the server's whole burst
    (12.5% of the calls were 429s here). Now few (none measured), and no job fails."""
    jobs = 200
    with start_sim(["--rpm", "1200", "--burst-seconds", "10", "--latency-ms", "500"]) as sim, \
            private_redis() as first, private_redis() as second:
        batches = []
        for n, url in enumerate((first, second)):
            env = base_env(url, sim.url, tmp_path / f"d{n}", RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1200")
            start_worker(env)
            client = Client(load_settings(env), publish=None)
            batches.append((client, _submit(client, jobs)))
        done = [client.wait(batch_id, timeout=240) for client, batch_id in batches]
        calls = sim.stats()["calls_by_client_id"]
    total = sum(n for cid, n in calls.items() if cid.startswith(tuple(b for _, b in batches)))
    for batch in done:
        assert batch["request_counts"] == {"total": jobs, "completed": jobs, "failed": 0}
    refused = total - 2 * jobs
    assert refused <= 0.05 * total, f"{refused} of the deployments' {total} calls were 429s"


@pytest.mark.e2e
def test_ratequeue_takes_capacity_back_when_a_foreign_client_stops(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    """Another client spends half the RPM: the shared share falls below 1; once it stops, the
    share comes back to all of the limits while ratequeue still has work."""
    jobs = 400
    with start_sim(["--rpm", "1200", "--burst-seconds", "2", "--latency-ms", "50"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_BURST_SECONDS="2",
                       RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1200")
        client = Client(load_settings(env), publish=None)
        with ForeignClient(sim.url, per_second=10):
            time.sleep(2)
            start_worker(env)
            batch_id = _submit(client, jobs)
            wait_until(lambda: (_share_of(redis_url) or 1.0) < 0.9, timeout=60, what="a share cut below 90%")
        wait_until(lambda: _share_of(redis_url) in (None, 1.0), timeout=60, what="the share back at 100%")
        counts = client.status(batch_id)["request_counts"]
        assert counts["completed"] < jobs, "all done before the share came back: the test proves nothing"
        batch = client.wait(batch_id, timeout=120)
    assert batch["request_counts"] == {"total": jobs, "completed": jobs, "failed": 0}


def test_max_share_leaves_headroom(redis_url: str) -> None:
    settings = load_settings({"RATEQUEUE_MAX_SHARE": "0.5"})
    spec = replace(load_model_table(settings).get("gpt-4o-mini"), rpm=600, tpm=60_000)
    limits = Learned(settings, aioredis.Redis.from_url(redis_url)).limits("acct:gpt-4o-mini", spec)
    assert (limits.rpm, limits.tpm, limits.share) == (600, 60_000, 0.5)  # too large is judged on 60,000
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    waits = limiter.reserve(key, BucketLimits(600, 60_000, 1.0, share=0.5), [10] * 6).waits
    assert waits[:5] == [0.0] * 5 and waits[5] == pytest.approx(0.2, abs=0.01)  # 5 a second, not 10
    with pytest.raises(ConfigError) as err:
        load_settings({"RATEQUEUE_MAX_SHARE": "1.5"})
    assert str(err.value) == "RATEQUEUE_MAX_SHARE='1.5': must be a number above 0 and at most 1 (a share of the limits)"


def test_slow_start_ends_once_the_bucket_took_the_announcing_answer(redis_url: str) -> None:
    """The first answer announces the limits: this worker's slow start ends when the shared bucket
    answered the flush of it (its level lowered to the claim, its share set), not at once: ended
    at once, the worker granted a whole configured bucket in those 50 ms at the full limits."""
    async def main() -> tuple[bool, bool, float]:
        client = aioredis.Redis.from_url(redis_url)
        settings = load_settings({})
        spec = replace(load_model_table(settings).get("gpt-4o-mini"), rpm=600, tpm=60_000)
        learned, pair = Learned(settings, client), "acct:gpt-4o-mini"
        gate = BucketGate(Limiter(client), bucket_key("acct", "gpt-4o-mini"), learned.limits(pair, spec))
        headers = RateLimitHeaders(limit_requests=600, limit_tokens=60_000, remaining_requests=99)
        learned.learn_limits(pair, spec, headers, gate)
        after_answer = gate.limits.slow_start
        learned.follow_share(pair, spec, gate, 0.5)  # what the reconciler's flush hands back
        await asyncio.sleep(0.1)  # the slow-start credit written in the background
        await client.aclose()
        return after_answer, gate.limits.slow_start, gate.limits.share

    assert asyncio.run(main()) == (True, False, 0.5)
