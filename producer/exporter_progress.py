"""Per model: when its pending jobs will be done (``ratequeue_eta_seconds``), or why they cannot
proceed (``ratequeue_stalled{model,reason}``).

The ETA is what is left (requests and charged tokens of the jobs without an outcome) over the
binding limit, by ``model_progress.limit_eta`` (the arithmetic of ``ratequeue status``): the
limits in force (learned, else configured) times the share the workers spend
(``model_progress.share_in_force``). It replaces "pending / recent completion rate", which read a
number while nothing finished (rate of the last minutes), NaN when idle, and mixed models. A
model's jobs of several accounts drain side by side: the slowest account's ETA is the model's.

Stalled, with the first reason that holds: ``no_workers`` (no heartbeat within 30 s),
``redis_full`` (memory within 2% of ``maxmemory``: outcomes cannot be stored), else every
unfinished batch with pending jobs of the model is blocked: ``paused`` (the batch) or ``parked``
(its (account, model) pair); the reason blocking more pending jobs is given (a tie: parked). A
stalled model has no ETA; work that is blocked while other work of the model proceeds is left out
of the ETA (it finishes when unblocked, which no limit tells).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

from ratequeue.producer.exporter_pairs import Parked
from ratequeue.producer.exporter_work import Work
from ratequeue.producer.model_progress import ModelCounts, ModelLimits, limit_eta

__all__ = ["STALL_REASONS", "progress_families"]

STALL_REASONS = ("no_workers", "redis_full", "parked", "paused")
FULL_AT = 0.98  # of maxmemory: Redis refuses the writes of outcomes from about there

# (account, model) -> the limits in force at the workers' share (None: a model the table lacks)
LimitsOf = Callable[[str, str], ModelLimits | None]


def progress_families(
    work: Work, parked: Parked, workers_alive: int, memory: tuple[float, float], limits_of: LimitsOf
) -> list[GaugeMetricFamily]:
    """``memory``: (used, max) bytes, max 0 when Redis has no limit."""
    stalled = GaugeMetricFamily(
        "ratequeue_stalled", "1 while the model has pending jobs and none can proceed, by reason.",
        labels=["model", "reason"],
    )
    eta = GaugeMetricFamily(
        "ratequeue_eta_seconds",
        "Time the model's pending jobs take at its binding limit; only while they can proceed.",
        labels=["model"],
    )
    used, most = memory
    global_reason = "no_workers" if workers_alive == 0 else "redis_full" if most and used >= FULL_AT * most else None
    for model, pending in sorted(work.pending().items()):
        if pending == 0:
            continue
        running, blocked = _split(work, model, parked)
        reason = global_reason or (_main_reason(blocked) if not running else None)
        for name in STALL_REASONS:
            stalled.add_metric([model, name], 1.0 if name == reason else 0.0)
        if reason is None:
            seconds = _eta(model, running, limits_of)
            if seconds is not None:
                eta.add_metric([model], seconds)
    return [stalled, eta]


def _split(work: Work, model: str, parked: Parked) -> tuple[dict[str, list[ModelCounts]], dict[str, int]]:
    """The model's pending work that can run, by account, and the pending jobs blocked, by reason."""
    running: dict[str, list[ModelCounts]] = {}
    blocked: dict[str, int] = {}
    for batch in work.batches:
        counts = batch.models.get(model)
        if counts is None or counts.remaining == 0:
            continue
        reason = "paused" if batch.paused else "parked" if (batch.account, model) in parked else None
        if reason is not None:
            blocked[reason] = blocked.get(reason, 0) + counts.remaining
        else:
            running.setdefault(batch.account, []).append(counts)
    return running, blocked


def _main_reason(blocked: dict[str, int]) -> str:
    return max(("parked", "paused"), key=lambda r: blocked.get(r, 0))


def _eta(model: str, running: dict[str, list[ModelCounts]], limits_of: LimitsOf) -> float | None:
    slowest = 0.0
    for account, parts in running.items():
        limits = limits_of(account, model)
        if limits is None:
            return None
        slowest = max(slowest, limit_eta(_merged(parts), limits)[0])
    return slowest


def _merged(parts: Iterable[ModelCounts]) -> ModelCounts:
    """Several batches' counts of one model as one (what is left adds up)."""
    total = completed = failed = charge = done = 0
    for c in parts:
        total, completed, failed = total + c.total, completed + c.completed, failed + c.failed
        charge, done = charge + c.charge, done + c.charge_done
    return ModelCounts(total, completed, failed, 0, charge, done)
