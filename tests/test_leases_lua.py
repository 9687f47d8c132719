"""The lease scripts (renew_leases.lua, recheck_later.lua) against the real Redis, through
``worker.leases.Leases``: only the owner's own leases move, a deleted batch is never recreated,
and only jobs another live run holds are deferred for a re-check."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.worker.leases import Leases, run_owner


def _claims(rclient: redis.Redis, batch: str) -> dict[str, tuple[str, int]]:
    out = {}
    for cid, value in rclient.hgetall(keys.batch_claims(batch)).items():
        owner, expiry = value.decode().split(" ")
        out[cid.decode()] = (owner, int(expiry))
    return out


def _run(redis_url: str, fn: object) -> object:
    async def main() -> object:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await fn(Leases(client))  # type: ignore[operator]
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_renew_and_release_touch_only_the_owners_own_leases(redis_url: str, rclient: redis.Redis) -> None:
    now_ms = int(time.time() * 1000)
    rclient.hset(keys.batch_claims("b"), mapping={"mine": f"me {now_ms + 1000}", "theirs": f"other {now_ms + 1000}"})
    renewed = _run(redis_url, lambda leases: leases.renew("b", "me", ["mine", "theirs", "absent"], 60))
    claims = _claims(rclient, "b")
    assert renewed == 1
    assert claims["mine"][0] == "me" and claims["mine"][1] >= now_ms + 59_000
    assert claims["theirs"] == ("other", now_ms + 1000) and "absent" not in claims
    released = _run(redis_url, lambda leases: leases.release("b", "me", ["mine", "theirs"]))
    assert released == 1 and set(_claims(rclient, "b")) == {"theirs"}


def test_renewing_a_deleted_batch_recreates_nothing(redis_url: str, rclient: redis.Redis) -> None:
    assert _run(redis_url, lambda leases: leases.renew("gone", "me", ["a", "b"], 60)) == 0
    assert not rclient.exists(keys.batch_claims("gone"))


def test_recheck_defers_only_jobs_another_live_run_holds(redis_url: str, rclient: redis.Redis) -> None:
    now_ms = int(time.time() * 1000)
    rclient.hset(keys.batch_claims("b"), mapping={
        "held": f"other {now_ms + 60_000}",    # another live run: re-check later
        "expired": f"other {now_ms - 1}",      # a dead run's lease: not deferred (claimable now)
        "own": f"me {now_ms + 60_000}",        # this run's own
        "done": f"other {now_ms + 60_000}",    # has an outcome: nothing to do
    })
    rclient.hset(keys.batch_results("b"), "done", "{}")
    deferred = _run(redis_url, lambda leases: leases.recheck_later("b", "me", ["held", "expired", "own", "done",
                                                                               "free"], 5))
    members = {m.decode(): s for m, s in rclient.zrange(keys.deferred_jobs(), 0, -1, withscores=True)}
    assert deferred == 1 and list(members) == [f"b{DEFERRED_SEP}held"]
    assert now_ms + 4_000 <= members[f"b{DEFERRED_SEP}held"] <= now_ms + 60_000


def test_each_run_of_a_message_has_its_own_owner() -> None:
    first, second = run_owner("msg 1"), run_owner("msg 1")
    assert first != second and first.startswith("msg_1~") and " " not in first


def test_a_recheck_while_the_mover_republishes_the_job_keeps_it_deferred(
    redis_url: str, rclient: redis.Redis
) -> None:
    """Issue 10, finding 7: a job a dead run still leased came due, the mover published it, and the
    chunk's run re-checked it before the mover released its entry. The re-check's ZADD NX kept the
    mover's lease score, so the release removed the entry: the job was never looked at again (a
    ``ratequeue resume`` after ``kill -9`` ran only the jobs that lost this race)."""
    from ratequeue.worker.deferred import DeferredMover

    now_ms = int(time.time() * 1000)
    rclient.hset(keys.batch_claims("b"), "held", f"dead-run {now_ms + 60_000}")  # a killed worker's lease
    rclient.hset(keys.batch_meta("b"), "status", "in_progress")
    rclient.zadd(keys.deferred_jobs(), {f"b{DEFERRED_SEP}held": now_ms - 1})  # due now
    rechecked: list[int] = []

    def publish_and_run_at_once(batch_id: str, custom_ids: object) -> None:
        # The fastest worker: takes the chunk before the mover has released its entry.
        rechecked.append(_run(redis_url, lambda leases: leases.recheck_later(  # type: ignore[arg-type]
            batch_id, "redelivered-run", list(custom_ids), 30)))  # type: ignore[call-overload]

    mover = DeferredMover(rclient, publish_and_run_at_once)
    assert mover.move_due() == 1 and rechecked == [1]
    members = {m.decode(): s for m, s in rclient.zrange(keys.deferred_jobs(), 0, -1, withscores=True)}
    assert list(members) == [f"b{DEFERRED_SEP}held"]  # still there, to be re-checked once the lease is gone
    assert members[f"b{DEFERRED_SEP}held"] <= int(time.time() * 1000) + 30_000


def test_a_recheck_is_due_when_the_other_runs_lease_ends_if_that_comes_first(
    redis_url: str, rclient: redis.Redis
) -> None:
    """A killed worker's chunk, given back by the reaper, finds its jobs leased for the rest of the
    dead run's last lease: they are looked at again when it ends, not a fixed delay later."""
    now_ms = int(time.time() * 1000)
    rclient.hset(keys.batch_claims("b"), mapping={"ending": f"dead-run {now_ms + 2_000}",
                                                  "renewed": f"live-run {now_ms + 60_000}"})
    assert _run(redis_url, lambda leases: leases.recheck_later("b", "me", ["ending", "renewed"], 30)) == 2
    due = {m.decode(): s for m, s in rclient.zrange(keys.deferred_jobs(), 0, -1, withscores=True)}
    assert now_ms + 2_000 <= due[f"b{DEFERRED_SEP}ending"] < now_ms + 2_500
    assert now_ms + 30_000 <= due[f"b{DEFERRED_SEP}renewed"] < now_ms + 31_000  # at the latest after the delay
