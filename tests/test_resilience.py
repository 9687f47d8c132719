"""Resilience against a real simulator, real Redis and real worker processes: quota parking with
one probe per cooldown, resuming a batch whose producer died, and the chaos run (faults, slow
answers, SIGKILLed workers, a Redis restart)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.embedded import EmbeddedRedis
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def _jobs(n: int, prefix: str = "j") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"item {i}"}],
                      "max_tokens": 20}} for i in range(n)]


@pytest.fixture
def quota_sim() -> Iterator[SimHandle]:
    with start_sim(["--rpm", "100000", "--tpm", "10000000", "--latency-ms", "20", "--quota-usd", "0.00005"]) as s:
        yield s


def test_insufficient_quota_parks_the_pair_with_one_probe_per_cooldown(
    redis_url: str, quota_sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = base_env(redis_url, quota_sim.url, tmp_path, RATEQUEUE_PARK_COOLDOWN="2", RATEQUEUE_CHUNK_SIZE="10")
    start_worker(env)
    client = Client(load_settings(env))
    report = client.submit_batch(_jobs(60))
    wait_until(lambda: bool(client.parked()), 20, "the pair to be parked")
    [(pair, why)] = client.parked().items()
    assert pair.endswith(":gpt-4o-mini") and why["reason"] == "insufficient_quota"
    time.sleep(1.0)  # calls already in flight when the quota ran out come back meanwhile
    before = quota_sim.stats()["r429"]["insufficient_quota"]
    time.sleep(6.0)
    probes = quota_sim.stats()["r429"]["insufficient_quota"] - before
    assert 1 <= probes <= 4  # at most one probe per 2 s cooldown, across every worker
    batch = client.status(report.batch_id)
    assert batch["status"] == "in_progress" and batch["request_counts"]["failed"] == 0  # queued, not failed
    overview = client.overview()
    assert pair in overview["parked"] and overview["deferred_jobs"] > 0

    quota_sim.configure(quota_usd=1000.0)  # the account is topped up: the next probe succeeds
    done = client.wait(report.batch_id, timeout=30, poll=0.2)
    assert done["request_counts"] == {"total": 60, "completed": 60, "failed": 0}
    assert client.parked() == {}


def test_unpark_restarts_a_parked_pair(redis_url: str) -> None:
    client = Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url}), publish=lambda *_: None)
    client.redis.hset("rq:parked", "acct1:gpt-4o", b'{"reason": "invalid_api_key", "message": "", "since": 0, '
                      b'"cooldown": 60}')
    client.redis.set("rq:probe:{acct1:gpt-4o}", "parked", px=60_000)
    assert client.unpark("gpt-4o-2024-08-06") == ["acct1:gpt-4o"]
    assert client.parked() == {} and not client.redis.exists("rq:probe:{acct1:gpt-4o}")


def test_a_batch_whose_producer_died_before_enqueueing_is_resumed(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim(["--rpm", "100000", "--tpm", "10000000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path)
        start_worker(env)
        died = Client(load_settings(env), publish=lambda *_: None)  # stores jobs, never enqueues them
        report = died.submit_batch(_jobs(30))
        time.sleep(1.5)
        assert died.status(report.batch_id)["request_counts"]["completed"] == 0
        client = Client(load_settings(env))
        assert client.resume(report.batch_id) == 30
        assert client.wait(report.batch_id, timeout=30)["request_counts"]["completed"] == 30
        assert client.resume(report.batch_id) == 0  # nothing left; repeating is harmless
        assert sorted(sim.stats()["calls_by_client_id"].values()) == [1] * 30


def _tolerant(fn: Callable[[], Any]) -> Any:
    """Call ``fn``, riding out the seconds in which Redis is being restarted."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_chaos_faults_kills_and_a_redis_restart_lose_nothing_and_repeat_nothing(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    jobs, max_attempts = 300, 4
    server = EmbeddedRedis(tmp_path / "redis").start()
    args = ["--rpm", "1500", "--tpm", "10000000", "--latency-ms", "150", "--fail-rate", "0.08",
            "--slow-rate", "0.05", "--slow-ms", "1500", "--seed", "11"]
    try:
        with start_sim(args) as sim:
            env = base_env(server.url, sim.url, tmp_path, RATEQUEUE_VISIBILITY_TIMEOUT="6", RATEQUEUE_READ_TIMEOUT="4",
                           RATEQUEUE_DEFER_AFTER="2", RATEQUEUE_MAX_ATTEMPTS=str(max_attempts),
                           RATEQUEUE_CHUNK_SIZE="10", RATEQUEUE_WORKER_SLOTS="4")
            first, second = start_worker(env), start_worker(env)
            client = Client(load_settings(env))
            report = client.submit_batch(_jobs(jobs, "chaos"))
            time.sleep(3.0)
            first.send_signal(signal.SIGKILL)
            start_worker(env)
            time.sleep(3.0)
            server.stop()  # Redis restarts mid-batch; its append-only file keeps everything
            time.sleep(1.0)
            server.start()
            time.sleep(3.0)
            second.send_signal(signal.SIGKILL)
            start_worker(env)
            # Generous: the killed workers' jobs wait out their leases (60 s) and, on a loaded machine,
            # the new workers start late; 90 s was passed once with 3 test processes beside it.
            deadline = time.monotonic() + 150
            while _tolerant(lambda: client.status(report.batch_id))["status"] != "completed":
                assert time.monotonic() < deadline, _tolerant(lambda: client.status(report.batch_id))
                time.sleep(0.5)
            results = _tolerant(lambda: list(client.iter_results(report.batch_id)))
            errors = _tolerant(lambda: list(client.iter_results(report.batch_id, errors=True)))
            calls = sim.stats()["calls_by_client_id"]
    finally:
        server.stop()
    ids = Counter(line["custom_id"] for line in results + errors)
    assert sorted(ids) == sorted(f"chaos-{i}" for i in range(jobs))  # every job once: none lost
    assert max(ids.values()) == 1  # no result line twice
    assert len({line["id"] for line in results}) == len(results)
    per_job = Counter({cid.split("/", 1)[1]: n for cid, n in calls.items()})
    assert max(per_job.values()) <= max_attempts + 1  # a killed call may be repeated once, never more
    for err in errors:  # only retries exhausted (faults are 8%: rare) — never a lost or cancelled job
        assert err["error"]["code"] == "max_attempts_exceeded"
