"""Metrics of the jobs and chunks of a worker process: waits for capacity, retries, deferrals,
stored outcomes and how long they took from submission, chunk redeliveries, busy slots.

These counts are what this process saw; the exact totals (what Redis stored) are the exporter's
``ratequeue_stored_*`` counters, which survive a killed worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

from ratequeue.worker.metrics_core import PAIR, bounded, labels, never_raises, on_new_pair, pair

CAPACITY_WAIT = Histogram(
    "ratequeue_capacity_wait_seconds",
    "Time a request waited for the shared bucket before it was sent (a job deferred instead is not observed).",
    PAIR,
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
RETRIES = Counter("ratequeue_retries_total", "Upstream attempts that will be retried, by reason.", [*PAIR, "reason"])
DEFERRALS = Counter(
    "ratequeue_deferrals_total",
    "Jobs moved to the deferred set: reason capacity (none soon), backoff (long retry wait) or parked (pair paused).",
    [*PAIR, "reason"],
)
JOBS = Counter("ratequeue_jobs_total", "Jobs whose outcome was stored: completed or failed.", ["model", "outcome"])
JOB_FAILURES = Counter("ratequeue_job_failures_total", "Failed jobs by error code.", ["model", "code"])
JOB_DURATION = Histogram(
    "ratequeue_job_duration_seconds",
    "Time from a job's submission (its batch's created_at) to its stored outcome: completed or failed.",
    [*PAIR, "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400),
)
FILTERED_OUTPUTS = Counter(
    "ratequeue_filtered_outputs_total",
    "Completed jobs whose output the provider's content filter withheld (finish_reason content_filter, Azure).",
    ["model"],
)
OUTCOMES_HELD = Gauge(
    "ratequeue_outcomes_held",
    "Paid answers held in worker memory because Redis cannot take them now (down, loading or full).",
    multiprocess_mode="livesum",
)
DEAD_LETTERED = Counter(
    "ratequeue_dead_lettered_chunks_total",
    "Chunk messages that failed RATEQUEUE_MAX_CHUNK_FAILURES times: their jobs failed as chunk_failed.",
)
CHUNKS_RECLAIMED = Counter(
    "ratequeue_chunks_reclaimed_total",
    "Chunk messages of workers that missed their heartbeats, given back to the queue by a reaper.",
)
CHUNKS_REDELIVERED = Counter(
    "ratequeue_chunks_redelivered_total",
    "Chunk messages this worker received again (given back by a dead worker, a shutdown or a failed run).",
)
WORKER_SLOTS = Gauge(
    "ratequeue_worker_slots", "Chunks this worker can run at once (its pool's concurrency).",
    multiprocess_mode="livesum",
)
WORKER_BUSY_SLOTS = Gauge(
    "ratequeue_worker_busy_slots", "Chunks this worker is running now.", multiprocess_mode="livesum",
)

RETRY_REASONS = ("rate_limit_requests", "rate_limit_tokens", "server_error", "timeout", "connection")


@on_new_pair
def _zero_series(model: str, account: str) -> None:
    labels(CAPACITY_WAIT, model, account)
    for reason in RETRY_REASONS:
        labels(RETRIES, model, account, reason)
    for reason in ("capacity", "backoff", "parked"):
        labels(DEFERRALS, model, account, reason)
    for outcome in ("completed", "failed"):
        labels(JOBS, model, outcome)
        labels(JOB_DURATION, model, account, outcome)


@never_raises
def waited_for_capacity(model: str, account: str, seconds: float) -> None:
    """A request was granted capacity after waiting `seconds` at its bucket's gate."""
    labels(CAPACITY_WAIT, model, account).observe(max(seconds, 0.0))


@never_raises
def retry(model: str, account: str, reason: str) -> None:
    """An attempt failed and will be retried; `reason` is the policy's (``server_error``, ...)."""
    labels(RETRIES, model, account, bounded("reason", reason)).inc()


@never_raises
def deferred(model: str, account: str, reason: str) -> None:
    """A job was moved to the deferred set: `reason` ``capacity``, ``backoff`` or ``parked``."""
    labels(DEFERRALS, model, account, bounded("deferral", reason)).inc()


@never_raises
def job_finished(
    model: str, ok: bool, code: str = "", account: str | None = None, submitted_at: float | None = None
) -> None:
    """A job's outcome was stored (count it once: only when the store said it was new): a result
    (`ok`) or an error line with error `code`. With its batch's `account` and `submitted_at` (s
    since epoch, the batch's ``created_at``) known, the time it took is observed too."""
    outcome = "completed" if ok else "failed"
    labels(JOBS, model, outcome).inc()
    if not ok:
        labels(JOB_FAILURES, model, bounded("code", code or "unknown")).inc()
    if account is not None and submitted_at is not None:
        pair(model, account)
        labels(JOB_DURATION, model, account, outcome).observe(max(time.time() - submitted_at, 0.0))


@never_raises
def output_filtered(model: str) -> None:
    """A completed job's answer was withheld by the content filter (a filtered prompt is a failed job,
    counted under ``ratequeue_job_failures_total{code="content_filter"}``)."""
    labels(FILTERED_OUTPUTS, model).inc()


@never_raises
def outcomes_held(change: int) -> None:
    """Count ``change`` more (or fewer) paid answers waiting in memory for Redis to take them."""
    OUTCOMES_HELD.inc(change)


@never_raises
def chunk_dead_lettered() -> None:
    """Count one dead-lettered chunk."""
    DEAD_LETTERED.inc()


@never_raises
def chunks_reclaimed(count: int) -> None:
    """Count ``count`` chunks taken back from a dead worker."""
    CHUNKS_RECLAIMED.inc(count)


@never_raises
def chunk_redelivered() -> None:
    """Count one chunk message that came with kombu's ``redelivered`` flag."""
    CHUNKS_REDELIVERED.inc()


@never_raises
def set_slots(slots: int) -> None:
    """Publish the worker's slots (its pool's concurrency), from the process that serves /metrics."""
    WORKER_SLOTS.set(slots)


@contextlib.contextmanager
def busy_slot() -> Iterator[None]:
    """Count one slot busy while the enclosed chunk runs."""
    WORKER_BUSY_SLOTS.inc()
    try:
        yield
    finally:
        WORKER_BUSY_SLOTS.dec()
