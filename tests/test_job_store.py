"""`JobStore.store` against the real Redis: outcomes stored once, many in one Lua call, the
batch's counters and final status right, outcomes held while Redis is full, and other Redis
errors seen by every waiting caller."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import OutcomeArgs
from ratequeue.worker import metrics
from ratequeue.worker.store import JobStore, Outcome
from tests.conftest import private_redis


class CountingStore(JobStore):
    """A real store that counts the Lua calls it makes."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client)
        self.calls = 0
        real = self._batches.store_outcomes

        async def counted(batch_id: str, args: OutcomeArgs) -> list[int]:
            self.calls += 1
            return await real(batch_id, args)

        self._batches.store_outcomes = counted  # type: ignore[method-assign]


def _result(i: int) -> Outcome:
    return Outcome("result", b'{"custom_id": "c-%d"}' % i, prompt_tokens=10, completion_tokens=5, cost_usd=0.001)


def test_concurrent_outcomes_share_a_call_and_are_stored_once(redis_url: str, rclient: redis.Redis) -> None:
    meta = keys.batch_meta("b1")
    rclient.hset(meta, mapping={"total": 120, "sealed": 1, "status": "in_progress"})

    async def main() -> tuple[list[bool], list[bool], int]:
        client = aioredis.Redis.from_url(redis_url)
        store = CountingStore(client)
        try:
            first = await asyncio.gather(*(store.store("b1", f"c-{i}", _result(i)) for i in range(100)))
            calls = store.calls
            # A redelivered copy (or a second worker) stores again: nothing changes.
            again = await asyncio.gather(
                *(store.store("b1", f"c-{i}", Outcome("error", b"{}")) for i in range(90, 110)),
                *(store.store("b1", f"c-{i}", _result(i)) for i in range(110, 120)),
            )
            return first, again, calls
        finally:
            await client.aclose()

    first, again, calls = asyncio.run(main())
    assert all(first) and calls <= 2  # 100 outcomes in one or two round trips, not 100
    assert again == [False] * 10 + [True] * 20
    assert rclient.hlen(keys.batch_results("b1")) == 110
    assert rclient.hlen(keys.batch_errors("b1")) == 10  # c-100..c-109 were new: stored as errors
    m = {k.decode(): v.decode() for k, v in rclient.hgetall(meta).items()}
    assert (m["completed"], m["failed"], m["prompt_tokens"], m["completion_tokens"]) == ("110", "10", "1100", "550")
    assert float(m["cost_usd"]) == pytest.approx(0.11)
    assert m["status"] == "completed"  # sealed and every job has its outcome


def test_outcomes_are_held_while_redis_is_full_and_stored_once_it_has_room(redis_url: str) -> None:
    """Paid answers are never dropped: while Redis refuses writes (maxmemory), callers wait."""
    with private_redis() as url:
        sync = redis.Redis.from_url(url)
        sync.hset(keys.batch_meta("b3"), mapping={"total": 5, "sealed": 1, "status": "in_progress"})
        sync.config_set("maxmemory-policy", "noeviction")
        sync.config_set("maxmemory", 1)  # every write that needs memory is refused now

        async def main() -> tuple[int, list[bool]]:
            client = aioredis.Redis.from_url(url)
            try:
                waiting = asyncio.gather(*(JobStore(client).store("b3", f"c-{i}", _result(i)) for i in range(5)))
                await asyncio.sleep(1.0)
                held = int(metrics.OUTCOMES_HELD._value.get())
                assert not waiting.done()
                sync.config_set("maxmemory", 0)
                return held, await asyncio.wait_for(waiting, 10)
            finally:
                await client.aclose()

        held, stored = asyncio.run(main())
        assert held >= 1 and stored == [True] * 5
        assert sync.hlen(keys.batch_results("b3")) == 5 and sync.hget(keys.batch_meta("b3"), "completed") == b"5"


def test_an_error_that_is_not_redis_unavailable_reaches_every_waiting_caller(
    redis_url: str, rclient: redis.Redis
) -> None:
    rclient.hset(keys.batch_meta("b2"), mapping={"total": 5, "sealed": 1, "status": "in_progress"})
    rclient.set(keys.batch_results("b2"), "not a hash")  # the script fails with WRONGTYPE

    async def main() -> list[BaseException | bool]:
        client = aioredis.Redis.from_url(redis_url)
        store = JobStore(client)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(store.store("b2", f"c-{i}", _result(i)) for i in range(5)), return_exceptions=True), 5
            )
        finally:
            await client.aclose()

    outcomes = asyncio.run(main())
    assert len(outcomes) == 5 and all(isinstance(o, redis.ResponseError) for o in outcomes), outcomes
