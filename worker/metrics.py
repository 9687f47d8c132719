"""Prometheus metrics of a worker process: what the upstream API answered, what it accepted and
cost, how long jobs took, what is in flight, how Redis answered.

The worker records every metric through this module (``from ratequeue.worker import metrics``);
the metrics live in small modules by subject: ``metrics_upstream`` (answers, limits, the
server's remaining/reset view), ``metrics_jobs`` (waits, retries, deferrals, outcomes, chunks,
slots), ``metrics_redis`` (Redis command timings, measured by the clients), with what they share
in ``metrics_core``. Every function is cheap and never raises: a metric must never fail a job.

Names follow ``ratequeue_<thing>_<unit>`` (counters end in ``_total``, times are seconds). Labels
are few and closed: ``model``, ``account`` (the 12-hex fingerprint of
``ratequeue.config.values.account_fingerprint``, never a key), and small fixed vocabularies
(``outcome``, ``status_class``, ``kind``, ``reason``, ``type``, ``direction``, ``operation``).
Free-form values (an upstream error code, a retry reason) are folded into ``other`` past a bound.

The series the dashboard and the alerts divide or ``rate()`` over are created at zero for each
configured (model, account) pair when the worker starts (:func:`start_pairs`), and for any other
pair when it is first seen: a counter whose series appears with its first event loses that
event to ``rate()`` (counters read about 2% low: issue 12, finding 6).

What Redis knows (queue depth, batches, bucket levels, parked pairs, live workers, the exact
stored totals) is not here: ``producer.exporter`` publishes it once for the whole deployment.
Serving these metrics, and the prefork pool's multi-process mode, are in ``worker.metrics_server``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ratequeue.worker import metrics_redis
from ratequeue.worker.metrics_core import MAX_VALUES as _MAX_VALUES
from ratequeue.worker.metrics_core import bounded as _bounded
from ratequeue.worker.metrics_core import log, pair, status_class
from ratequeue.worker.metrics_jobs import (
    CHUNKS_RECLAIMED,
    CHUNKS_REDELIVERED,
    DEAD_LETTERED,
    OUTCOMES_HELD,
    busy_slot,
    chunk_dead_lettered,
    chunk_redelivered,
    chunks_reclaimed,
    deferred,
    job_finished,
    outcomes_held,
    output_filtered,
    retry,
    set_slots,
    waited_for_capacity,
)
from ratequeue.worker.metrics_jobs import (
    RETRY_REASONS as _RETRY_REASONS,
)
from ratequeue.worker.metrics_upstream import (
    RATE_LIMIT_TYPES as _RATE_LIMIT_TYPES,
)
from ratequeue.worker.metrics_upstream import (
    accepted,
    cost_usd,
    in_flight,
    record_response,
    server_view,
    set_charge_rule,
    set_concurrency_window,
    set_limits,
)

__all__ = [
    "CHUNKS_RECLAIMED",
    "CHUNKS_REDELIVERED",
    "DEAD_LETTERED",
    "OUTCOMES_HELD",
    "_MAX_VALUES",
    "_RATE_LIMIT_TYPES",
    "_RETRY_REASONS",
    "_bounded",
    "accepted",
    "busy_slot",
    "chunk_dead_lettered",
    "chunk_redelivered",
    "chunks_reclaimed",
    "cost_usd",
    "deferred",
    "in_flight",
    "job_finished",
    "outcomes_held",
    "output_filtered",
    "record_response",
    "retry",
    "server_view",
    "set_charge_rule",
    "set_concurrency_window",
    "set_limits",
    "set_slots",
    "start_pairs",
    "status_class",
    "waited_for_capacity",
]


def start_pairs(pairs: Iterable[tuple[str, str]]) -> None:
    """At worker start: every configured (model, account)'s series at zero, and each Redis
    operation's. Never raises."""
    try:
        for model, account in pairs:
            pair(model, account)
        metrics_redis.zero_series()
    except Exception:  # pragma: no cover - a metric must never stop a worker
        log.exception("metrics: start_pairs failed")
