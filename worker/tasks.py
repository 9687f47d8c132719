"""The worker's task and its per-process runtime, built from settings (no module-level state).

``WorkerRuntime`` owns what one worker process runs beside Celery: the engine (created on first
use, after a prefork pool's fork, never before), the deferred mover, the heartbeat, the reaper
of dead workers' chunks and the metrics server. ``worker.app.build_worker`` registers its task
and signal handlers on an app.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from tenacity import Retrying, retry_if_exception_type, wait_fixed

from ratequeue import broker
from ratequeue.config.accounts import AccountTable
from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import Settings, shown_redis_url
from ratequeue.jobstore import deferrals, keys
from ratequeue.jobstore.heartbeats import advertised_address
from ratequeue.queue import DEFAULT_REDIS_URL, QUEUE, send_chunk
from ratequeue.redis_tls import redis_options
from ratequeue.retrying import warn_every
from ratequeue.tokens.encodings import ensure_offline_encodings
from ratequeue.worker import metrics
from ratequeue.worker.deadletter import DeadLetters
from ratequeue.worker.deferred import DeferredMover
from ratequeue.worker.engine import Engine, WorkerStopping
from ratequeue.worker.metrics_redis import TimedRedis
from ratequeue.worker.metrics_server import Heartbeat, mark_process_dead, start_metrics_server, worker_name
from ratequeue.worker.reaper import Reaper
from ratequeue.worker.routing import WAKE_SECONDS, held_accounts

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call is ours (engine), not httpx's


class WorkerRuntime:
    """Everything a worker process runs for ratequeue, from one ``Settings``."""

    def __init__(self, settings: Settings, app: Any, accounts: AccountTable | None = None) -> None:
        self.settings = settings
        self.app = app
        # Read once per process, before any chunk: a key missing here makes its account unusable
        # (its jobs are left to workers that hold it), not the whole worker.
        self.accounts = accounts or load_account_table(settings, require_credentials=False)
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._mover: DeferredMover | None = None
        self._heartbeat: Heartbeat | None = None
        self._reaper: Reaper | None = None
        # One name for the heartbeat and for the broker's record of the messages this worker
        # holds: a reaper gives them back when the heartbeat stops (worker.reaper).
        self.name = worker_name()
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, broker.HOLDER_OPTION: self.name}
        self._redis: redis.Redis | None = None
        self._dead_letters: DeadLetters | None = None
        self._stopped = threading.Event()  # set at shutdown: ends this runtime's own threads

    @property
    def redis(self) -> redis.Redis:
        """This process's synchronous Redis client (made on first use: after a fork)."""
        if self._redis is None:
            s = self.settings
            # Timed: the heartbeat's, mover's and reaper's calls count in ratequeue_redis_*.
            self._redis = TimedRedis.from_url(s.redis_url or DEFAULT_REDIS_URL, **redis_options(s))
        return self._redis

    def engine(self) -> Engine:
        """This process's engine, created on first use (after fork, never before)."""
        with self._lock:
            if self._engine is None:
                ensure_offline_encodings()
                self._engine = Engine(self.settings, self.accounts.table, self.accounts)
            return self._engine

    def dead_letters(self) -> DeadLetters:
        if self._dead_letters is None:
            self._dead_letters = DeadLetters(self.redis, self.settings.max_chunk_failures)
        return self._dead_letters

    def run_chunk(self, task: Task, batch_id: str, custom_ids: list[str]) -> dict[str, Any]:
        """The task body: run the chunk's jobs; the message is acked only once each is stored or
        deferred, or once the chunk is dead-lettered (its jobs then fail with the reason)."""
        if (task.request.delivery_info or {}).get("redelivered"):
            metrics.chunk_redelivered()
        try:
            with metrics.busy_slot():
                report = self.engine().run_chunk(batch_id, custom_ids, owner=task.request.id)
        except WorkerStopping as exc:
            # Cancelled at shutdown, leases released: another worker takes the message at once.
            log.warning("chunk of %s (%d jobs) given back at shutdown", batch_id, len(custom_ids))
            raise Reject(exc, requeue=True) from exc
        except Exception as exc:
            # Never let a failed task be acked with its jobs unfinished (Celery acks failures):
            # give the message back. Jobs already stored are skipped when it runs again. Mostly
            # this is Redis going away for a moment; a chunk that fails for another reason again
            # and again is dead-lettered instead of being requeued for ever.
            self.wait_for_redis()  # both paths write to Redis: a failed write strands the message
            if not isinstance(exc, redis.RedisError) and self.dead_letters().failed(task.request.id, exc):
                self.engine().fail_jobs(batch_id, custom_ids, "chunk_failed", self.dead_letters().reason(exc))
                self.dead_letters().record(task.request.id, batch_id, custom_ids, exc)
                return {"dead_lettered": len(custom_ids)}
            log.warning("chunk of %s (%d jobs) requeued after %s: %s", batch_id, len(custom_ids),
                        type(exc).__name__, exc)
            raise Reject(exc, requeue=True) from exc
        return {"stored": report.stored, "deferred": report.deferred, "skipped": report.skipped}

    def wait_for_redis(self, poll: float = 1.0) -> None:
        """Return once Redis takes a write (at once when it does), or when the worker is stopping.

        A chunk given back while Redis is down or full (``maxmemory``) stays in kombu's unacked
        set until the visibility timeout (30 min by default); given back once Redis takes writes
        again, it runs again at once. The probe is a write because a full Redis still answers PING.
        """
        s = self.settings
        client = redis.Redis.from_url(s.redis_url or DEFAULT_REDIS_URL, socket_timeout=poll, **redis_options(s))
        probe = f"rq:probe:writable:{os.getpid()}"
        try:
            Retrying(retry=retry_if_exception_type(redis.RedisError), wait=wait_fixed(poll),
                     stop=lambda _: broker.worker_stopping(), retry_error_callback=lambda _: None,
                     before_sleep=warn_every(log, 30.0, "Redis at " + shown_redis_url(s.redis_url).replace("%", "%%")
                                             + " takes no writes (%s): chunks wait until it does"),
                     )(client.set, probe, 1, px=5000)
        finally:
            client.close()

    def publish_chunk(self, batch_id: str, custom_ids: Sequence[str], queue: str = QUEUE) -> None:
        """Put one chunk message on `queue` through this worker's app."""
        send_chunk(self.app, batch_id, custom_ids, queue)

    # Celery signal handlers (connected by worker.app.build_worker) ---------------------------

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        s = self.settings
        # First: a worker holding messages without a heartbeat looks dead to the other reapers.
        address = advertised_address(s.metrics_advertise, s.metrics_port)
        self._heartbeat = Heartbeat(self.redis, self.name, address=address).start()
        self._reaper = Reaper(self.redis, self.app, self._heartbeat).start()
        self._mover = DeferredMover(
            self.redis, self.publish_chunk, chunk_size=s.chunk_size,
            restore=lambda: broker.restore_visible(self.app),
            restore_interval=max(1.0, min(30.0, s.visibility_timeout / 4)),
        )
        self._mover.start()
        self._start_metrics(sender)
        self._advertise_accounts()
        self.engine()  # warm up: encodings and connections before the first chunk arrives

    def _advertise_accounts(self) -> None:
        """Say which accounts this worker holds keys for (``status`` counts them), and keep making
        due the jobs that workers without those keys deferred (worker.routing)."""
        held = held_accounts(self.accounts)
        if not held:
            return
        self.redis.hset(keys.accounts_held(), self.name, ",".join(held))
        # At most what this worker's slots hold, a second per account: enough to keep it fed, and, while it
        # is busy, refused jobs circle through a worker without the key no faster (bench/accounts_bench.py:
        # 4 chunks a second took 19.4 s for 5,000 jobs where this takes 11.7 s, for 0.9 s more CPU there).
        at_once = self.settings.worker_slots * self.settings.chunk_size

        def wake() -> None:
            while not self._stopped.wait(WAKE_SECONDS):
                try:
                    for name in held:
                        deferrals.wake_refused(self.redis, name, at_once)
                except redis.RedisError as exc:  # Redis away for a moment: the next round may work
                    log.debug("refused jobs not woken: %s", exc)

        threading.Thread(target=wake, name="ratequeue-wake-refused", daemon=True).start()

    def _start_metrics(self, consumer: Any) -> None:
        """Every configured (model, account)'s series at zero, the pool's slots, then serve."""
        s, accounts = self.settings, self.accounts
        if accounts.implicit:
            metrics.start_pairs((name, s.account_id) for name in accounts.table.names())
        else:  # the routes this worker can send on; metrics name each by its bucket's (account, model)
            metrics.start_pairs((r.pair[1], r.pair[0]) for r in accounts.all_routes() if r.account.unusable is None)
        concurrency = getattr(getattr(consumer, "controller", None), "concurrency", None)
        metrics.set_slots(int(concurrency or s.worker_slots))
        start_metrics_server(s.metrics_port, s.metrics_host)

    def on_shutting_down(self, **_: Any) -> None:
        """SIGTERM (warm shutdown): Celery waits for running tasks, and a call that hangs would
        hold the worker for ever; calls in flight get the grace period, then their chunks are
        cancelled and given back (``Engine.begin_shutdown``). Runs in the signal handler."""
        if self._engine is not None:
            self._engine.begin_shutdown(self.settings.shutdown_grace_seconds)

    def on_child_exited(self, pid: int | None = None, **_: Any) -> None:
        if pid is not None:  # prefork: forget the child's live gauges (no-op unless PROMETHEUS_MULTIPROC_DIR)
            mark_process_dead(pid)

    def on_shutdown(self, **_: Any) -> None:
        self._stopped.set()
        if not self.accounts.implicit:
            try:
                self.redis.hdel(keys.accounts_held(), self.name)
            except redis.RedisError as exc:  # a dead worker's entry is ignored anyway (no heartbeat)
                log.warning("could not withdraw this worker's accounts: %s", exc)
        if self._reaper is not None:
            self._reaper.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._mover is not None:
            self._mover.stop()
        if self._engine is not None:
            self._engine.close()
