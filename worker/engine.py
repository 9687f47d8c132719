"""The per-process job engine: one asyncio loop that runs every job the Celery task threads hand it.

Why this shape: an LLM call takes seconds, so a worker must hold hundreds of calls in flight.
Celery's prefork pool gives one call per process; its gevent pool caps near 100 tasks/s with
acks_late and one message per job costs ~1 ms of CPU. So a Celery message carries a *chunk* of
jobs of one model, a small threads pool (``worker_slots``) receives chunks, and every thread hands
its chunk to this loop and blocks until the chunk's jobs are stored or deferred. The loop holds up
to ``max_in_flight`` upstream calls at once (asyncio + sharded httpx clients), so one process keeps
hundreds of calls in flight at the cost of one thread per chunk, not per call.

Per job: wait for the shared bucket (the gate), call, reconcile the bucket with what the server
said, then store the outcome once, retry, or defer. A job that cannot get capacity soon is deferred
to Redis and its chunk slot released, so a throttled model never holds capacity other models need.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from config.models import ModelSpec, ModelTable
from config.settings import Settings
from worker import keys, records
from worker.errors import RequestTooLargeError, UnknownModelError
from worker.gate import CapacityTimeout, GateRegistry
from worker.jobs import StoredJob
from worker.limiter import BucketLimits, Limiter
from worker.policy import Backoff, Classified, Verdict, classify
from worker.store import BatchState, JobStore, Outcome
from worker.upstream import Timeouts, UpstreamClient, UpstreamResponse
from worker.usage import Usage, usage_of

log = logging.getLogger(__name__)


@dataclass
class ChunkReport:
    stored: int = 0
    deferred: int = 0
    skipped: int = 0  # already had an outcome (a redelivered chunk)


class Engine:
    """Owns the event loop thread, the Redis and HTTP clients and the gates of one process."""

    def __init__(self, settings: Settings, table: ModelTable) -> None:
        self.settings = settings
        self.table = table
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ratequeue-engine", daemon=True)
        self._thread.start()
        self._backoff = Backoff()
        asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result()

    async def _setup(self) -> None:
        s = self.settings
        pool = aioredis.BlockingConnectionPool.from_url(
            s.redis_url or "redis://127.0.0.1:6379/0", max_connections=64, timeout=30
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.limiter = Limiter(self.redis, horizon_seconds=s.reserve_horizon_seconds)
        self.gates = GateRegistry(self.limiter)
        self.store = JobStore(self.redis)
        self.client = UpstreamClient(
            s.base_url,
            s.api_key.reveal() if s.api_key else None,
            s.organization,
            s.project,
            Timeouts(connect=s.connect_timeout, read=s.read_timeout),
        )
        self._in_flight = asyncio.Semaphore(s.max_in_flight)

    def run_chunk(self, batch_id: str, custom_ids: Sequence[str]) -> ChunkReport:
        """Run a chunk's jobs to an outcome or a deferral; blocks the calling (Celery) thread."""
        return asyncio.run_coroutine_threadsafe(self._run_chunk(batch_id, custom_ids), self._loop).result()

    def close(self) -> None:
        async def _close() -> None:
            await self.client.aclose()
            await self.redis.aclose()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _run_chunk(self, batch_id: str, custom_ids: Sequence[str]) -> ChunkReport:
        report = ChunkReport()
        state = await self.store.batch_state(batch_id)
        if state is None:
            log.warning("chunk for unknown batch %s dropped (%d jobs)", batch_id, len(custom_ids))
            return report
        owner = uuid.uuid4().hex
        jobs = await self.store.claim_pending(batch_id, custom_ids, owner, self.settings.visibility_timeout)
        report.skipped = len(custom_ids) - len(jobs)
        done = await asyncio.gather(*(self._run_job(state, job) for job in jobs))
        report.stored = sum(1 for d in done if d)
        report.deferred = len(done) - report.stored
        return report

    def limits_for(self, spec: ModelSpec) -> BucketLimits:
        return BucketLimits(spec.rpm, spec.tpm, self.settings.burst_seconds)

    async def _run_job(self, state: BatchState, job: StoredJob) -> bool:
        """Run one job; True when its outcome is stored, False when it was deferred."""
        stop_code = self._stop_code(state)
        if stop_code:
            message = "the batch was cancelled" if stop_code == "batch_cancelled" else "the batch expired"
            await self._fail(state, job, stop_code, f"{message} before this request ran")
            return True
        try:
            spec = self.table.get(job.model)
        except UnknownModelError as exc:
            await self._fail(state, job, "model_not_found", str(exc), param="body.model")
            return True
        if job.charge > spec.tpm:
            err = RequestTooLargeError(job.charge, spec.tpm, spec.name)
            await self._fail(state, job, err.code, err.reason, param="body")
            return True
        limits = self.limits_for(spec)
        key = keys.bucket_key(state.account, spec.name)
        gate = self.gates.get(key, limits)
        while True:
            try:
                await gate.acquire(job.charge, timeout=self.settings.defer_after_seconds)
            except CapacityTimeout as exc:
                await self.store.defer(state.batch_id, job.custom_id, max(exc.retry_in, 0.5))
                return False
            async with self._in_flight:
                resp = await self.client.post(job.url, job.body, f"{state.batch_id}/{job.custom_id}")
            verdict = classify(resp)
            usage = usage_of(resp.body) if verdict.verdict is Verdict.SUCCESS else None
            await self._reconcile(key, limits, spec, job, resp, verdict, usage)
            log.info(
                "upstream model=%s charge=%d status=%s reason=%s latency=%.3fs request_id=%s",
                spec.name, job.charge, resp.status, verdict.reason, resp.elapsed, resp.request_id,
            )
            if verdict.verdict is Verdict.SUCCESS:
                await self._succeed(state, job, spec, resp, usage or Usage())
                return True
            if verdict.verdict is Verdict.FAIL:
                await self._fail_upstream(state, job, resp, verdict)
                return True
            message = str(resp.error.get("message") or resp.transport_error or f"HTTP {resp.status}")
            attempts = await self.store.record_attempt(state.batch_id, job.custom_id, resp.status, message)
            if attempts >= self.settings.max_attempts:
                history = {"attempts": attempts, "last_status": resp.status, "last_message": message[:500]}
                await self._fail_upstream(state, job, resp, verdict, history)
                return True
            delay = self._backoff.delay(attempts, verdict)
            if verdict.reason.startswith("rate_limit"):
                # One 429 pauses every worker on every host: the gate honours the shared time.
                await self.limiter.set_not_before(key, delay)
                continue
            if delay > self.settings.defer_after_seconds:
                await self.store.defer(state.batch_id, job.custom_id, delay)
                return False
            await asyncio.sleep(delay)

    def _stop_code(self, state: BatchState) -> str | None:
        if state.status in ("cancelling", "cancelled"):
            return "batch_cancelled"
        if state.status == "expired" or (state.expires_at is not None and time.time() > state.expires_at):
            return "batch_expired"
        return None

    async def _reconcile(
        self,
        key: str,
        limits: BucketLimits,
        spec: ModelSpec,
        job: StoredJob,
        resp: UpstreamResponse,
        verdict: Classified,
        usage: Usage | None,
    ) -> None:
        """Correct the shared bucket with what the server reported about this request."""
        token_delta = 0
        if verdict.reason.startswith("rate_limit"):
            token_delta = job.charge  # a refused request is not charged tokens (it still counts as a request)
        elif usage is not None and usage.prompt_tokens and spec.charge_rule == "sum":
            # Under the sum rule the server charged its own prompt count plus the same reserved
            # output, so the difference of the prompt counts is exactly what we over/under-charged.
            token_delta = job.prompt_tokens - usage.prompt_tokens
        remaining_tokens = _remaining(resp, "tokens")
        remaining_requests = _remaining(resp, "requests")
        if token_delta == 0 and remaining_tokens is None and remaining_requests is None:
            return
        await self.limiter.reconcile(
            key,
            limits,
            token_delta=token_delta,
            remaining_tokens=remaining_tokens,
            remaining_requests=remaining_requests,
        )

    async def _succeed(
        self, state: BatchState, job: StoredJob, spec: ModelSpec, resp: UpstreamResponse, usage: Usage
    ) -> None:
        line = records.output_line(job.custom_id, resp.status, resp.request_id, resp.body)
        cost = spec.cost_usd(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        outcome = Outcome("result", line, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, cost)
        await self.store.store(state.batch_id, job.custom_id, outcome)

    async def _fail_upstream(
        self,
        state: BatchState,
        job: StoredJob,
        resp: UpstreamResponse,
        verdict: Classified,
        history: dict[str, object] | None = None,
    ) -> None:
        if resp.status == 0:
            message = f"upstream unreachable: {resp.transport_error}"
            await self._fail(state, job, verdict.reason, message, history=history)
            return
        line = records.output_line(job.custom_id, resp.status, resp.request_id, resp.body)
        if history:
            line = records.error_line(
                job.custom_id,
                "max_attempts_exceeded",
                f"gave up after {history['attempts']} attempts: {history['last_message']}",
                job.line,
                history=history,
            )
        await self.store.store(state.batch_id, job.custom_id, Outcome("error", line))

    async def _fail(
        self,
        state: BatchState,
        job: StoredJob,
        code: str,
        message: str,
        param: str | None = None,
        history: dict[str, object] | None = None,
    ) -> None:
        line = records.error_line(job.custom_id, code, message, job.line, param, history)
        await self.store.store(state.batch_id, job.custom_id, Outcome("error", line))


def _remaining(resp: UpstreamResponse, what: str) -> int | None:
    """``x-ratelimit-remaining-<what>``, trusted only beside a positive ``x-ratelimit-limit-<what>``:
    Azure sends -1 or 0 as "unknown", and a missing header says nothing."""
    try:
        limit = float(resp.headers.get(f"x-ratelimit-limit-{what}", "-1"))
        remaining = int(float(resp.headers[f"x-ratelimit-remaining-{what}"]))
    except (KeyError, ValueError):
        return None
    return max(remaining, 0) if limit > 0 else None
