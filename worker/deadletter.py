"""Chunks that keep failing: counted per message, dead-lettered after a bound, never lost.

A chunk whose run raises something other than a Redis error (a bug, a stored job that cannot be
read) used to be requeued for ever: every worker picked it up, failed and gave it back. Now each
failure is counted in Redis under the message's id (which survives redelivery); at
``RATEQUEUE_MAX_CHUNK_FAILURES`` the chunk is dead-lettered: its jobs without an outcome fail with
``chunk_failed`` and the reason, the message is acked, and a record goes to ``rq:deadletter``
(shown by ``ratequeue status``) and to ``ratequeue_dead_lettered_chunks_total``.
"""

from __future__ import annotations

import logging
import time

import orjson
import redis

from ratequeue.jobstore import keys
from ratequeue.worker import metrics

log = logging.getLogger(__name__)

FAILURES_TTL = 86_400  # a failure count outlives any redelivery of its message, then goes
KEEP = 1_000  # dead-letter records kept (newest first)


class DeadLetters:
    """Counts chunk failures and records dead-lettered chunks, in Redis."""

    def __init__(self, client: redis.Redis, max_failures: int) -> None:
        self._redis = client
        self.max_failures = max_failures

    def failed(self, message_id: str | None, exc: BaseException) -> bool:
        """Count one failed run of the message; True when it has now failed ``max_failures`` times."""
        if not message_id:
            return False
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(keys.chunk_failures(message_id))
        pipe.expire(keys.chunk_failures(message_id), FAILURES_TTL)
        count = int(pipe.execute()[0])
        log.warning("chunk %s failed (%d of %d): %s: %s", message_id, count, self.max_failures, type(exc).__name__, exc)
        return count >= self.max_failures

    def reason(self, exc: BaseException) -> str:
        return f"the chunk failed {self.max_failures} times; last error: {type(exc).__name__}: {str(exc)[:300]}"

    def record(self, message_id: str | None, batch_id: str, custom_ids: list[str], exc: BaseException) -> None:
        """Keep a record of a dead-lettered chunk and count it."""
        entry = {"message_id": message_id, "batch_id": batch_id, "jobs": len(custom_ids), "at": int(time.time()),
                 "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        pipe = self._redis.pipeline(transaction=True)
        pipe.lpush(keys.dead_letters(), orjson.dumps(entry))
        pipe.ltrim(keys.dead_letters(), 0, KEEP - 1)
        if message_id:
            pipe.delete(keys.chunk_failures(message_id))
        pipe.execute()
        metrics.chunk_dead_lettered()
        log.error("chunk %s of %s dead-lettered (%d jobs failed as chunk_failed): %s", message_id, batch_id,
                  len(custom_ids), entry["error"])
