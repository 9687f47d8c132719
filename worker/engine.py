"""The per-process job engine: one asyncio loop that runs every job the Celery task threads hand it.

Why this shape: an LLM call takes seconds, so a worker must hold hundreds of calls in flight.
Celery's prefork pool gives one call per process; its gevent pool caps near 100 tasks/s with
acks_late and one message per job costs ~1 ms of CPU. So a Celery message carries a *chunk* of
jobs of one model, a small threads pool (``worker_slots``) receives chunks, and every thread hands
its chunk to this loop and blocks until the chunk's jobs are stored or deferred. The loop holds up
to ``max_in_flight`` upstream calls at once (asyncio + sharded httpx clients), so one process keeps
hundreds of calls in flight at the cost of one thread per chunk, not per call. What happens to
each job is ``worker.runner``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import uvloop

from config.models import ModelTable
from config.settings import Settings
from worker.limiter import Limiter
from worker.parking import Parking
from worker.runner import JobRunner
from worker.store import JobStore
from worker.upstream import Timeouts, UpstreamClient

log = logging.getLogger(__name__)


@dataclass
class ChunkReport:
    stored: int = 0
    deferred: int = 0
    skipped: int = 0  # already had an outcome, or another live run holds it (a redelivered chunk)


class Engine:
    """Owns the event loop thread and the Redis and HTTP clients of one process."""

    def __init__(self, settings: Settings, table: ModelTable) -> None:
        self.settings = settings
        self.table = table
        # uvloop: the engine loop's socket reads and writes (aiohttp, Redis) and its callbacks
        # run in C; asyncio's own loop cost ~15% of a worker's CPU at 1,000 calls/s.
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ratequeue-engine", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result()

    async def _setup(self) -> None:
        s = self.settings
        pool = aioredis.BlockingConnectionPool.from_url(
            s.redis_url or "redis://127.0.0.1:6379/0", max_connections=64, timeout=30, health_check_interval=10
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.store = JobStore(self.redis)
        self.client = UpstreamClient(
            s.base_url,
            s.api_key.reveal() if s.api_key else None,
            s.organization,
            s.project,
            Timeouts(connect=s.connect_timeout, read=s.read_timeout),
            max_connections=s.max_in_flight,
        )
        limiter = Limiter(self.redis, horizon_seconds=s.reserve_horizon_seconds)
        self.runner = JobRunner(s, self.table, limiter, self.store, self.client, Parking(self.redis))

    def run_chunk(self, batch_id: str, custom_ids: Sequence[str], owner: str | None = None) -> ChunkReport:
        """Run a chunk's jobs to an outcome or a deferral; blocks the calling (Celery) thread.

        ``owner`` (the message id) holds the jobs' leases: another message cannot run them meanwhile.
        """
        owner = owner or uuid.uuid4().hex
        return asyncio.run_coroutine_threadsafe(self._run_chunk(batch_id, custom_ids, owner), self._loop).result()

    def close(self) -> None:
        async def _close() -> None:
            await self.client.aclose()
            await self.redis.aclose()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _run_chunk(self, batch_id: str, custom_ids: Sequence[str], owner: str) -> ChunkReport:
        report = ChunkReport()
        state = await self.store.batch_state(batch_id)
        if state is None:
            log.warning("chunk for unknown batch %s dropped (%d jobs)", batch_id, len(custom_ids))
            return report
        claimed = await self.store.claim_pending(batch_id, custom_ids, owner, self.settings.visibility_timeout)
        report.skipped = len(custom_ids) - len(claimed)
        # Every job settles before an error is raised: the message is then given back with no job
        # of this run still calling upstream in the background.
        done = await asyncio.gather(
            *(self.runner.run(state, job, started) for job, started in claimed), return_exceptions=True
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        report.stored = sum(1 for d in done if d)
        report.deferred = len(done) - report.stored
        return report
