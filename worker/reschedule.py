"""Bringing this worker's deferred work back sooner than it was booked (``worker.backlog``): its
schedule was priced by a charge rule no longer in force (``recall``: due now), or by limits slower
than those now in force, such as a share of the account cut by another client's spending and given
back since (``reprice``: each wait shrinks by the speed-up). A booking only ever moves earlier.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ratequeue.jobstore import keys
from ratequeue.jobstore.scripts import lua_source
from ratequeue.worker.backlog import Backlog
from ratequeue.worker.limiter import BucketLimits
from ratequeue.worker.settle import redis_wait

log = logging.getLogger(__name__)


class Rescheduler:
    """Moves the deferred-set entries of ``backlog``'s schedules forward (one event loop)."""

    def __init__(self, backlog: Backlog, redis: aioredis.Redis) -> None:
        self._backlog = backlog
        self._redis = redis
        self._hasten = redis.register_script(lua_source("hasten", "ratequeue.worker"))
        self._background: set[asyncio.Task[None]] = set()  # reprice writes in flight, kept referenced

    async def recall(self, key: str) -> None:
        """Work deferred here for capacity on ``key`` under the previous charge rule is due now: its
        schedule was priced by that rule (the engine admits or defers it again at its new price)."""
        members = self._backlog.recall(key)
        try:
            if members:
                await self._redis.zadd(keys.deferred_jobs(), dict.fromkeys(members, 0), xx=True)
        except RedisError as exc:  # they come back at their old time: slower, never lost
            log.warning("deferred work of %s not recalled after a new charge rule: %s", key, exc)

    async def reprice(self, key: str, limits: BucketLimits, catch_up: bool = True) -> None:
        """Bring forward the work deferred here on ``key`` when ``limits`` spend faster than those
        that priced it (``Backlog.reprice``), and, with ``catch_up``, when the work ahead of it
        here is gone sooner than priced (``Backlog.catch_up``)."""
        moved = self._backlog.reprice(key, limits)
        if catch_up:
            moved.update(self._backlog.catch_up(key))
        if not moved:
            return
        args = [x for member, wait in moved.items() for x in (member, int(redis_wait(wait) * 1000))]
        try:
            await self._hasten(keys=[keys.deferred_jobs()], args=args)
        except RedisError as exc:  # they come back at their old time: slower, never lost
            log.warning("deferred work of %s not brought forward: %s", key, exc)

    def reprice_soon(self, key: str, limits: BucketLimits) -> None:
        """``reprice`` from a callback (not awaited; the task is kept referenced until done)."""
        task = asyncio.ensure_future(self.reprice(key, limits))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
