"""The exporter's view of the batches: their statuses, recent costs, and each unfinished batch's
jobs without an outcome per model, the figures ETA and stall are computed from.

Per model, from the batch's counters hash (``keys.batch_models``, written at submit and with each
stored outcome): jobs - completed - failed. So a scrape reads one small hash per unfinished
batch, never its jobs: its cost does not grow with the number of jobs pending. A batch in a final
status never changes: read once and remembered.

The oldest pending job's age is its batch's age (score in ``rq:batches``): every job of a batch is
submitted when the batch is, and a job without an outcome has waited since then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.producer.model_progress import ModelCounts, counts_of, model_counters

__all__ = ["BATCH_STATUSES", "RECENT_BATCHES", "BatchReader", "OpenBatch", "Work", "number"]

RECENT_BATCHES = 20
BATCH_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired"
)
_FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
_PAGE = 500
_META = ["status", "cost_usd", "account", "paused"]


def number(value: bytes | str | None) -> float:
    """A Redis reply as a number; 0 when missing or unreadable."""
    try:
        return float(text(value or 0))
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class OpenBatch:
    """An unfinished batch: its account, whether it is paused, when it was submitted (s since
    epoch) and its counts per model."""

    batch_id: str
    account: str
    paused: bool
    created: float
    models: dict[str, ModelCounts]


@dataclass
class Work:
    """What the unfinished batches still have to do, and when the scrape read it (Redis's clock)."""

    now: float
    batches: list[OpenBatch] = field(default_factory=list)

    def pending(self) -> dict[str, int]:
        """Jobs without an outcome per model of the unfinished batches (0 for a model done)."""
        totals: dict[str, int] = {}
        for batch in self.batches:
            for model, counts in batch.models.items():
                totals[model] = totals.get(model, 0) + counts.remaining
        return totals

    def single_models(self) -> dict[bytes, str]:
        """Batch id (bytes, as Redis replies) -> its model, for the unfinished batches of one model."""
        return {b.batch_id.encode(): next(iter(b.models)) for b in self.batches if len(b.models) == 1}


class BatchReader:
    """Reads the batches at each scrape, remembering those in a final status."""

    def __init__(self) -> None:
        self._final: dict[str, tuple[str, float]] = {}  # batch id -> (final status, cost): never change

    def read(self, client: redis.Redis, now: float) -> tuple[list[GaugeMetricFamily], Work]:
        replies: Any = client.zrange(keys.batches_index(), 0, -1, withscores=True)
        index = [(text(i), float(score)) for i, score in replies]
        ids = [batch_id for batch_id, _ in index]
        live = set(ids)
        for gone in [i for i in self._final if i not in live]:
            del self._final[gone]
        counts = dict.fromkeys(BATCH_STATUSES, 0)
        costs: dict[str, float] = {}
        work = Work(now)
        unread = [(i, created) for i, created in index if i not in self._final]
        for start in range(0, len(unread), _PAGE):
            page = unread[start : start + _PAGE]
            pipe = client.pipeline(transaction=False)
            for batch_id, _ in page:
                pipe.hmget(keys.batch_meta(batch_id), _META)
                pipe.hgetall(keys.batch_models(batch_id))
            replies = pipe.execute()
            for (batch_id, created), (status, cost, account, paused), raw in zip(
                page, replies[::2], replies[1::2], strict=True
            ):
                if status is None:
                    continue  # deleted while we read
                name = text(status)
                costs[batch_id] = number(cost)
                if name in _FINAL:
                    self._final[batch_id] = (name, costs[batch_id])
                    continue
                shown = name if name in counts else "other"
                counts[shown] = counts.get(shown, 0) + 1
                models = {m: counts_of(c) for m, c in model_counters(raw).items()}
                work.batches.append(
                    OpenBatch(batch_id, text(account or ""), text(paused or "") == "1", created, models)
                )
        for status, _cost in self._final.values():
            counts[status] += 1
        by_status = _labelled("ratequeue_batches", "Batches by status.", ["status"],
                              ((n, [s]) for s, n in counts.items()))
        recent = GaugeMetricFamily(
            "ratequeue_recent_batch_cost_usd", f"Spend in USD of each of the {RECENT_BATCHES} newest batches.",
            labels=["batch_id"],
        )
        for batch_id in ids[-RECENT_BATCHES:]:
            cost_usd = self._final[batch_id][1] if batch_id in self._final else costs.get(batch_id)
            if cost_usd is not None:
                recent.add_metric([batch_id], cost_usd)
        return [by_status, recent, *_pending_families(work)], work


def _labelled(name: str, doc: str, labels: list[str], samples: Iterable[tuple[float, list[str]]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for value, label_values in samples:
        family.add_metric(label_values, value)
    return family


def _pending_families(work: Work) -> list[GaugeMetricFamily]:
    oldest: dict[str, float] = {}
    for batch in work.batches:
        for model, counts in batch.models.items():
            if counts.remaining:
                oldest[model] = min(oldest.get(model, batch.created), batch.created)
    return [
        _labelled(
            "ratequeue_pending_jobs", "Jobs of unfinished batches without an outcome yet (in flight or waiting).",
            ["model"], ((n, [m]) for m, n in sorted(work.pending().items())),
        ),
        _labelled(
            "ratequeue_oldest_pending_job_age_seconds",
            "Age of the oldest job without an outcome: since its batch was submitted.",
            ["model"], ((max(0.0, work.now - t), [m]) for m, t in sorted(oldest.items())),
        ),
    ]
