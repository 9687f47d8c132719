"""Retention and delete against the real Redis: a batch and every key of it expire a set time
after it ends (completed, cancelled, expired), nothing of it is left in Redis afterwards, and
`delete` removes it at once. The Lua scripts are exercised directly, then end to end with a worker."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.errors import BatchNotFoundError, BatchRunningError, ConfigError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.scripts import lua_source
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from ratequeue.worker.deferred import DeferredMover
from tests.conftest import base_env, wait_until
from tests.test_cli import RATEQUEUE, _env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def _jobs(n: int, model: str = "gpt-4o-mini", prefix: str = "j") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": 10}}
            for i in range(n)]


def _offline(redis_url: str, retention: str = "600", **extra: str) -> Client:
    """A client whose chunks go nowhere: no worker runs the batch."""
    env = {"RATEQUEUE_REDIS_URL": redis_url, "RATEQUEUE_RETENTION_SECONDS": retention, **extra}
    return Client(load_settings(env), publish=lambda batch_id, ids: None)


def _batch_keys(r: redis.Redis, batch_id: str) -> dict[str, int]:
    """Every key of the batch in this database -> its PTTL (ms; -1 = no expiry)."""
    return {k.decode(): int(r.pttl(k)) for k in r.scan_iter(match=f"rq:batch:{{{batch_id}}}*", count=1000)}


def _batch_bytes(r: redis.Redis, batch_id: str) -> int:
    return sum(int(r.memory_usage(k) or 0) for k in _batch_keys(r, batch_id))


def _deferred_members(r: redis.Redis, batch_id: str) -> list[str]:
    return [text(m) for m in r.zrange(keys.deferred_jobs(), 0, -1) if text(m).startswith(f"{batch_id}\t")]


def _assert_all_expire(r: redis.Redis, batch_id: str, within_ms: int) -> None:
    ttls = _batch_keys(r, batch_id)
    assert keys.batch_meta(batch_id) in ttls and keys.batch_order(batch_id) in ttls, ttls
    assert all(0 < ttl <= within_ms for ttl in ttls.values()), ttls


# -- settings ------------------------------------------------------------------------------------


def test_retention_setting_defaults_to_seven_days_and_must_be_positive() -> None:
    assert load_settings({}).retention_seconds == 7 * 86400
    assert load_settings({"RATEQUEUE_RETENTION_SECONDS": "1.5"}).retention_seconds == 1.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="RATEQUEUE_RETENTION_SECONDS"):
            load_settings({"RATEQUEUE_RETENTION_SECONDS": bad})


# -- the Lua scripts, directly ------------------------------------------------------------------------


def _store(r: redis.Redis, batch_id: str, *outcomes: tuple[str, str]) -> list[int]:
    script = r.register_script(lua_source("store_outcome"))
    args: list[str | int] = []
    for cid, kind in outcomes:
        args += [cid, kind, orjson.dumps({"custom_id": cid}).decode(), 1, 1, 0, "0.001"]
    return [int(x) for x in script(keys=keys.outcome_keys(batch_id), args=args)]


def _fake_batch(r: redis.Redis, batch_id: str, total: int, retention: str | None = "5", sealed: int = 1) -> None:
    meta = keys.batch_meta(batch_id)
    r.hset(meta, mapping={"id": batch_id, "status": "in_progress", "total": total, "sealed": sealed})
    if retention is not None:
        r.hset(meta, "retention", retention)
    # a stored job's model and charge: each outcome counts in the per-model hash (keys.batch_models)
    r.hset(keys.batch_jobs(batch_id), mapping={f"c{i}": '{"m":"gpt-4o-mini","c":10}' for i in range(total)})
    r.rpush(keys.batch_order(batch_id), *[f"c{i}" for i in range(total)])
    r.hset(keys.batch_claims(batch_id), "c0", "owner 1")
    r.hset(keys.batch_started(batch_id), "c0", "1")
    r.hset(keys.batch_attempts(batch_id), "c0", 1)
    r.hset(keys.batch_last_failure(batch_id), "c0", "{}")
    r.rpush(keys.batch_input_errors(batch_id), "{}")


def test_store_outcome_sets_every_key_to_expire_when_the_batch_ends(rclient: redis.Redis) -> None:
    _fake_batch(rclient, "b1", total=2)
    assert _store(rclient, "b1", ("c0", "result")) == [1]
    assert all(ttl == -1 for ttl in _batch_keys(rclient, "b1").values())  # still running: kept
    before = time.time()
    assert _store(rclient, "b1", ("c1", "error")) == [1]
    ttls = _batch_keys(rclient, "b1")
    # every key but the claims hash: a stored outcome drops its job's lease, so the last went
    assert len(ttls) == 10 and keys.batch_claims("b1") not in ttls, ttls
    assert all(4000 < ttl <= 5000 for ttl in ttls.values()), ttls
    meta = {text(k): text(v) for k, v in rclient.hgetall(keys.batch_meta("b1")).items()}
    assert meta["status"] == "completed"
    assert before + 4 <= int(meta["retained_until"]) <= time.time() + 6


def test_store_outcome_after_the_end_neither_resets_nor_leaks(rclient: redis.Redis) -> None:
    _fake_batch(rclient, "b1", total=1)
    rclient.delete(keys.batch_errors("b1"))
    _store(rclient, "b1", ("c0", "result"))
    completed_at = rclient.hget(keys.batch_meta("b1"), "completed_at")
    time.sleep(1.1)
    # a late duplicate, for a job that had no outcome: the key it creates expires with the batch
    assert _store(rclient, "b1", ("c0", "result"), ("late", "error")) == [0, 1]
    ttls = _batch_keys(rclient, "b1")
    assert 0 < ttls[keys.batch_meta("b1")] < 4000  # not reset to 5 s
    # Absolute expiry times: two PTTLs read one after the other differ by the time between the reads.
    expires = [rclient.execute_command("PEXPIRETIME", k) for k in (keys.batch_errors("b1"), keys.batch_meta("b1"))]
    assert 0 < expires[0] <= expires[1]
    assert rclient.hget(keys.batch_meta("b1"), "completed_at") == completed_at


def test_store_outcome_never_recreates_a_deleted_batch(rclient: redis.Redis) -> None:
    assert _store(rclient, "gone", ("c0", "result"), ("c1", "error")) == [0, 0]
    assert rclient.dbsize() == 0


def test_a_batch_without_a_retention_field_gets_the_default(rclient: redis.Redis) -> None:
    _fake_batch(rclient, "old", total=1, retention=None)
    _store(rclient, "old", ("c0", "result"))
    ttl = rclient.pttl(keys.batch_meta("old"))
    assert 7 * 86400_000 - 5000 < ttl <= 7 * 86400_000


def test_seal_batch_ends_a_finished_batch_with_ttls_and_refuses_an_unknown_one(rclient: redis.Redis) -> None:
    seal = rclient.register_script(lua_source("seal_batch"))
    _fake_batch(rclient, "b2", total=1, sealed=0)
    _store(rclient, "b2", ("c0", "result"))
    assert all(ttl == -1 for ttl in _batch_keys(rclient, "b2").values())  # not sealed yet
    assert seal(keys=keys.batch_keys("b2")) == b"completed"
    _assert_all_expire(rclient, "b2", 5000)
    rclient.pexpire(keys.batch_meta("b2"), 3000)
    assert seal(keys=keys.batch_keys("b2")) == b"completed"  # again: no change
    assert rclient.pttl(keys.batch_meta("b2")) <= 3000
    with pytest.raises(redis.ResponseError, match="no batch"):
        seal(keys=keys.batch_keys("nope"))
    assert not rclient.exists(keys.batch_meta("nope"))


def test_marking_expired_and_counting_attempts_never_recreate_or_leak(redis_url: str, rclient: redis.Redis) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from ratequeue.worker.store import JobStore

    _fake_batch(rclient, "b3", total=1)
    rclient.delete(keys.batch_attempts("b3"), keys.batch_last_failure("b3"))
    _store(rclient, "b3", ("c0", "result"))

    async def main() -> tuple[int, int]:
        client = aioredis.Redis.from_url(redis_url)
        store = JobStore(client)
        try:
            await store.mark_expired("b3")  # completed meanwhile: stays completed
            await store.mark_expired("gone")  # deleted: not recreated
            late = await store.record_attempt("b3", "c0", 500, "boom")
            gone = await store.record_attempt("gone", "c0", 500, "boom")
            return late, gone
        finally:
            await client.aclose()

    late, gone = asyncio.run(main())
    assert rclient.hget(keys.batch_meta("b3"), "status") == b"completed"
    assert late == 1 and gone >= 10**6  # a batch that is gone counts as out of attempts
    _assert_all_expire(rclient, "b3", 5000)
    assert not _batch_keys(rclient, "gone")


# -- delete and the shared structures ------------------------------------------------------------


def test_delete_removes_every_key_at_once_and_refuses_a_running_batch(redis_url: str, rclient: redis.Redis) -> None:
    client = _offline(redis_url)
    finished = client.submit_batch([{"custom_id": "bad"}]).batch_id  # every line rejected: ends at once
    running = client.submit_batch(_jobs(5)).batch_id
    assert client.status(finished)["status"] == "completed"
    rclient.zadd(keys.deferred_jobs(), {f"{running}\tj-1": 1, f"{running}\tj-2": 2, "other\tx": 3})
    with pytest.raises(BatchRunningError, match=r"in_progress.*force"):
        client.delete(running)
    assert _batch_keys(rclient, running)
    assert client.delete(finished)["status"] == "completed"
    assert client.delete(running, force=True)["status"] == "in_progress"
    assert not _batch_keys(rclient, finished) and not _batch_keys(rclient, running)
    assert rclient.zrange(keys.deferred_jobs(), 0, -1) == [b"other\tx"]
    assert rclient.zcard(keys.batches_index()) == 0
    for gone in (finished, running, "batch_unknown"):
        with pytest.raises(BatchNotFoundError):
            client.delete(gone)
    client.close()


def test_delete_treats_a_batch_id_as_text_not_a_pattern(redis_url: str, rclient: redis.Redis) -> None:
    client = _offline(redis_url)
    batch_id = client.submit_batch([{"custom_id": "bad"}]).batch_id
    rclient.zadd(keys.deferred_jobs(), {f"{batch_id}\tj": 1})
    with pytest.raises(BatchNotFoundError):
        client.delete("batch_*")
    assert rclient.zcard(keys.deferred_jobs()) == 1 and _batch_keys(rclient, batch_id)
    client.close()


def test_status_shows_retained_until_and_the_overview_forgets_gone_batches(
    redis_url: str, rclient: redis.Redis
) -> None:
    client = _offline(redis_url, retention="1")
    batch_id = client.submit_batch([{"custom_id": "bad"}]).batch_id
    running = client.submit_batch(_jobs(2)).batch_id
    batch = client.status(batch_id)
    assert batch["status"] == "completed" and batch["expires_at"] > batch["retained_until"] >= time.time()
    assert client.status(running)["retained_until"] is None
    time.sleep(1.3)
    assert [b["id"] for b in client.overview()["recent_batches"]] == [running]
    assert rclient.zrange(keys.batches_index(), 0, -1) == [running.encode()]
    client.close()


def test_the_mover_drops_deferred_jobs_of_gone_or_ended_batches_and_prunes_the_index(
    redis_url: str, rclient: redis.Redis
) -> None:
    client = _offline(redis_url)
    ended = client.submit_batch([{"custom_id": "bad"}]).batch_id
    live = client.submit_batch(_jobs(3)).batch_id
    rclient.zadd(keys.deferred_jobs(), {f"{ended}\tbad": 1, f"{live}\tj-1": 1, "batch_gone\tj-1": 1})
    rclient.zadd(keys.batches_index(), {"batch_gone": 1})
    published: list[tuple[str, Sequence[str]]] = []
    mover = DeferredMover(rclient, lambda b, ids: published.append((b, list(ids))))
    assert mover.move_due() == 3
    assert published == [(live, ["j-1"])]
    assert rclient.zcard(keys.deferred_jobs()) == 0
    assert mover.prune_index() == 1
    assert sorted(rclient.zrange(keys.batches_index(), 0, -1)) == sorted([ended.encode(), live.encode()])
    client.close()


def test_cli_delete(tmp_path: Path, redis_url: str, rclient: redis.Redis) -> None:
    client = _offline(redis_url)
    finished = client.submit_batch([{"custom_id": "bad"}]).batch_id
    running = client.submit_batch(_jobs(2)).batch_id
    env = _env(tmp_path, RATEQUEUE_REDIS_URL=redis_url)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*RATEQUEUE, *args], env=env, capture_output=True, text=True, timeout=60)

    status = orjson.loads(cli("status", finished).stdout)
    assert status["retained_until"] == int(rclient.hget(keys.batch_meta(finished), "retained_until") or 0)
    done = cli("delete", finished)
    assert done.returncode == 0 and finished in done.stdout, done.stderr
    refused = cli("delete", running)
    assert refused.returncode == 2 and "in_progress" in refused.stderr and "--force" in refused.stderr
    assert _batch_keys(rclient, running)
    forced = cli("delete", "--force", running)
    assert forced.returncode == 0, forced.stderr
    missing = cli("delete", finished)
    assert missing.returncode == 2 and "no batch" in missing.stderr
    assert rclient.dbsize() == 0
    client.close()


# -- end to end: a real worker and the simulator ----------------------------------------------------


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    args = ["--rpm", "100000", "--tpm", "100000000", "--latency-ms", "30", "--model", "gpt-4o:rpm=30"]
    with start_sim(args) as handle:
        yield handle


def test_ended_batches_expire_and_leave_zero_bytes(
    redis_url: str, rclient: redis.Redis, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_RETENTION_SECONDS="3", RATEQUEUE_CHUNK_SIZE="10")
    short = Client(load_settings(env))
    long = Client(load_settings({**env, "RATEQUEUE_RETENTION_SECONDS": "600"}))
    # Before any worker runs: one batch cancelled, one past its completion window.
    cancelled = long.submit_batch(_jobs(20, prefix="c")).batch_id
    assert long.cancel(cancelled)["status"] == "cancelling"
    expired = long.submit_batch(_jobs(20, prefix="e"), completion_window="1s").batch_id
    time.sleep(1.2)
    start_worker(env)
    completed = short.submit_batch(_jobs(60)).batch_id
    assert short.wait(completed, timeout=60, poll=0.05)["status"] == "completed"
    _assert_all_expire(rclient, completed, 3000)
    per_job = _batch_bytes(rclient, completed) / 60
    print(f"\nRedis bytes per job before expiry: {per_job:.0f}")
    assert per_job > 0
    assert long.wait(cancelled, timeout=30)["status"] == "cancelled"
    _assert_all_expire(rclient, cancelled, 600_000)
    batch = long.wait(expired, timeout=30)
    wait_until(lambda: long.status(expired)["retained_until"] is not None, timeout=30)
    assert batch["status"] == "expired"
    _assert_all_expire(rclient, expired, 600_000)

    time.sleep(3.2)
    assert _batch_keys(rclient, completed) == {} and _batch_bytes(rclient, completed) == 0
    print("Redis bytes per job after expiry: 0")
    assert not _deferred_members(rclient, completed)
    short.overview()
    assert rclient.zscore(keys.batches_index(), completed) is None
    with pytest.raises(BatchNotFoundError):
        short.status(completed)


def test_delete_of_a_running_batch_with_a_worker_leaves_nothing_behind(
    redis_url: str, rclient: redis.Redis, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    # gpt-4o is held to 30 requests a minute: the batch is still running, with jobs in flight,
    # waiting for capacity and in the deferred set, when it is deleted.
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_DEFER_AFTER="1", RATEQUEUE_CHUNK_SIZE="5",
                   RATEQUEUE_MODEL_GPT_4O_RPM="30", RATEQUEUE_LEARN_LIMITS="0")
    start_worker(env)
    client = Client(load_settings(env))
    batch_id = client.submit_batch(_jobs(40, model="gpt-4o")).batch_id
    wait_until(lambda: client.status(batch_id)["request_counts"]["completed"] > 0, timeout=30)
    wait_until(lambda: bool(_deferred_members(rclient, batch_id)), timeout=30)
    with pytest.raises(BatchRunningError):
        client.delete(batch_id)
    assert client.delete(batch_id, force=True)["status"] == "in_progress"
    assert _batch_keys(rclient, batch_id) == {}
    # Calls in flight come back and jobs that were waiting for capacity are deferred (the worker
    # sees the delete within its 1 s cache of the batch's state); deferred jobs come due and the
    # mover drops them: none of it brings the batch back.
    time.sleep(4.0)
    wait_until(lambda: not _deferred_members(rclient, batch_id), timeout=20)
    assert _batch_keys(rclient, batch_id) == {}
    with pytest.raises(BatchNotFoundError):
        client.status(batch_id)
