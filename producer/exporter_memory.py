"""The exporter's Redis memory gauges: memory in use against ``maxmemory``, from one ``INFO memory``.

Why they matter: ratequeue's data must not be evicted, so Redis runs with policy ``noeviction``
and, once its memory reaches ``maxmemory``, refuses every write: submits fail and workers hold the
answers they paid for in memory (``ratequeue_outcomes_held``) until Redis takes them. The alerts
RatequeueRedisMemoryNearlyFull and RatequeueRedisMemoryFull (ops/prometheus/alerts.yml) compare
the two gauges so that someone deletes batches or raises ``maxmemory`` before that.

``used_memory`` is published as it is, not minus ``mem_not_counted_for_evict`` (the AOF and replica
buffers Redis leaves out of its own check): it is the figure ``redis-cli info memory`` shows, and
being a little above what Redis compares can only make the alerts early, never late.
"""

from __future__ import annotations

import redis
from prometheus_client.core import GaugeMetricFamily

__all__ = ["memory_families"]


def memory_families(client: redis.Redis) -> list[GaugeMetricFamily]:
    """``ratequeue_redis_memory_used_bytes`` and ``ratequeue_redis_memory_max_bytes`` (0: no limit).

    One ``INFO memory`` call; reading it works while Redis refuses writes for lack of memory.
    Raises ``redis.RedisError`` when Redis cannot be read.
    """
    info = client.info("memory")
    return [
        GaugeMetricFamily(
            "ratequeue_redis_memory_used_bytes", "Memory Redis uses (INFO memory used_memory).",
            value=float(info.get("used_memory", 0)),
        ),
        GaugeMetricFamily(
            "ratequeue_redis_memory_max_bytes",
            "Redis maxmemory: past it, with policy noeviction, every write is refused (0: no limit set).",
            value=float(info.get("maxmemory", 0)),
        ),
    ]
