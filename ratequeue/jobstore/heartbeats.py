"""Worker heartbeats: every worker writes its name and the time into one sorted set (see
``worker.metrics_server.Heartbeat``); the exporter counts live workers from it, and ``wait()``
warns when there are none (a batch that nobody runs never ends)."""

from __future__ import annotations

import redis

__all__ = ["HEARTBEAT_STALE_SECONDS", "live_workers", "redis_now", "workers_key"]

HEARTBEAT_STALE_SECONDS = 30.0  # a worker silent this long counts as down


def workers_key() -> str:
    """Sorted set: worker name -> time of its last heartbeat (s since epoch)."""
    return "rq:workers"


def redis_now(client: redis.Redis) -> float:
    """Redis's clock (s since epoch): heartbeats are written at it, so hosts whose clocks disagree
    judge them alike."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def live_workers(client: redis.Redis) -> int:
    """How many workers sent a heartbeat within ``HEARTBEAT_STALE_SECONDS`` (by Redis's clock)."""
    return int(client.zcount(workers_key(), redis_now(client) - HEARTBEAT_STALE_SECONDS, "+inf"))
