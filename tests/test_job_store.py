"""`JobStore.store` against the real Redis: outcomes stored once, many in one Lua call, the
batch's counters and final status right, and a Redis failure seen by every waiting caller."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from worker import keys
from worker.store import JobStore, Outcome


class CountingStore(JobStore):
    """A real store that counts the Lua calls it makes."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client)
        self.calls = 0
        real = self._store

        async def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        self._store = counted  # type: ignore[assignment]


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


def test_a_redis_failure_reaches_every_waiting_caller(redis_url: str) -> None:
    async def main() -> list[BaseException | bool]:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        store = JobStore(client)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(store.store("b2", f"c-{i}", _result(i)) for i in range(5)), return_exceptions=True), 5
            )
        finally:
            await client.aclose()

    outcomes = asyncio.run(main())
    assert len(outcomes) == 5 and all(isinstance(o, redis.ConnectionError) for o in outcomes), outcomes
