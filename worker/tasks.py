"""The Celery task that runs a chunk of jobs, and the per-process engine behind it."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from celery import Task, signals
from celery.exceptions import Reject
from celery.worker import state as worker_state

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.redis_tls import redis_options
from ratequeue.tokens.encodings import ensure_offline_encodings
from ratequeue.worker.app import DEFAULT_REDIS_URL, RUN_CHUNK, app, publish_chunk
from ratequeue.worker.deferred import DeferredMover
from ratequeue.worker.engine import Engine, WorkerStopping
from ratequeue.worker.metrics_server import Heartbeat, mark_process_dead, start_metrics_server

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call is ours (engine), not httpx's

_lock = threading.Lock()
_engine: Engine | None = None
_mover: DeferredMover | None = None
_heartbeat: Heartbeat | None = None


def engine() -> Engine:
    """This process's engine, created on first use (after fork, never before)."""
    global _engine
    with _lock:
        if _engine is None:
            settings = load_settings()
            ensure_offline_encodings()
            _engine = Engine(settings, load_model_table(settings))
        return _engine


@app.task(name=RUN_CHUNK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self: Task, batch_id: str, custom_ids: list[str]) -> dict[str, Any]:
    """Run the chunk's jobs; the message is acked only once each is stored or deferred.

    The message's id owns the jobs' leases, so a redelivered copy (after a kill or a requeue)
    takes its jobs back at once instead of waiting for the leases to expire.
    """
    try:
        report = engine().run_chunk(batch_id, custom_ids, owner=self.request.id)
    except WorkerStopping as exc:
        # Cancelled at shutdown, leases released: another worker takes the message at once.
        log.warning("chunk of %s (%d jobs) given back at shutdown", batch_id, len(custom_ids))
        raise Reject(exc, requeue=True) from exc
    except Exception as exc:
        # Never let a failed task be acked with its jobs unfinished (Celery acks failures): give
        # the message back. Jobs already stored are skipped when it runs again, and jobs another
        # run holds are left to it. Mostly this is Redis going away for a moment.
        log.warning("chunk of %s (%d jobs) requeued after %s: %s", batch_id, len(custom_ids), type(exc).__name__, exc)
        _wait_for_redis()  # giving the message back is a Redis write: a failed one strands it
        raise Reject(exc, requeue=True) from exc
    return {"stored": report.stored, "deferred": report.deferred, "skipped": report.skipped}


def _wait_for_redis(poll: float = 1.0) -> None:
    """Return once Redis takes a write (at once when it does), or when the worker is stopping.

    A chunk given back while Redis is down or full (``maxmemory``) stays in kombu's unacked set
    until the visibility timeout (30 min by default); given back once Redis takes writes again,
    it runs again at once. The probe is a write because a full Redis still answers PING.
    """
    settings = load_settings()
    client = redis.Redis.from_url(
        settings.redis_url or DEFAULT_REDIS_URL, socket_timeout=poll, **redis_options(settings)
    )
    probe = f"rq:probe:writable:{os.getpid()}"
    try:
        while not (worker_state.should_stop or worker_state.should_terminate):
            try:
                client.set(probe, 1, px=5000)
                return
            except redis.RedisError:
                time.sleep(poll)
    finally:
        client.close()


def _restore_unacked() -> None:
    """Put messages of killed workers (unacked past the visibility timeout) back on the queue.

    kombu sweeps only when a consumer's poll comes back empty, so a busy fleet could leave a dead
    worker's chunks invisible for long; every worker also sweeps on a timer (a Redis mutex in
    kombu keeps the sweeps from overlapping).
    """
    with app.connection_for_write() as conn:
        conn.default_channel.qos.restore_visible(num=100, interval=1)


@signals.worker_ready.connect
def _start_mover(sender: Any = None, **_: Any) -> None:
    global _mover, _heartbeat
    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL, **redis_options(settings))
    _mover = DeferredMover(
        client, publish_chunk, chunk_size=settings.chunk_size, restore=_restore_unacked,
        restore_interval=max(1.0, min(30.0, settings.visibility_timeout / 4)),
    )
    _mover.start()
    start_metrics_server(settings.metrics_port)
    _heartbeat = Heartbeat(client, getattr(sender, "hostname", None)).start()
    engine()  # warm up: encodings and connections before the first chunk arrives


@signals.worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """SIGTERM (warm shutdown): Celery waits for running tasks, and a call that hangs would hold
    the worker for ever; calls in flight get the grace period, then their chunks are cancelled
    and given back (``Engine.begin_shutdown``). Runs in the main process's signal handler."""
    if _engine is not None:
        _engine.begin_shutdown(_engine.settings.shutdown_grace_seconds)


@signals.worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    if pid is not None:  # prefork: forget the child's live gauges (no-op unless PROMETHEUS_MULTIPROC_DIR)
        mark_process_dead(pid)


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if _mover is not None:
        _mover.stop()
    if _engine is not None:
        _engine.close()
