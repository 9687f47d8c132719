"""Worker heartbeats: every worker writes its name and the time into one sorted set (see
``worker.metrics_server.Heartbeat``); the exporter counts live workers from it, and ``wait()``
warns when there are none (a batch that nobody runs never ends)."""

from __future__ import annotations

import time

import redis

__all__ = ["HEARTBEAT_STALE_SECONDS", "live_workers", "workers_key"]

HEARTBEAT_STALE_SECONDS = 30.0  # a worker silent this long counts as down


def workers_key() -> str:
    """Sorted set: worker name -> time of its last heartbeat (s since epoch)."""
    return "rq:workers"


def live_workers(client: redis.Redis) -> int:
    """How many workers sent a heartbeat within ``HEARTBEAT_STALE_SECONDS``."""
    return int(client.zcount(workers_key(), time.time() - HEARTBEAT_STALE_SECONDS, "+inf"))
