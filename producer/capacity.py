"""Room in Redis for a batch: a Redis at its ``maxmemory`` refuses a whole batch, never half of one.

With ``maxmemory`` and the ``noeviction`` policy (the only policy that suits a job store: the
others would silently drop jobs and results), every write that needs memory fails once Redis is
full. A batch stored halfway and then refused was left in ``validating`` for ever, and its stored
half ran and was reported as complete. So the submitter asks Redis how full it is before each
block of jobs, keeps a share of ``maxmemory`` free for what is already running (results, the
broker's messages), and refuses with the figures when the batch does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from ratequeue.errors import RedisFullError

# Kept free for what already runs: results of admitted batches and broker messages.
KEEP_FREE = 0.10
# What a stored job will need besides itself: its result line (a chat completion's is ~1-2 kB).
RESULT_ALLOWANCE = 2048


@dataclass(frozen=True)
class Memory:
    """Redis's memory use in bytes; ``limit`` is 0 when no ``maxmemory`` is set."""

    used: int
    limit: int

    @property
    def bounded(self) -> bool:
        return self.limit > 0

    def describe(self) -> str:
        return f"{_mb(self.used)} used of maxmemory {_mb(self.limit)}"


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


def memory(client: redis.Redis) -> Memory:
    """Used and maximum memory from ``INFO memory`` (one round trip)."""
    info = client.info("memory")
    return Memory(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))


def ensure_room(client: redis.Redis, needed: int, what: str = "this batch") -> Memory:
    """Raise ``RedisFullError`` unless ``needed`` more bytes (for ``what``) fit below ``maxmemory``
    with ``KEEP_FREE`` of it to spare; returns the memory figures read."""
    mem = memory(client)
    if mem.bounded and mem.used + needed > mem.limit * (1 - KEEP_FREE):
        raise RedisFullError(
            f"Redis is full: {mem.describe()}, and {what} needs about {_mb(needed)} more "
            f"({KEEP_FREE:.0%} of maxmemory is kept for running batches). Nothing was stored. "
            "Free space (ratequeue delete BATCH, a shorter RATEQUEUE_RETENTION_SECONDS) or raise maxmemory."
        )
    return mem


def full_error(client: redis.Redis, cause: Exception) -> RedisFullError:
    """The error for a write Redis refused (OOM) halfway: with the figures when Redis answers."""
    try:
        figures = memory(client).describe()
    except redis.RedisError:
        figures = "memory figures unavailable"
    return RedisFullError(f"Redis is full ({figures}): {cause}. Nothing of this batch was kept.")
