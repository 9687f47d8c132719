"""The exporter's queue gauges: chunk messages in Celery's list and held unacked by workers, and
jobs in the deferred set per model.

Where a batch's jobs wait (measured for issue 12: 2 workers of 32 slots, 3,000 jobs of one model
in 60 chunks of 50, at 600 RPM): workers take every chunk message at once (one per free slot),
so Celery's list read 0 from the first sample (2.5 s after submit: 2,397 pending, 48 messages
unacked, 0 deferred); a chunk that cannot run within ``defer_after`` seconds moves its jobs into
the deferred set and is acked (10 s later: 2,317 pending, 7 unacked, 2,116 deferred, list 0).
``ratequeue_queue_depth_messages`` was right (the dashboard's "Queue depth 0 while 2,465 jobs
were pending"): it counts messages waiting for a worker slot, which is rarely where the work is.
Work still to do is ``ratequeue_pending_jobs``; of it, the part waiting out a deferral is
``ratequeue_deferred_jobs``, the part in workers' hands ``ratequeue_unacked_messages`` (chunks).

The deferred set holds ``<batch_id>\\t<custom_id>`` members, without the model. A scrape
attributes them without reading jobs in the usual cases: when only one model has pending jobs,
all of them (``ZCARD``); else members are read (``ZRANGE``) and a batch of one model gives its
members that model. Only a batch of several models needs its jobs' models: read once per member
(``HMGET`` of the job) and remembered while the member stays deferred.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import orjson
import redis
from prometheus_client.core import GaugeMetricFamily

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.producer.exporter_work import Work
from ratequeue.queue import QUEUE

__all__ = ["QueueReader"]

_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + sep + priority for priorities 1-9
_PAGE = 1000


class QueueReader:
    """Reads Celery's queue and the deferred set at each scrape; remembers deferred jobs' models."""

    def __init__(self, queues: Sequence[str] = (QUEUE,)) -> None:
        self._queues = list(queues)  # the shared queue and each account's own (queue.worker_queues)
        self._models: dict[bytes, str | None] = {}  # deferred member of a several-model batch -> model

    def read(self, client: redis.Redis, work: Work) -> list[GaugeMetricFamily]:
        names = [[queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in range(1, 10))] for queue in self._queues]
        now_ms = int(work.now * 1000)
        pipe = client.pipeline(transaction=False)
        for name in (name for of_queue in names for name in of_queue):
            pipe.llen(name)
        pipe.hlen("unacked")
        pipe.zcard(keys.deferred_jobs())
        pipe.zcount(keys.deferred_jobs(), "-inf", now_ms)
        *lengths, unacked, deferred, due = pipe.execute()
        depth = GaugeMetricFamily(
            "ratequeue_queue_depth_messages", "Chunk messages waiting in a Celery queue for a worker slot.",
            labels=["queue"],
        )
        for i, queue in enumerate(self._queues):
            depth.add_metric([queue], float(sum(lengths[i * 10 : i * 10 + 10])))
        by_model = GaugeMetricFamily(
            "ratequeue_deferred_jobs", "Jobs in the deferred set until capacity, a retry or a parked pair's probe.",
            labels=["model"],
        )
        for model, n in sorted(self._deferred_by_model(client, work, int(deferred)).items()):
            by_model.add_metric([model], n)
        return [
            depth,
            GaugeMetricFamily("ratequeue_unacked_messages", "Chunk messages delivered to a worker and not yet acked.",
                              value=unacked),
            by_model,
            GaugeMetricFamily("ratequeue_deferred_due_jobs", "Deferred jobs already due (not yet re-enqueued).",
                              value=due),
        ]

    def _deferred_by_model(self, client: redis.Redis, work: Work, deferred: int) -> dict[str, int]:
        counts = dict.fromkeys(work.pending(), 0)
        if deferred == 0:
            self._models.clear()
            return counts
        if len(counts) == 1:
            self._models.clear()
            return {next(iter(counts)): deferred}
        found: Counter[str] = Counter()
        unknown: dict[str, list[bytes]] = {}  # batch id -> members whose model is to be read
        models: dict[bytes, str | None] = {}
        singles = work.single_models()
        members: list[bytes] = client.zrange(keys.deferred_jobs(), 0, -1)  # type: ignore[assignment]
        for member in members:
            batch_id, _, _ = member.partition(DEFERRED_SEP.encode())
            single = singles.get(batch_id)
            if single is not None:
                found[single] += 1
            elif member in self._models:
                models[member] = self._models[member]
            else:
                unknown.setdefault(text(batch_id), []).append(member)
        for unread_batch, unread in unknown.items():
            for start in range(0, len(unread), _PAGE):
                page = unread[start : start + _PAGE]
                ids = [m.partition(DEFERRED_SEP.encode())[2] for m in page]
                replies: list[bytes | None] = client.hmget(keys.batch_jobs(unread_batch), ids)  # type: ignore[assignment]
                for member, raw in zip(page, replies, strict=True):
                    models[member] = _model_of(raw)
        self._models = models  # only members still deferred are remembered
        found.update(m for m in models.values() if m is not None)
        counts.update(found)
        return counts


def _model_of(raw: bytes | None) -> str | None:
    """The model of a stored job (``StoredJob.dumps``); None when it is gone or unreadable."""
    if raw is None:
        return None
    try:
        model = orjson.loads(raw).get("m")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, str) else None
