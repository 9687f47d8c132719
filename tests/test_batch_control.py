"""Batch control under real workers (issue 10): cancel and pause stop new upstream calls within
about a second on every worker, resume of a parked pair probes at once, a request the server can
never accept fails at once without delaying the others.

"No call started later than ~1 s after X": the simulator counts each call by its client request
id when it arrives; the counts read 1.5 s after X (a generous bound on a loaded box) must equal the
counts read once everything has settled.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import BatchStatus, BatchStore
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]
SETTLED = 1.5  # seconds after cancel/pause returned by which no new call may start


def _jobs(n: int, prefix: str = "j", content: str = "Summarise item {i}.",
          max_tokens: int = 20) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content.format(i=i)}],
                      "max_tokens": max_tokens}} for i in range(n)]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*RATEQUEUE, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _calls(sim: SimHandle, batch_id: str) -> dict[str, int]:
    calls: dict[str, int] = sim.stats(timeline=False)["calls_by_client_id"]
    return {cid: n for cid, n in calls.items() if cid.startswith(batch_id + "/")}


def _outcomes(client: Client, batch_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return list(client.iter_results(batch_id)), list(client.iter_results(batch_id, errors=True))


@pytest.fixture
def slow_sim() -> Iterator[SimHandle]:
    """20 requests/s and 300 ms per answer: a few hundred jobs take long enough to stop half-way.
    A 5 s window: the workers learn the server's window, and a minute's (the simulator's default)
    would let them send 1,200 at once."""
    with start_sim(["--rpm", "1200", "--tpm", "10000000", "--latency-ms", "300", "--seed", "5",
                    "--burst-seconds", "5"]) as sim:
        yield sim


def _two_workers(redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker,
                 **extra: str) -> dict[str, str]:
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1200", **extra)
    start_worker(env)
    start_worker(env)
    return env


def test_cancel_stops_new_calls_on_every_worker_within_a_second(
    redis_url: str, slow_sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = _two_workers(redis_url, slow_sim, tmp_path, start_worker)
    client = Client(load_settings(env))
    total = 300
    batch_id = client.submit_batch(_jobs(total)).batch_id
    wait_until(lambda: client.status(batch_id)["request_counts"]["completed"] >= 80, 60, "80 jobs done")

    cancelled_at = time.monotonic()
    assert _cli(env, "cancel", batch_id).stdout.strip() == "cancelling"
    returned = time.monotonic()
    time.sleep(max(0.0, returned + SETTLED - time.monotonic()))
    calls_then = _calls(slow_sim, batch_id)

    done = client.wait(batch_id, timeout=30, poll=0.1)
    assert done["status"] == "cancelled"
    # Waiting jobs fail at once, not at their next turn: the whole batch ends within seconds.
    assert time.monotonic() - cancelled_at < 8  # ~2 s here, with the 1.5 s wait above
    assert _calls(slow_sim, batch_id) == calls_then  # no call started later than SETTLED s after cancel
    assert set(calls_then.values()) == {1}  # no call was made twice
    results, errors = _outcomes(client, batch_id)
    assert len(results) + len(errors) == total  # every job ended exactly once
    assert {r["custom_id"] for r in results}.isdisjoint({e["custom_id"] for e in errors})
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert done["request_counts"] == {"total": total, "completed": len(results), "failed": len(errors)}
    assert len(results) < total - 50  # it was cancelled half-way, not after it had run
    # every paid call in flight at the cancel was stored
    assert {f"{batch_id}/{r['custom_id']}" for r in results} == set(calls_then)
    assert _cli(env, "status", batch_id).stdout.count('"status": "cancelled"') == 1


def test_pause_stops_new_calls_without_failing_anything_and_resume_finishes_the_batch(
    redis_url: str, slow_sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = _two_workers(redis_url, slow_sim, tmp_path, start_worker)
    client = Client(load_settings(env))
    total = 200
    batch_id = client.submit_batch(_jobs(total)).batch_id
    wait_until(lambda: client.status(batch_id)["request_counts"]["completed"] >= 40, 60, "40 jobs done")

    assert _cli(env, "pause", batch_id).stdout.strip() == f"paused {batch_id}"
    time.sleep(SETTLED)
    calls_then = _calls(slow_sim, batch_id)
    time.sleep(4.0)  # anything still queued, waiting or deferred had time to run, and must not
    assert _calls(slow_sim, batch_id) == calls_then
    batch = client.status(batch_id)
    assert (batch["status"], batch["paused"]) == ("in_progress", True)
    assert batch["request_counts"]["failed"] == 0  # nothing failed: the jobs wait, pending
    assert batch["request_counts"]["completed"] == len(calls_then) < total

    assert _cli(env, "resume", batch_id).stdout.strip() == f"{total - len(calls_then)} jobs re-enqueued"
    done = client.wait(batch_id, timeout=60, poll=0.2)
    assert (done["status"], done["paused"]) == ("completed", False)
    assert done["request_counts"] == {"total": total, "completed": total, "failed": 0}
    assert sorted(_calls(slow_sim, batch_id).values()) == [1] * total  # each job called exactly once


def test_a_paused_batch_can_be_cancelled(
    redis_url: str, slow_sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = _two_workers(redis_url, slow_sim, tmp_path, start_worker)
    client = Client(load_settings(env))
    batch_id = client.submit_batch(_jobs(150)).batch_id
    wait_until(lambda: client.status(batch_id)["request_counts"]["completed"] >= 20, 60, "20 jobs done")
    assert client.pause(batch_id)["paused"] is True
    time.sleep(SETTLED)
    calls_then = _calls(slow_sim, batch_id)

    assert client.cancel(batch_id)["status"] == "cancelling"
    done = client.wait(batch_id, timeout=20, poll=0.1)
    assert (done["status"], done["paused"]) == ("cancelled", False)
    assert _calls(slow_sim, batch_id) == calls_then
    results, errors = _outcomes(client, batch_id)
    assert len(results) == len(calls_then) and len(results) + len(errors) == 150
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}


def test_resume_of_a_parked_pair_runs_its_jobs_at_once_not_after_the_cooldown(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim(["--rpm", "100000", "--tpm", "10000000", "--latency-ms", "20", "--quota-usd", "0"]) as sim:
        # The default cooldown (60 s): a job that waited it out would blow the bound below.
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_CHUNK_SIZE="10")
        start_worker(env)
        client = Client(load_settings(env))
        batch_id = client.submit_batch(_jobs(40)).batch_id
        wait_until(lambda: bool(client.parked()), 30, "the pair to be parked")
        wait_until(lambda: client.overview()["deferred_jobs"] == 40, 30, "every job to wait, deferred")

        sim.configure(quota_usd=1000.0)  # the account is topped up
        resumed = time.monotonic()
        proc = _cli(env, "resume")
        assert proc.stdout.strip().startswith("restarted: ") and proc.stdout.strip().endswith(":gpt-4o-mini")
        done = client.wait(batch_id, timeout=30, poll=0.1)
        assert time.monotonic() - resumed < 10  # the probe went at once, then the rest
        assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        assert client.parked() == {}


def test_cancel_fails_deferred_jobs_at_once_not_at_their_turn(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim(["--rpm", "100000", "--tpm", "10000000", "--latency-ms", "20", "--quota-usd", "0"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_CHUNK_SIZE="10")  # parked for 60 s
        start_worker(env)
        client = Client(load_settings(env))
        batch_id = client.submit_batch(_jobs(40)).batch_id
        wait_until(lambda: client.overview()["deferred_jobs"] == 40, 30, "every job to wait, deferred")
        calls_then = _calls(sim, batch_id)

        cancelled_at = time.monotonic()
        assert client.cancel(batch_id)["status"] == "cancelling"
        done = client.wait(batch_id, timeout=30, poll=0.1)
        assert time.monotonic() - cancelled_at < 10  # not after the 60 s cooldown
        assert done["status"] == "cancelled" and done["request_counts"]["failed"] == 40
        assert _calls(sim, batch_id) == calls_then  # failed without a call
        wait_until(lambda: client.overview()["deferred_jobs"] == 0, 10, "the deferred set to empty")


@pytest.mark.e2e  # the CLI in a subprocess
def test_pause_of_an_unknown_batch_is_one_error_line(redis_url: str, tmp_path: Path) -> None:
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path)
    proc = subprocess.run([*RATEQUEUE, "pause", "batch_nope"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("redis: ") and lines[1:] == ["error: no batch 'batch_nope' in this Redis"]


def test_a_request_larger_than_the_servers_real_tpm_fails_at_once_and_delays_nobody(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # The server's real limit (6,000 TPM) is far below the configured 60,000: the worker learns it
    # from the first answers' headers, or from the server's "Request too large" refusal. The big
    # request (~9,000 tokens) is also larger than the configured bucket (60,000 x 5 s / 60 = 5,000).
    with start_sim(["--rpm", "100000", "--tpm", "6000", "--burst-seconds", "60", "--latency-ms", "20"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_CHUNK_SIZE="5", RATEQUEUE_MODEL_GPT_4O_MINI_TPM="60000")
        start_worker(env)
        client = Client(load_settings(env))
        big = _jobs(1, prefix="big", content="word " * 9000, max_tokens=50)
        for first_big in (True, False):  # before any limit is known, then after it was learned
            jobs = _jobs(20, prefix=f"small-{first_big}-")
            jobs.insert(0 if first_big else 10, {**big[0], "custom_id": f"big-{first_big}"})
            started = time.monotonic()
            batch_id = client.submit_batch(jobs).batch_id
            done = client.wait(batch_id, timeout=60, poll=0.1)
            # 20 small jobs of ~40 tokens fit the real limit at once: normal pacing is a second or two
            assert time.monotonic() - started < 10, "the small requests were held up"
            assert done["request_counts"] == {"total": 21, "completed": 20, "failed": 1}
            [err] = client.iter_results(batch_id, errors=True)
            assert err["custom_id"] == f"big-{first_big}"
            assert err["error"]["code"] == "request_too_large"
            message = err["error"]["message"]
            assert "6000" in message and "TPM" in message, message  # names the limit ...
            tokens = int(message.split("charges ")[1].split()[0]) if "charges " in message else None
            assert tokens is not None and tokens > 9000, message  # ... and the request's tokens
        assert sim.stats(timeline=False)["r429"].get("tokens", 0) == 0  # no small job was refused
        assert orjson.dumps(client.overview()["parked"]) == b"{}"


def test_pause_batch_lua_pauses_only_a_running_batch_and_cancel_unpauses(rclient: redis.Redis) -> None:
    store = BatchStore(rclient)
    batch_id = store.create(3600, {"account": "acct"})
    assert store.pause(batch_id) == (BatchStatus.VALIDATING, True)
    store.seal(batch_id)  # no jobs: completed at once
    assert store.pause(batch_id, False) == (BatchStatus.COMPLETED, False)
    assert store.pause(batch_id) == (BatchStatus.COMPLETED, False)  # an ended batch is not paused

    running = store.create(3600, {"account": "acct"})
    rclient.hset(keys.batch_meta(running), "total", 1)
    store.seal(running)
    assert store.pause(running) == (BatchStatus.IN_PROGRESS, True)
    assert store.pause(running) == (BatchStatus.IN_PROGRESS, True)  # repeating is harmless
    assert store.cancel(running) is BatchStatus.CANCELLING
    assert rclient.hget(keys.batch_meta(running), "paused") is None  # cancel unpauses: its jobs fail

    assert store.pause("batch_gone") == (None, False)
    assert not rclient.exists(keys.batch_meta("batch_gone"))  # not brought back as a bare hash
