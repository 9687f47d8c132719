"""The worker's side of the job store in Redis: load jobs, record outcomes once, defer jobs.

Batch states are read through ``worker.batchwatch`` (fresh within a quarter second)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import AsyncBatchStore
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.jobstore.scripts import lua_source
from ratequeue.retrying import warn_every
from ratequeue.worker import metrics
from ratequeue.worker.batchwatch import BatchState, BatchWatch

# Redis cannot take a write now but will later: gone (restarting), loading its data, or full.
REDIS_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """The one stored outcome of a job: a result line or an error line, with its usage."""

    kind: str  # "result" | "error"
    line: bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def cost_nano_usd(self) -> int:
        """The cost in whole nano-dollars, as store_outcome.lua adds it (integer sums are exact)."""
        return round(self.cost_usd * 1e9)


class JobStore:
    """Async access to batches for the worker's event loop."""

    ATTEMPTS_WHEN_GONE = 1 << 30  # above any max_attempts

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self.watch = BatchWatch(redis)
        self._batches = AsyncBatchStore(redis)
        self._defer = redis.register_script(lua_source("defer"))
        self._claim = redis.register_script(lua_source("claim_jobs"))
        self._attempt = redis.register_script(lua_source("record_attempt"))
        # Outcomes waiting for the next store call, per batch: (custom_id, outcome, caller's future)
        self._unstored: dict[str, list[tuple[str, Outcome, asyncio.Future[bool]]]] = {}
        self._storer: asyncio.Task[None] | None = None

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def batch_state(self, batch_id: str) -> BatchState | None:
        """The batch's state, read within the last ``worker.batchwatch.POLL_INTERVAL`` seconds."""
        return await self.watch.state(batch_id)

    async def claim_pending(
        self, batch_id: str, custom_ids: Sequence[str], owner: str, lease: float
    ) -> list[tuple[StoredJob, float]]:
        """Lease the jobs among ``custom_ids`` that have no outcome and no live lease.

        A redelivered chunk so skips finished jobs (no second upstream call) and jobs another
        run is executing; ``lease`` (seconds) bounds how long a killed worker's jobs stay locked.
        Returns each job with the time (s since epoch) of its first run.
        """
        if not custom_ids:
            return []
        flat = await self._claim(
            keys=[
                keys.batch_jobs(batch_id),
                keys.batch_results(batch_id),
                keys.batch_errors(batch_id),
                keys.batch_claims(batch_id),
                keys.batch_started(batch_id),
            ],
            args=[int(lease * 1000), owner, *custom_ids],
        )
        return [
            (StoredJob.loads(text(flat[i]), flat[i + 1]), int(flat[i + 2]) / 1000.0) for i in range(0, len(flat), 3)
        ]

    async def mark_expired(self, batch_id: str) -> None:
        """Stop a running batch past its completion window: it moves to "finalizing", its remaining
        jobs fail as expired and the last of them ends it as "expired". One Lua call
        (expire_batch.lua): a batch that ended, was cancelled or was deleted meanwhile keeps its
        status. Skipped when this worker already saw it stopping (one call per batch, not per job)."""
        state = await self.watch.state(batch_id)
        if state is not None and state.stopped:
            return
        status = await self._batches.expire(batch_id)
        self.watch.note_status(batch_id, status.value if status is not None else None)

    async def release(self, batch_id: str, custom_id: str) -> None:
        """Drop a job's lease (it was deferred: the run that picks it up next must claim it)."""
        await self._redis.hdel(keys.batch_claims(batch_id), custom_id)

    async def store(self, batch_id: str, custom_id: str, outcome: Outcome) -> bool:
        """Record the job's outcome; False if it already had one (nothing changes then).

        Returns once the outcome is in Redis. Outcomes stored meanwhile by other coroutines of
        this loop travel in the same Lua call: one round trip for many jobs, not one each.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._unstored.setdefault(batch_id, []).append((custom_id, outcome, future))
        if self._storer is None:
            self._storer = asyncio.create_task(self._store_pending())
        return await future

    async def _store_pending(self) -> None:
        try:
            while self._unstored:
                pending, self._unstored = self._unstored, {}
                for batch_id, entries in pending.items():
                    await self._store_batch(batch_id, entries)
        finally:
            self._storer = None

    async def _store_batch(self, batch_id: str, entries: list[tuple[str, Outcome, asyncio.Future[bool]]]) -> None:
        args: list[str | bytes | int] = []
        for custom_id, o, _ in entries:
            args += [custom_id, o.kind, o.line, o.prompt_tokens, o.completion_tokens, o.cached_tokens, o.cost_nano_usd]
        try:
            stored = await self._store_until_accepted(batch_id, args, len(entries))
            for (_, _, future), new in zip(entries, stored, strict=True):
                if not future.done():
                    future.set_result(bool(new))
        except asyncio.CancelledError:
            for _, _, future in entries:
                future.cancel()
            raise
        except Exception as exc:  # every waiting job sees the failure, as if it had called alone
            for _, _, future in entries:
                if not future.done():
                    future.set_exception(exc)

    async def _store_until_accepted(self, batch_id: str, args: list[str | bytes | int], count: int) -> Any:
        """Run ``store_outcome.lua``, retrying for as long as Redis is down, loading or full.

        These outcomes were paid for: dropping one would make its chunk run the call again. So
        they are held here (the callers wait) until Redis takes them, however long that is. The
        script is atomic even when Redis is full (it is refused before its first write, never
        halfway), so a retry cannot count a job twice.

        Retried by tenacity: 0.1 s doubling up to 2 s, never stopping; other errors are raised.
        While they wait, the outcomes count in the ``ratequeue_outcomes_held`` gauge; the warning
        is logged at most once per 30 s of one outage.
        """
        try:  # every flush of outcomes passes here: the retry loop is built only when Redis refuses
            return await self._batches.store_outcomes(batch_id, args)
        except REDIS_UNAVAILABLE:
            pass
        log_held = warn_every(log, 30.0, f"holding {count} paid outcome(s) of {batch_id} until Redis takes them: %s")

        async def hold(delay: float) -> None:
            metrics.outcomes_held(count)
            try:
                await asyncio.sleep(delay)
            finally:
                metrics.outcomes_held(-count)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(REDIS_UNAVAILABLE),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            sleep=hold,
            before_sleep=log_held,
            reraise=True,
        )
        return await retrying(self._batches.store_outcomes, batch_id, args)

    async def record_attempt(
        self, batch_id: str, custom_id: str, status: int, message: str, count: bool = True
    ) -> int:
        """Count one failed upstream attempt of a job (only keep it as the last failure when not
        ``count``); returns the job's attempts so far.

        Kept in Redis, not in the worker, so a job redelivered after a crash keeps its count. The
        job of a batch that is gone (deleted) gets ``ATTEMPTS_WHEN_GONE``: it stops retrying.
        """
        last = orjson.dumps({"status": status, "message": message[:500]})
        attempts = int(
            await self._attempt(
                keys=[keys.batch_meta(batch_id), keys.batch_attempts(batch_id), keys.batch_last_failure(batch_id)],
                args=[custom_id, last, int(count)],
            )
        )
        return attempts if attempts >= 0 else self.ATTEMPTS_WHEN_GONE

    async def attempts(self, batch_id: str, custom_id: str) -> tuple[int, dict[str, Any]]:
        """(attempts so far, last failure) of a job."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.batch_attempts(batch_id), custom_id)
            pipe.hget(keys.batch_last_failure(batch_id), custom_id)
            count, last = await pipe.execute()
        return int(count or 0), (orjson.loads(last) if last else {})

    async def defer(self, batch_id: str, custom_id: str, delay: float) -> None:
        """Park a job for ``delay`` seconds and drop its lease; a worker re-enqueues it when due."""
        await self.release(batch_id, custom_id)
        await self._defer(
            keys=[keys.deferred_jobs()], args=[f"{batch_id}{DEFERRED_SEP}{custom_id}", int(delay * 1000)]
        )

