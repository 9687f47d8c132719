"""The worker's Celery app: the shared one (``ratequeue.queue``) with the worker's tasks."""

from __future__ import annotations

from collections.abc import Sequence

from ratequeue.config.settings import load_settings
from ratequeue.queue import DEFAULT_REDIS_URL, QUEUE, RUN_CHUNK, create_app

__all__ = ["DEFAULT_REDIS_URL", "QUEUE", "RUN_CHUNK", "app", "publish_chunk"]

app = create_app(load_settings(), tasks=["ratequeue.worker.tasks"])


def publish_chunk(batch_id: str, custom_ids: Sequence[str]) -> None:
    """Put one chunk message (a batch id and up to ``chunk_size`` custom_ids) on the queue."""
    app.send_task(RUN_CHUNK, args=[batch_id, list(custom_ids)], queue=QUEUE)
