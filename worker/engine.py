"""The per-process job engine: one asyncio loop that runs every job the Celery task threads hand it.

Why this shape: an LLM call takes seconds, so a worker must hold hundreds of calls in flight.
Celery's prefork pool gives one call per process; its gevent pool caps near 100 tasks/s with
acks_late and one message per job costs ~1 ms of CPU. So a Celery message carries a *chunk* of
jobs of one model, a small threads pool (``worker_slots``) receives chunks, and every thread hands
its chunk to this loop and blocks until the chunk's jobs are stored or deferred. The loop holds up
to ``max_in_flight`` upstream calls at once (asyncio + sharded httpx clients), so one process keeps
hundreds of calls in flight at the cost of one thread per chunk, not per call. What happens to
each job is ``worker.runner``'s business.

Fair slots (issue 11): a chunk holds its slot until each of its jobs is stored or deferred, so the
jobs of a chunk that would wait past ``defer_after`` behind their pair's work in this process are
deferred on arrival (``_admit``, ``worker.backlog``) instead of waiting on the pair's bucket in a
slot another pair's chunk could use.

Shutdown (issue 8): on SIGTERM Celery waits for running tasks, and a task blocked on a call that
hangs never ended. ``begin_shutdown`` gives calls in flight a grace period, then cancels every
running chunk: its leases are dropped and ``WorkerStopping`` is raised to the Celery thread,
whose task gives the message back for another worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import uvloop
from tenacity import AsyncRetrying, stop_after_delay, stop_when_event_set, wait_exponential

from ratequeue.config.accounts import AccountTable
from ratequeue.config.accounts_load import implicit_table
from ratequeue.config.models import ModelTable
from ratequeue.config.settings import Settings
from ratequeue.errors import InvalidRequestError
from ratequeue.jobstore import keys, records
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.redis_tls import redis_options
from ratequeue.worker import metrics
from ratequeue.worker.attempt import Deferral
from ratequeue.worker.backlog import MIN_PATIENCE_SECONDS, job_ref
from ratequeue.worker.batchwatch import BatchState
from ratequeue.worker.leases import JOB_LEASE_SECONDS, Leases, run_owner
from ratequeue.worker.limiter import Limiter
from ratequeue.worker.metrics_redis import TimedAsyncRedis
from ratequeue.worker.parking import Parking, pair_field
from ratequeue.worker.routechoice import RouteChooser
from ratequeue.worker.routing import Routing
from ratequeue.worker.runner import JobRunner
from ratequeue.worker.store import JobStore, Outcome
from ratequeue.worker.upstream import Timeouts, UpstreamClient

log = logging.getLogger(__name__)

Claimed = tuple[StoredJob, float]  # a job this run holds, and when it first ran


class WorkerStopping(Exception):
    """The worker is shutting down: the chunk was cancelled and its leases released; requeue it."""


@dataclass
class ChunkReport:
    stored: int = 0
    deferred: int = 0
    skipped: int = 0  # already had an outcome, or another live run holds it (a redelivered chunk)


class Engine:
    """Owns the event loop thread and the Redis and HTTP clients of one process."""

    def __init__(self, settings: Settings, table: ModelTable, accounts: AccountTable | None = None) -> None:
        self.settings = settings
        self.table = table
        self.routing = Routing(accounts or implicit_table(settings, table))
        # uvloop: the engine loop's socket reads and writes (aiohttp, Redis) and its callbacks
        # run in C; asyncio's own loop cost ~15% of a worker's CPU at 1,000 calls/s.
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ratequeue-engine", daemon=True)
        self._thread.start()
        self._chunks: set[asyncio.Task[ChunkReport]] = set()  # touched on the loop only
        self._stopping = threading.Event()  # set at shutdown; read by tenacity too
        asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result()

    async def _setup(self) -> None:
        s = self.settings
        pool = aioredis.BlockingConnectionPool.from_url(
            s.redis_url or "redis://127.0.0.1:6379/0", max_connections=64, timeout=30, health_check_interval=10,
            **redis_options(s),
        )
        self.redis = TimedAsyncRedis(connection_pool=pool)  # every call timed (ratequeue_redis_*)
        self.store = JobStore(self.redis)
        own = self.routing.accounts.implicit  # with [accounts], every call carries its account's credentials
        self.client = UpstreamClient(
            s.base_url,
            s.api_key.reveal() if s.api_key and own else None,
            s.organization if own else None,
            s.project if own else None,
            # The whole call, not only each read, ends within the read timeout (a trickling server).
            Timeouts(connect=s.connect_timeout, read=s.read_timeout, total=s.read_timeout),
            max_connections=s.max_in_flight,
            max_response_bytes=s.max_response_bytes,
        )
        self.leases = Leases(self.redis)
        limiter = Limiter(self.redis, horizon_seconds=s.reserve_horizon_seconds)
        r = self.runner = JobRunner(s, self.table, limiter, self.store, self.client, Parking(self.redis), self.routing)
        self.chooser = RouteChooser(self.routing, limiter, r.parking, r.backlog, r.learned, self.redis)

    def run_chunk(self, batch_id: str, custom_ids: Sequence[str], owner: str | None = None) -> ChunkReport:
        """Run a chunk's jobs to an outcome or a deferral; blocks the calling (Celery) thread.

        ``owner`` (the message id) names the run that holds the jobs' leases; each run gets an
        owner of its own, so a copy of the message delivered again meanwhile cannot run them.
        Raises ``WorkerStopping`` when the worker's shutdown cancelled the chunk.
        """
        run = self._tracked(batch_id, custom_ids, run_owner(owner))
        return asyncio.run_coroutine_threadsafe(run, self._loop).result()

    def fail_jobs(self, batch_id: str, custom_ids: Sequence[str], code: str, message: str) -> int:
        """Store an error outcome ``code``/``message`` for each job without one (a dead-lettered
        chunk); returns how many were stored. Works from the stored ids alone: the jobs' own
        records may be what made the chunk fail."""

        async def fail() -> int:
            line = {cid: records.error_line(cid, code, message) for cid in custom_ids}
            stored = await asyncio.gather(*(self.store.store(batch_id, cid, Outcome("error", line[cid]))
                                            for cid in custom_ids))
            return sum(1 for s in stored if s)

        return asyncio.run_coroutine_threadsafe(fail(), self._loop).result()

    def begin_shutdown(self, grace: float) -> None:
        """Cancel every running chunk ``grace`` seconds from now (and any that starts later).

        Non-blocking, safe from a signal handler: the work is scheduled on the engine's loop.
        """
        def cancel_all() -> None:
            self._stopping.set()
            for task in list(self._chunks):
                task.cancel()
            if self._chunks:
                log.warning("shutdown: %d chunk(s) cancelled after the %.0f s grace period", len(self._chunks), grace)

        self._loop.call_soon_threadsafe(self._loop.call_later, max(0.0, grace), cancel_all)

    async def _tracked(self, batch_id: str, custom_ids: Sequence[str], owner: str) -> ChunkReport:
        if self._stopping.is_set():
            raise WorkerStopping("the worker is shutting down")
        task = asyncio.current_task()
        assert task is not None
        self._chunks.add(task)
        try:
            return await self._run_chunk(batch_id, custom_ids, owner)
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
            # The jobs' calls were cancelled: let the next run take them at once, not after the lease.
            await asyncio.shield(self.leases.release(batch_id, owner, custom_ids))
            raise WorkerStopping(f"chunk of {batch_id} cancelled at shutdown") from None
        except Exception:
            # Mostly Redis going away: the chunk is given back, and its next run must not wait out
            # this run's leases. Redis may still be away, so keep trying while they would last.
            await self._release_when_possible(batch_id, owner, custom_ids)
            raise
        finally:
            self._chunks.discard(task)

    async def _release_when_possible(self, batch_id: str, owner: str, custom_ids: Sequence[str]) -> None:
        """Release the leases, retrying (0.2 s doubling to 2 s) for as long as they would last."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, max=2.0),
            stop=stop_after_delay(JOB_LEASE_SECONDS) | stop_when_event_set(self._stopping),
            reraise=True,
        )
        try:
            await retrying(self.leases.release, batch_id, owner, custom_ids)
        except Exception as exc:  # past the lease's life it has expired anyway
            log.warning("leases of a failed chunk of %s left to expire: %s", batch_id, exc)

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
        lease = min(JOB_LEASE_SECONDS, self.settings.visibility_timeout)  # a copy never waits longer than the broker
        claimed = await self.store.claim_pending(batch_id, custom_ids, owner, lease)
        report.skipped = len(custom_ids) - len(claimed)
        if report.skipped:
            # Jobs another live run holds come back later; dropped, a killed run's would be lost.
            mine = {job.custom_id for job, _ in claimed}
            others = [cid for cid in custom_ids if cid not in mine]
            await self.leases.recheck_later(batch_id, owner, others, min(lease / 2, 30.0))
        backlog = self.runner.backlog
        held: list[str] = []  # the pairs this chunk holds a slot for (fair slots, worker.backlog)
        refs = [job_ref(batch_id, job.custom_id) for job, _ in claimed]
        try:
            await self.chooser.assign(batch_id, state.account, [job for job, _ in claimed])  # several routes
            claimed, report.deferred = await self._admit(state, claimed, held)
            renewer = self._loop.create_task(
                self._renew(batch_id, owner, [job.custom_id for job, _ in claimed], lease)
            )
            # Every job settles before an error is raised: the message is then given back with no
            # job of this run still calling upstream in the background.
            try:
                done = await asyncio.gather(
                    *(self.runner.run(state, job, started) for job, started in claimed), return_exceptions=True
                )
            finally:
                renewer.cancel()
        finally:
            backlog.release(job_ref(batch_id, job.custom_id) for job, _ in claimed)
            backlog.let_go(held)
            self.routing.forget(refs)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        report.stored = sum(1 for d in done if d)
        report.deferred += len(done) - report.stored
        return report

    async def _admit(self, state: BatchState, claimed: list[Claimed], held: list[str]) -> tuple[list[Claimed], int]:
        """The claimed jobs to run now, and how many were deferred instead: those of a pair that
        already has more than ``defer_after`` seconds of work waiting in this worker, or holds its
        share of the slots (``worker.backlog``), so that the chunk does not hold a slot that
        another pair's chunk could use; they are booked to come back at their turn. The pairs
        admitted are added to ``held`` (a slot each, until the chunk ends)."""
        by_model: dict[tuple[str | None, str, str], list[Claimed]] = defaultdict(list)
        for item in claimed:  # grouped by route too: each route's jobs wait for its own bucket
            route = self.routing.route_name(item[0], state.batch_id)
            by_model[item[0].account, item[0].model, route].append(item)
        admitted: list[Claimed] = []
        deferred = 0
        backlog, learned = self.runner.backlog, self.runner.learned
        patience = self.settings.defer_after_seconds
        for (_, model, _), jobs in by_model.items():
            try:
                target = self.routing.target(state.account, jobs[0][0], state.batch_id)
            except InvalidRequestError:
                target = None
            if target is None or target.refused is not None:
                admitted += jobs  # the runner fails an unknown model, defers a refused account's jobs at once
                continue
            spec, account = target.spec, target.account
            key = keys.bucket_key(account, spec.name)
            pair = pair_field(account, spec.name)
            ahead, limits = backlog.ahead(key)
            limits = limits or learned.limits(pair, spec)
            rule = learned.rule(pair, spec)
            costs = [job.charge_under(rule) for job, _ in jobs]
            # A job charging more than the TPM limit fails at once in the runner (request_too_large):
            # counted as waiting work it would price every schedule behind it (9,000 tokens at
            # 6,000 TPM: 90 s) and defer the pair's other jobs for a minute.
            too_large = [item for item, cost in zip(jobs, costs, strict=True) if cost > limits.tpm]
            if too_large:
                admitted += too_large
                kept = [(item, cost) for item, cost in zip(jobs, costs, strict=True) if cost <= limits.tpm]
                jobs, costs = [item for item, _ in kept], [cost for _, cost in kept]
                if not jobs:
                    continue
            # While the limits are a guess (slow start: the server has not announced them) no wait
            # is judged by them, but the pair holds at most half of the slots: the others stay for
            # pairs not seen yet, whose chunks may be queued behind its own.
            slots = self.settings.worker_slots
            fits = limits.slow_start or ahead <= patience
            if fits and backlog.within_share(key, max(1, slots // 2) if limits.slow_start else slots):
                backlog.hold(key)
                held.append(key)  # admitted whole: each job keeps its place (backlog.admit)
                admitted += jobs
                backlog.admit(key, limits, {job_ref(state.batch_id, job.custom_id): cost
                                            for (job, _), cost in zip(jobs, costs, strict=True)},
                              keep_place=not limits.slow_start)
                continue
            # No schedule is priced by a guess: configured limits lower than the account's
            # deferred most of a batch for tens of seconds. It asks again soon, once they may be known.
            refs = [job_ref(state.batch_id, job.custom_id) for job, _ in jobs]
            delay = MIN_PATIENCE_SECONDS if limits.slow_start else backlog.schedule(key, limits, costs, patience, refs)
            log.debug("fair slots: %d %s jobs deferred %.1f s on %s (%.1f s of work waiting here, fits %s)", len(jobs),
                      model, delay, key, ahead, fits)
            await asyncio.gather(*(self.store.defer(state.batch_id, job.custom_id, delay) for job, _ in jobs))
            for _ in jobs:
                metrics.deferred(spec.name, account, Deferral.CAPACITY.value)
            deferred += len(jobs)
        return admitted, deferred

    async def _renew(self, batch_id: str, owner: str, custom_ids: list[str], lease: float) -> None:
        """Keep this run's leases alive while it runs: a run may outlast one lease (retries of long calls)."""
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.leases.renew(batch_id, owner, custom_ids, lease)
            except Exception as exc:  # Redis away for a moment: the next renewal may work
                log.warning("lease renewal for %s failed: %s", batch_id, exc)
