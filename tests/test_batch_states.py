"""The batch state machine against the real Redis: each transition script directly (what it
allows, what it refuses), then races between transitions run from threads, many times each:
a final status is one of those allowed, never written again, counters are true, and
``Client.wait()`` returns."""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import Callable
from functools import partial
from importlib import resources
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import FINAL, BatchStatus, BatchStore
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.scripts import lua_source
from ratequeue.producer.api import Client
from ratequeue.worker.store import JobStore, Outcome

RACES = 200
S = BatchStatus


def _client(redis_url: str) -> Client:
    """A client whose chunks go nowhere: the tests play the worker's part."""
    return Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url}), publish=lambda batch_id, ids: None)


def _jobs(n: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"j-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}
            for i in range(n)]


def _outcome(custom_id: str, kind: str = "result") -> list[str | int]:
    return [custom_id, kind, orjson.dumps({"custom_id": custom_id}).decode(), 3, 2, 0, "0.001"]


def _meta(r: redis.Redis, batch_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in r.hgetall(keys.batch_meta(batch_id)).items()}


def _batch(store: BatchStore, status: BatchStatus, total: int = 2, done: int = 0, sealed: bool = True) -> str:
    """A batch of ``total`` jobs, ``done`` of them with an outcome, brought to ``status`` by the
    transitions themselves (no status written by hand)."""
    batch_id = store.create(3600, {"account": "acct", "retention": "60"})
    r = store._redis
    r.hset(keys.batch_meta(batch_id), "total", total)  # what Submitter.add counts as it stores jobs
    if status is S.CANCELLING:
        store.cancel(batch_id)
    elif status is S.FINALIZING:
        store.expire(batch_id)
    if done:
        store.store_outcomes(batch_id, [a for i in range(done) for a in _outcome(f"j-{i}")])
    if sealed and status is not S.VALIDATING:
        store.seal(batch_id)
    assert store.status(batch_id) is status, (status, store.status(batch_id))
    return batch_id


# -- each script, directly ------------------------------------------------------------------------------


def test_create_starts_validating_with_redis_times_and_never_twice(rclient: redis.Redis) -> None:
    store = BatchStore(rclient)
    batch_id = store.create(60, {"account": "acct", "metadata": {"k": "v"}, "status": "completed"})
    meta = _meta(rclient, batch_id)
    assert meta["status"] == "validating"  # a caller cannot pick another first status
    assert int(meta["expires_at"]) - int(meta["created_at"]) == 60
    assert orjson.loads(meta["metadata"]) == {"k": "v"} and meta["sealed"] == "0" and meta["total"] == "0"
    assert rclient.zscore(keys.batches_index(), batch_id)
    create = rclient.register_script(lua_source("create_batch"))
    with pytest.raises(redis.ResponseError, match="batch exists"):
        create(keys=[keys.batch_meta(batch_id)], args=[60, "account", "other"])
    assert _meta(rclient, batch_id)["account"] == "acct"


def test_seal_moves_validating_on_and_ends_a_finished_batch_by_the_one_rule(rclient: redis.Redis) -> None:
    store = BatchStore(rclient)
    assert store.seal(_batch(store, S.VALIDATING)) is S.IN_PROGRESS
    assert _meta(rclient, _batch(store, S.IN_PROGRESS))["in_progress_at"]
    ends = {S.VALIDATING: S.COMPLETED, S.CANCELLING: S.CANCELLED, S.FINALIZING: S.EXPIRED}
    for before, after in ends.items():
        batch_id = _batch(store, before, total=1, done=1, sealed=False)
        assert store.seal(batch_id) is after
        assert 0 < rclient.pttl(keys.batch_meta(batch_id)) <= 60_000 and _meta(rclient, batch_id)[f"{after}_at"]
        assert store.seal(batch_id) is after  # ended: no change, no retention reset
    for before in (S.CANCELLING, S.FINALIZING):  # jobs remain: the status stays
        assert store.seal(_batch(store, before, sealed=False)) is before
    with pytest.raises(redis.ResponseError, match="no batch"):
        store.seal("batch_none")
    assert not rclient.exists(keys.batch_meta("batch_none"))


@pytest.mark.parametrize(("transition", "moved_to"), [("cancel", S.CANCELLING), ("expire", S.FINALIZING)])
def test_cancel_and_expire_move_only_a_running_batch(rclient: redis.Redis, transition: str, moved_to: S) -> None:
    store = BatchStore(rclient)
    move: Callable[[str], BatchStatus | None] = getattr(store, transition)
    for running in (S.VALIDATING, S.IN_PROGRESS):
        batch_id = _batch(store, running)
        assert move(batch_id) is moved_to and store.status(batch_id) is moved_to
        assert _meta(rclient, batch_id)[f"{moved_to}_at"]
        assert move(batch_id) is moved_to  # again: no change
    other = S.FINALIZING if moved_to is S.CANCELLING else S.CANCELLING
    assert move(_batch(store, other)) is other  # the first of cancel and expire wins
    for final in (S.COMPLETED, S.CANCELLED, S.EXPIRED):
        before = {S.COMPLETED: S.IN_PROGRESS, S.CANCELLED: S.CANCELLING, S.EXPIRED: S.FINALIZING}[final]
        batch_id = _batch(store, before, total=1, done=0)
        store.store_outcomes(batch_id, _outcome("j-0", "error"))
        snapshot = _meta(rclient, batch_id)
        assert snapshot["status"] == final and move(batch_id) is final
        assert _meta(rclient, batch_id) == snapshot  # a final batch is not written at all
    assert move("batch_none") is None and not rclient.exists(keys.batch_meta("batch_none"))


def test_store_outcome_ends_a_sealed_batch_once_and_never_rewrites_the_end(rclient: redis.Redis) -> None:
    store = BatchStore(rclient)
    batch_id = _batch(store, S.IN_PROGRESS, total=2)
    assert store.store_outcomes(batch_id, _outcome("j-0")) == [1]
    assert store.status(batch_id) is S.IN_PROGRESS and rclient.pttl(keys.batch_meta(batch_id)) == -1
    assert store.store_outcomes(batch_id, _outcome("j-1", "error") + _outcome("j-0")) == [1, 0]
    ended = _meta(rclient, batch_id)
    assert ended["status"] == "completed" and ended["completed"] == "1" and ended["failed"] == "1"
    assert store.store_outcomes(batch_id, _outcome("j-1")) == [0]
    for again in (store.cancel, store.expire, store.seal):
        again(batch_id)
    assert _meta(rclient, batch_id) == ended
    unsealed = _batch(store, S.VALIDATING, total=1)
    store.store_outcomes(unsealed, _outcome("j-0"))
    assert store.status(unsealed) is S.VALIDATING  # not sealed: more jobs may join


def test_delete_refuses_a_running_batch_unless_forced(rclient: redis.Redis) -> None:
    store = BatchStore(rclient)
    for running in (S.VALIDATING, S.IN_PROGRESS, S.CANCELLING, S.FINALIZING):
        batch_id = _batch(store, running)
        assert store.delete(batch_id) == (False, running) and rclient.exists(keys.batch_meta(batch_id))
        assert store.delete(batch_id, force=True) == (True, running)
        assert not [k for k in keys.batch_keys(batch_id) if rclient.exists(k)]
    finished = _batch(store, S.IN_PROGRESS, total=1)
    store.store_outcomes(finished, _outcome("j-0"))
    assert store.delete(finished) == (True, S.COMPLETED)
    assert store.delete(finished) == (False, None)


def test_the_final_status_rule_and_status_writes_live_in_the_scripts_only() -> None:
    folder = resources.files("ratequeue.jobstore") / "lua"
    sources = {f.name: f.read_text() for f in folder.iterdir() if f.name.endswith(".lua")}
    named = {m for src in sources.values() for m in re.findall(r"'([a-z_]+)'", src)}
    assert {s.value for s in S} - {"failed"} <= named  # failed: final, set by nothing yet
    assert [n for n, src in sources.items() if "final_status(" in src] == ["_batch_end.lua"]
    status_write = re.compile(r"HSET', (KEYS\[1\]|meta), 'status'")
    writers = sorted(n for n, src in sources.items() if status_write.search(src))
    assert writers == ["_batch_end.lua", "cancel_batch.lua", "create_batch.lua", "expire_batch.lua", "seal_batch.lua"]
    for name in ("seal_batch", "store_outcome"):
        assert "local function end_if_done" in lua_source(name)  # pasted in: one atomic call


# -- races, from threads, against the real server --------------------------------------------------


def _race(*steps: Callable[[], object]) -> None:
    """Run ``steps`` at once, one thread each, released together by a barrier."""
    barrier = threading.Barrier(len(steps))
    errors: list[BaseException] = []

    def run(step: Callable[[], object]) -> None:
        barrier.wait()
        try:
            step()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors


def _assert_settled(client: Client, batch_id: str, allowed: set[BatchStatus]) -> BatchStatus:
    """The batch has ended as one of ``allowed``, with true counters; nothing rewrites it later."""
    batch = client.wait(batch_id, timeout=5, poll=0.005)
    status = BatchStatus(batch["status"])
    assert status in allowed and status in FINAL, batch
    r, counts = client.redis, batch["request_counts"]
    assert counts["completed"] == r.hlen(keys.batch_results(batch_id))
    assert counts["failed"] == r.hlen(keys.batch_errors(batch_id))
    assert counts["completed"] + counts["failed"] == counts["total"]
    before = _meta(r, batch_id)
    store = BatchStore(r)
    for again in (store.cancel, store.expire, store.seal):
        again(batch_id)
    store.store_outcomes(batch_id, _outcome("j-0") + _outcome("j-1", "error"))
    assert _meta(r, batch_id) == before
    return status


def _running(client: Client, jobs: int = 2) -> str:
    """A submitted batch (in_progress) whose jobs all have an outcome but the last."""
    batch_id = client.submit_batch(_jobs(jobs)).batch_id
    if jobs > 1:
        BatchStore(client.redis).store_outcomes(batch_id, [a for i in range(jobs - 1) for a in _outcome(f"j-{i}")])
    return batch_id


def test_cancel_racing_the_last_outcome(redis_url: str) -> None:
    client, seen = _client(redis_url), Counter[BatchStatus]()
    store = BatchStore(client.redis)
    for _ in range(RACES):
        batch_id = _running(client)
        _race(partial(client.cancel, batch_id), partial(store.store_outcomes, batch_id, _outcome("j-1")))
        seen[_assert_settled(client, batch_id, {S.COMPLETED, S.CANCELLED})] += 1
    client.close()
    print("cancel vs last outcome:", dict(seen))


def test_expire_racing_the_last_outcome(redis_url: str) -> None:
    client, seen = _client(redis_url), Counter[BatchStatus]()
    store = BatchStore(client.redis)
    for _ in range(RACES):
        batch_id = _running(client)
        _race(partial(store.expire, batch_id), partial(store.store_outcomes, batch_id, _outcome("j-1")))
        seen[_assert_settled(client, batch_id, {S.COMPLETED, S.EXPIRED})] += 1
    client.close()
    print("expire vs last outcome:", dict(seen))


def test_cancel_racing_expire_then_the_last_job_fails_as_the_winner_says(redis_url: str) -> None:
    client, seen = _client(redis_url), Counter[BatchStatus]()
    store = BatchStore(client.redis)
    for _ in range(RACES):
        batch_id = _running(client)
        _race(partial(client.cancel, batch_id), partial(store.expire, batch_id))
        won = store.status(batch_id)
        assert won in (S.CANCELLING, S.FINALIZING)
        store.store_outcomes(batch_id, _outcome("j-1", "error"))  # the worker fails the job as stopped
        ended = _assert_settled(client, batch_id, {S.CANCELLED, S.EXPIRED})
        assert ended is (S.CANCELLED if won is S.CANCELLING else S.EXPIRED)
        seen[ended] += 1
    client.close()
    print("cancel vs expire:", dict(seen))


def test_cancel_expire_and_the_last_outcome_all_at_once(redis_url: str) -> None:
    client, seen = _client(redis_url), Counter[BatchStatus]()
    store = BatchStore(client.redis)
    for _ in range(RACES):
        batch_id = _running(client)
        _race(partial(client.cancel, batch_id), partial(store.expire, batch_id),
              partial(store.store_outcomes, batch_id, _outcome("j-1")))
        seen[_assert_settled(client, batch_id, {S.COMPLETED, S.CANCELLED, S.EXPIRED})] += 1
    client.close()
    print("cancel vs expire vs last outcome:", dict(seen))


def test_the_workers_store_racing_its_expire_and_a_cancel(redis_url: str) -> None:
    """The worker's own path (JobStore on asyncio) against Client.cancel from another thread."""
    client, seen = _client(redis_url), Counter[BatchStatus]()

    async def races() -> None:
        r = aioredis.Redis.from_url(redis_url)
        store = JobStore(r)
        for _ in range(RACES):
            batch_id = _running(client)
            await asyncio.gather(store.store(batch_id, "j-1", Outcome("result", b'{"custom_id": "j-1"}')),
                                 store.mark_expired(batch_id), asyncio.to_thread(client.cancel, batch_id))
            seen[_assert_settled(client, batch_id, {S.COMPLETED, S.CANCELLED, S.EXPIRED})] += 1
        await r.aclose()

    asyncio.run(races())
    client.close()
    print("worker store vs expire vs cancel:", dict(seen))
