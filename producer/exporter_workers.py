"""The exporter's worker gauges and Prometheus' worker discovery (``GET /sd/workers``).

Discovery: Prometheus' http_sd JSON, one target per metrics address found in the workers'
heartbeats (``ratequeue.jobstore.heartbeats``), live or dead, until a beat is an hour old. A
killed worker so stays a target, scraped as ``up == 0``: ``RatequeueWorkerDown`` fires. Under
compose's DNS discovery a removed replica vanished from the targets instead, and the alert could
not fire. A worker stopped cleanly removes its heartbeat: it is no longer a target. Two entries
with one address (a worker restarted on its host) are one target, labelled with the newest.
"""

from __future__ import annotations

from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily

from ratequeue.jobstore.heartbeats import listed_workers, live_workers, workers_key

__all__ = ["sd_targets", "worker_families"]


def worker_families(client: redis.Redis) -> tuple[list[GaugeMetricFamily], int]:
    """The worker gauges, and how many workers are alive."""
    newest = client.zrevrange(workers_key(), 0, 0, withscores=True)
    alive = live_workers(client)
    return [
        GaugeMetricFamily("ratequeue_workers_alive", "Workers whose heartbeat is recent.", value=alive),
        GaugeMetricFamily(
            "ratequeue_worker_last_seen_timestamp_seconds", "Time of the newest worker heartbeat (0: none).",
            value=float(newest[0][1]) if newest else 0.0,
        ),
    ], alive


def sd_targets(client: redis.Redis) -> list[dict[str, Any]]:
    """The body of ``/sd/workers``: ``[{"targets": ["host:port"], "labels": {...}}, ...]``."""
    targets: dict[str, dict[str, Any]] = {}
    for worker in listed_workers(client):  # newest beat first: the first of an address wins
        targets.setdefault(worker.address, {
            "targets": [worker.address],
            "labels": {"__meta_ratequeue_worker": worker.name,
                       "__meta_ratequeue_last_heartbeat": f"{worker.last_seen:.0f}"},
        })
    return list(targets.values())
