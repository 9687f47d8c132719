"""Reading a batch's state and outcomes: the Batch object, waiting for its end, its result lines.
A part of ``Client`` (its base class), beside producer/operate.py's operations."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from ratequeue.config.settings import Settings, shown_redis_url
from ratequeue.jobstore import keys
from ratequeue.jobstore.heartbeats import HEARTBEAT_STALE_SECONDS, live_workers
from ratequeue.producer.collect import FINAL_STATUSES, batch_object, iter_lines
from ratequeue.redact import configured_secrets

log = logging.getLogger("ratequeue.producer.api")  # the warnings users know, under the Client's logger


class BatchReading:
    """The reads; ``Client`` provides the connection and settings."""

    redis: redis.Redis
    settings: Settings

    def status(self, batch_id: str) -> dict[str, Any]:
        """The Batch object (OpenAI's shape, plus ``usage`` and ``cost_usd``)."""
        return batch_object(self.redis, batch_id)

    def wait(self, batch_id: str, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Block until the batch reaches a final status; returns the Batch object.

        Raises ``TimeoutError`` after ``timeout`` seconds. Warns once (``logging``) when no worker
        has sent a heartbeat lately: nothing runs the batch until one starts.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        checked_workers = False
        while True:
            batch = self.status(batch_id)
            if batch["status"] in FINAL_STATUSES:
                return batch
            if not checked_workers:
                checked_workers = True
                if live_workers(self.redis) == 0:
                    log.warning(
                        "no live worker on %s (none sent a heartbeat in the last %g s): batch %s waits until "
                        "one starts (ratequeue worker, with the same RATEQUEUE_REDIS_URL)",
                        shown_redis_url(self.settings.redis_url), HEARTBEAT_STALE_SECONDS, batch_id,
                    )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout} s")
            time.sleep(poll)

    def iter_results(self, batch_id: str, errors: bool = False) -> Iterator[dict[str, Any]]:
        """Result lines (or, with ``errors=True``, error lines) as dicts, in input order."""
        self.status(batch_id)  # raises BatchNotFoundError
        secrets = configured_secrets(self.settings)
        for line in iter_lines(self.redis, batch_id, "errors" if errors else "results", secrets):
            yield orjson.loads(line)

    def result(self, batch_id: str, custom_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The output or error line of one job, waiting for it up to ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for key in (keys.batch_results(batch_id), keys.batch_errors(batch_id)):
                line = self.redis.hget(key, custom_id)
                if line is not None:
                    return dict(orjson.loads(line))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {custom_id} of {batch_id} has no outcome after {timeout} s")
            time.sleep(0.1)
