"""``ratequeue exporter``: the deployment's state in Redis as Prometheus metrics, and the workers'
metrics addresses for Prometheus' discovery.

Why a process of its own rather than a collector inside every worker with a Redis lock: queue
depth, batches, parked pairs, bucket levels and live workers belong to the deployment, not to a
worker, and they matter most when workers are missing (queue growing, nobody taking it). A
collector inside workers reports nothing with zero workers, and with many it needs a lock whose
holder changes (series jumping between instances, gaps at hand-over). One small exporter reads
Redis at each scrape (no background loop, never stale), right with zero or a hundred workers. Two
of them (for availability) are harmless: the dashboard and alerts take ``max`` over instances.

What a scrape reads (every key is read, never written), by module:
- ``INFO memory`` (exporter_memory.py), first: a later read failing still leaves them;
- the batches and their per-model counters (exporter_work.py): statuses, recent costs, pending
  jobs and the oldest one's age per model;
- Celery's queue, kombu's ``unacked`` hash, the deferred set per model (exporter_queue.py);
- parked pairs and bucket levels (exporter_pairs.py);
- worker heartbeats (exporter_workers.py), also served as ``GET /sd/workers`` (http_sd JSON);
- the totals of stored outcomes and the day's spend (exporter_totals.py);
- per model, the ETA or why it is stalled (exporter_progress.py), from the above.
If Redis cannot be read, the scrape has only ``ratequeue_redis_up 0`` (and memory, if read).
``ratequeue_exporter_collect_seconds`` is the time the scrape took.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click
import orjson
import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.models import ModelTable, load_model_table
from ratequeue.config.settings import Settings, load_settings
from ratequeue.errors import RatequeueError
from ratequeue.jobstore.heartbeats import redis_now
from ratequeue.producer.exporter_memory import memory_families
from ratequeue.producer.exporter_pairs import BucketReader, configured_pair_limits, read_parked
from ratequeue.producer.exporter_progress import progress_families
from ratequeue.producer.exporter_queue import QueueReader
from ratequeue.producer.exporter_totals import totals_families
from ratequeue.producer.exporter_work import RECENT_BATCHES, BatchReader
from ratequeue.producer.exporter_workers import sd_targets, worker_families
from ratequeue.producer.model_progress import ModelLimits, at_share, model_limits, share_in_force
from ratequeue.queue import QUEUE, worker_queues
from ratequeue.redis_tls import redis_options

log = logging.getLogger(__name__)

__all__ = ["RECENT_BATCHES", "RedisCollector", "exporter_command", "serve"]

DEFAULT_PORT = 9809
SD_PATH = "/sd/workers"


class RedisCollector(Collector):
    """Reads the deployment's state from Redis at every ``collect()`` (one per scrape)."""

    def __init__(
        self,
        client: redis.Redis,
        table: ModelTable,
        burst_seconds: float,
        queues: Sequence[str] = (QUEUE,),
        pair_limits: Mapping[str, tuple[int, int]] | None = None,
        learn_limits: bool = True,
        max_share: float = 1.0,
        daily_budget_usd: float | None = None,
    ) -> None:
        self._redis = client
        self._table = table
        self._max_share = max_share
        self._learn = learn_limits
        self._budget = daily_budget_usd
        self._batches = BatchReader()
        self._queue = QueueReader(queues)
        self._buckets = BucketReader(client, table, burst_seconds, learn_limits, pair_limits)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        memory: list[GaugeMetricFamily] = []
        try:
            # First: with Redis down this one call fails, with no further timeouts in the scrape.
            memory = memory_families(self._redis)
            families = self._read(memory)
            up = 1.0
        except (redis.RedisError, RatequeueError) as exc:
            log.warning("exporter: cannot read Redis: %s", exc)
            families, up = [], 0.0
        yield from memory
        yield from families
        yield GaugeMetricFamily("ratequeue_redis_up", "1 if the exporter's last read of Redis succeeded.", value=up)
        yield GaugeMetricFamily(
            "ratequeue_exporter_collect_seconds", "Time the last scrape took to read Redis.",
            value=time.perf_counter() - started,
        )

    def _read(self, memory: list[GaugeMetricFamily]) -> list[Metric]:
        client = self._redis
        now = redis_now(client)
        batches, work = self._batches.read(client, now)
        parked_families, parked = read_parked(client)
        workers, alive = worker_families(client)
        used, most = (_value(f) for f in memory)
        progress = progress_families(work, parked, alive, (used, most), self._limits_in_force)
        return [
            *self._queue.read(client, work), *batches, *parked_families, *self._buckets.read(client), *workers,
            *totals_families(client, self._table.names(), now, self._budget), *progress,
        ]

    def _limits_in_force(self, account: str, model: str) -> ModelLimits | None:
        """The pair's limits as its workers run them: learned (unless learning is off), at the share."""
        if self._learn:
            limits = model_limits(self._redis, self._table, account, model)
        else:
            spec = self._table.get(model) if model in self._table else None
            limits = ModelLimits(float(spec.rpm), float(spec.tpm), "configured") if spec else None
        return at_share(limits, share_in_force(self._redis, account, model, self._max_share)) if limits else None


def _value(family: Metric) -> float:
    return float(family.samples[0].value) if family.samples else 0.0


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """One line per scrape is noise."""


def exporter_app(registry: CollectorRegistry, client: redis.Redis) -> Callable[..., Iterable[bytes]]:
    """WSGI: ``/sd/workers`` the discovery JSON, every other path the metrics."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != SD_PATH:
            return metrics(environ, start_response)
        try:
            body, status = orjson.dumps(sd_targets(client)), "200 OK"
        except redis.RedisError as exc:  # Prometheus keeps the last targets it read
            log.warning("exporter: cannot list workers: %s", exc)
            body, status = orjson.dumps({"error": "cannot read Redis"}), "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app




def serve(settings: Settings, port: int, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` and ``/sd/workers`` from a daemon thread; returns the port bound."""
    # Fail a scrape fast when Redis is away (ratequeue_redis_up 0) instead of retrying past its timeout.
    client = redis.Redis.from_url(
        settings.redis_url or "redis://127.0.0.1:6379/0",
        socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1), **redis_options(settings),
    )
    registry = CollectorRegistry()
    # The shared queue and each account's own, and accounts' own limits (the exporter needs no key).
    accounts = load_account_table(settings, require_credentials=False)
    registry.register(RedisCollector(
        client, load_model_table(settings), settings.burst_seconds, learn_limits=settings.learn_limits,
        max_share=settings.max_share, daily_budget_usd=settings.daily_budget_usd,
        queues=worker_queues([] if accounts.implicit else accounts.names()),
        pair_limits=configured_pair_limits(accounts),
    ))
    server = make_server(addr, port, exporter_app(registry, client), _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="ratequeue-exporter", daemon=True).start()
    return int(server.server_port)


@click.command("exporter")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port of /metrics; 0 picks one.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
def exporter_command(port: int, host: str) -> None:
    """Publish queue depth, batches, parked pairs, bucket levels, live workers and memory from Redis;
    list the workers' metrics addresses for Prometheus at /sd/workers."""
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
