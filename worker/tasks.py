"""The Celery task that runs a chunk of jobs, and the per-process engine behind it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import signals
from celery.exceptions import Reject

from config.models import load_model_table
from config.settings import load_settings
from worker.app import DEFAULT_REDIS_URL, RUN_CHUNK, app, publish_chunk
from worker.deferred import DeferredMover
from worker.encodings import ensure_offline_encodings
from worker.engine import Engine

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call is ours (engine), not httpx's

_lock = threading.Lock()
_engine: Engine | None = None
_mover: DeferredMover | None = None


def engine() -> Engine:
    """This process's engine, created on first use (after fork, never before)."""
    global _engine
    with _lock:
        if _engine is None:
            settings = load_settings()
            ensure_offline_encodings()
            _engine = Engine(settings, load_model_table(settings))
        return _engine


@app.task(name=RUN_CHUNK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(batch_id: str, custom_ids: list[str]) -> dict[str, Any]:
    """Run the chunk's jobs; the message is acked only once each is stored or deferred."""
    try:
        report = engine().run_chunk(batch_id, custom_ids)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis went away mid-chunk: give the message back instead of losing it. Jobs already
        # stored are skipped when it runs again.
        log.warning("chunk %s of %d jobs requeued: %s", batch_id, len(custom_ids), exc)
        time.sleep(1.0)
        raise Reject(exc, requeue=True) from exc
    return {"stored": report.stored, "deferred": report.deferred, "skipped": report.skipped}


@signals.worker_ready.connect
def _start_mover(**_: Any) -> None:
    global _mover
    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL)
    _mover = DeferredMover(client, publish_chunk, chunk_size=settings.chunk_size)
    _mover.start()
    engine()  # warm up: encodings and connections before the first chunk arrives


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _mover is not None:
        _mover.stop()
    if _engine is not None:
        _engine.close()
