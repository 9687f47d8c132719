"""``ratequeue exporter``: the deployment's state in Redis as Prometheus gauges, published once.

Why a process of its own rather than a collector inside every worker with a Redis lock: queue
depth, batches, parked pairs, bucket levels and live workers belong to the deployment, not to a
worker, and they matter most when workers are missing (queue growing, nobody taking it). A
collector inside workers reports nothing with zero workers, and with many it needs a lock whose
holder changes (series jumping between instances, gaps at hand-over). One small exporter reads
Redis at each scrape (no background loop, never stale), right with zero or a hundred workers. Two
of them (for availability) are harmless: the dashboard and alerts take ``max`` over instances.

What a scrape reads (every key is read, never written):
- Celery's queue list (``worker.app.QUEUE``, and kombu's priority sub-lists), kombu's ``unacked``
  hash, the deferred set ``rq:deferred``;
- ``rq:batches`` and each batch's meta hash (status, counts, cost). Batches in a final status
  never change, so they are read once and remembered; cost per batch is published for the
  ``RECENT_BATCHES`` newest only (bounded cardinality), older ones are in ``ratequeue status``;
- ``rq:parked`` (field ``<account>:<model>`` -> JSON ``{reason, since, ...}``);
- every bucket ``rq:bucket:{<account>:<model>}``, peeked with the limits its workers use: the
  learned ones (``rq:learned``) when ``RATEQUEUE_LEARN_LIMITS`` is on and the server announced
  some, else this process's model table (the same environment as the workers'); models it does
  not know are skipped;
- the worker heartbeats (``worker.metrics_server.workers_key``);
- ``INFO memory`` (producer/exporter_memory.py), first: a later read failing still leaves them.
If Redis cannot be read, the scrape has only ``ratequeue_redis_up 0``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import click
import orjson
import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratequeue.config.models import ModelTable, load_model_table
from ratequeue.config.settings import Settings, load_settings
from ratequeue.errors import RatequeueError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.heartbeats import live_workers, workers_key
from ratequeue.producer.exporter_memory import memory_families
from ratequeue.redis_tls import redis_options
from ratequeue.worker.limiter import BucketLimits, SyncLimiter

log = logging.getLogger(__name__)

__all__ = ["RECENT_BATCHES", "RedisCollector", "exporter_command", "serve"]

DEFAULT_PORT = 9809
RECENT_BATCHES = 20
BATCH_STATUSES = (
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired"
)
_FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + sep + priority for priorities 1-9
_BUCKET = re.compile(r"^rq:bucket:\{([^:}]*):(.+)\}$")
_PAGE = 500
_MAX_BUCKETS = 1000  # (account, model) buckets remembered after their hash expired


def _number(value: bytes | str | None) -> float:
    try:
        return float(text(value or 0))
    except ValueError:
        return 0.0


def _gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, labels=None if value is not None else list(labels))


class RedisCollector(Collector):
    """Reads the deployment's state from Redis at every ``collect()`` (one per scrape)."""

    def __init__(
        self,
        client: redis.Redis,
        table: ModelTable,
        burst_seconds: float,
        queue: str = "ratequeue",
        learn_limits: bool = True,
    ) -> None:
        self._redis = client
        self._limiter = SyncLimiter(client)
        self._table = table
        self._burst = burst_seconds
        self._queue = queue
        self._learn = learn_limits
        self._final: dict[str, tuple[str, float]] = {}  # batch id -> (final status, cost): never change
        # Bucket keys seen before: an idle bucket's hash expires (missing = full), its series should not.
        self._buckets_seen: dict[str, None] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.perf_counter()
        memory: list[GaugeMetricFamily] = []
        try:
            # First: with Redis down this one call fails, with no further timeouts in the scrape.
            memory = memory_families(self._redis)
            families = [*self._queues(), *self._batches(), *self._parked(), *self._buckets(), *self._workers()]
            up = 1.0
        except (redis.RedisError, RatequeueError) as exc:
            log.warning("exporter: cannot read Redis: %s", exc)
            families, up = [], 0.0
        yield from memory
        yield from families
        yield _gauge("ratequeue_redis_up", "1 if the exporter's last read of Redis succeeded.", up)
        yield _gauge(
            "ratequeue_exporter_collect_seconds", "Time the last scrape took to read Redis.",
            time.perf_counter() - started,
        )

    def _queues(self) -> list[GaugeMetricFamily]:
        names = [self._queue, *(f"{self._queue}{_PRIORITY_SEP}{p}" for p in range(1, 10))]
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        pipe.hlen("unacked")
        pipe.zcard(keys.deferred_jobs())
        pipe.time()
        *lengths, unacked, deferred, (sec, usec) = pipe.execute()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        due = self._redis.zcount(keys.deferred_jobs(), "-inf", now_ms)
        depth = _gauge("ratequeue_queue_depth_messages", "Chunk messages waiting in a Celery queue.", labels=["queue"])
        depth.add_metric([self._queue], float(sum(lengths)))
        return [
            depth,
            _gauge("ratequeue_unacked_messages", "Chunk messages delivered to a worker and not yet acked.", unacked),
            _gauge("ratequeue_deferred_jobs", "Jobs parked in the deferred set until capacity or a retry.", deferred),
            _gauge("ratequeue_deferred_due_jobs", "Deferred jobs already due (not yet re-enqueued).", due),
        ]

    def _batches(self) -> list[GaugeMetricFamily]:
        ids = [text(i) for i in self._redis.zrange(keys.batches_index(), 0, -1)]
        live = set(ids)
        for gone in [i for i in self._final if i not in live]:
            del self._final[gone]
        counts = dict.fromkeys(BATCH_STATUSES, 0)
        pending = 0.0
        costs: dict[str, float] = {}
        unread = [i for i in ids if i not in self._final]
        for start in range(0, len(unread), _PAGE):
            page = unread[start : start + _PAGE]
            pipe = self._redis.pipeline(transaction=False)
            for batch_id in page:
                pipe.hmget(keys.batch_meta(batch_id), ["status", "total", "completed", "failed", "cost_usd"])
            for batch_id, (status, total, completed, failed, cost) in zip(page, pipe.execute(), strict=True):
                if status is None:
                    continue  # deleted while we read
                name = text(status)
                costs[batch_id] = _number(cost)
                if name in _FINAL:
                    self._final[batch_id] = (name, costs[batch_id])
                else:
                    pending += max(0.0, _number(total) - _number(completed) - _number(failed))
                    shown = name if name in counts else "other"
                    counts[shown] = counts.get(shown, 0) + 1
        for status, _cost in self._final.values():
            counts[status] += 1
        by_status = _gauge("ratequeue_batches", "Batches by status.", labels=["status"])
        for name, n in counts.items():
            by_status.add_metric([name], n)
        recent = _gauge(
            "ratequeue_recent_batch_cost_usd",
            f"Spend in USD of each of the {RECENT_BATCHES} newest batches.",
            labels=["batch_id"],
        )
        for batch_id in ids[-RECENT_BATCHES:]:
            cost_usd = self._final[batch_id][1] if batch_id in self._final else costs.get(batch_id)
            if cost_usd is not None:
                recent.add_metric([batch_id], cost_usd)
        pending_jobs = _gauge(
            "ratequeue_pending_jobs", "Jobs of unfinished batches without an outcome yet.", pending
        )
        return [by_status, pending_jobs, recent]

    def _parked(self) -> list[GaugeMetricFamily]:
        entries = self._redis.hgetall(keys.parked_pairs())
        since = _gauge(
            "ratequeue_pair_parked_since_timestamp_seconds",
            "When an (account, model) pair was parked (s since epoch); present only while it is.",
            labels=["account", "model", "reason"],
        )
        for field, raw in entries.items():
            account, _, model = text(field).partition(":")
            try:
                info: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                info = {}
            info = info if isinstance(info, dict) else {}
            reason = re.sub(r"[^a-z0-9_]", "_", str(info.get("reason") or "unknown").lower())[:48]
            since.add_metric([account, model, reason], _timestamp(info.get("since")))
        return [_gauge("ratequeue_parked_pairs", "(account, model) pairs parked.", len(entries)), since]

    def _buckets(self) -> list[GaugeMetricFamily]:
        docs = {
            "level_requests": "Request bucket level now.", "level_tokens": "Token bucket level now.",
            "capacity_requests": "Request bucket capacity.", "capacity_tokens": "Token bucket capacity.",
            "pause_seconds": "Time left of a pause set after a 429 (0: none).",
        }
        families = {k: _gauge(f"ratequeue_bucket_{k}", doc, labels=["model", "account"]) for k, doc in docs.items()}
        learned = {text(k): v for k, v in self._redis.hgetall(keys.learned_limits()).items()} if self._learn else {}
        for raw_key in self._redis.scan_iter(match="rq:bucket:*", count=1000):
            self._buckets_seen[text(raw_key)] = None
        while len(self._buckets_seen) > _MAX_BUCKETS:
            del self._buckets_seen[next(iter(self._buckets_seen))]
        for key in self._buckets_seen:
            match = _BUCKET.match(key)
            if not match:
                continue
            account, model = match.groups()
            try:
                spec = self._table.get(model)
            except RatequeueError:
                continue
            rpm, tpm = _learned(learned.get(f"{account}:{model}"), spec.rpm, spec.tpm)
            levels = self._limiter.peek(key, BucketLimits(rpm, tpm, self._burst))
            pause = max(0.0, levels.not_before_ms / 1000 - levels.now_us / 1e6)
            values = (levels.requests, levels.tokens, levels.request_capacity, levels.token_capacity, pause)
            for family, value in zip(families.values(), values, strict=True):
                family.add_metric([model, account], value)
        return list(families.values())

    def _workers(self) -> list[GaugeMetricFamily]:
        newest = self._redis.zrevrange(workers_key(), 0, 0, withscores=True)
        alive = live_workers(self._redis)
        return [
            _gauge("ratequeue_workers_alive", "Workers whose heartbeat is recent.", alive),
            _gauge(
                "ratequeue_worker_last_seen_timestamp_seconds", "Time of the newest worker heartbeat (0: none).",
                float(newest[0][1]) if newest else 0.0,
            ),
        ]


def _learned(raw: bytes | str | None, rpm: int, tpm: int) -> tuple[int, int]:
    """The (rpm, tpm) of a ``rq:learned`` entry (JSON ``{rpm, tpm, at}``), else the configured ones."""
    try:
        known = orjson.loads(raw) if raw else {}
        return int(known.get("rpm") or rpm), int(known.get("tpm") or tpm)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return rpm, tpm


def _timestamp(value: object) -> float:
    """Seconds since epoch from a number (s or ms) or an ISO 8601 text; 0 when unreadable."""
    if isinstance(value, int | float):
        return float(value) / 1000 if value > 1e11 else float(value)
    if isinstance(value, str):
        try:
            return _timestamp(float(value))
        except ValueError:
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return 0.0
    return 0.0


def serve(settings: Settings, port: int, addr: str = "0.0.0.0") -> int:
    """Start serving the exporter's ``/metrics`` from a daemon thread; returns the port bound."""
    # Fail a scrape fast when Redis is away (ratequeue_redis_up 0) instead of retrying past its timeout.
    client = redis.Redis.from_url(
        settings.redis_url or "redis://127.0.0.1:6379/0",
        socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1), **redis_options(settings),
    )
    registry = CollectorRegistry()
    table = load_model_table(settings)
    registry.register(RedisCollector(client, table, settings.burst_seconds, learn_limits=settings.learn_limits))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)


@click.command("exporter")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port of /metrics; 0 picks one.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
def exporter_command(port: int, host: str) -> None:
    """Publish queue depth, batches, parked pairs, bucket levels, live workers and memory from Redis."""
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bound = serve(settings, port, host)
    click.echo(f"ratequeue-exporter listening on http://{host}:{bound}/metrics", err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # PID 1 in a container ignores SIGTERM otherwise
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


if __name__ == "__main__":
    exporter_command()
