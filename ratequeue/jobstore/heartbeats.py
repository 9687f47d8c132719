"""Worker heartbeats: every worker writes its name and the time into one sorted set, and where
Prometheus scrapes it into a hash (see ``worker.metrics_server.Heartbeat``); the exporter counts
live workers from them and lists their metrics addresses for Prometheus (``/sd/workers``), and
``wait()`` warns when there are none (a batch that nobody runs never ends)."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text

__all__ = [
    "HEARTBEAT_FORGET_SECONDS",
    "HEARTBEAT_STALE_SECONDS",
    "ListedWorker",
    "advertised_address",
    "holders",
    "listed_workers",
    "live_holders",
    "live_workers",
    "redis_now",
    "worker_addresses_key",
    "workers_key",
]

HEARTBEAT_STALE_SECONDS = 30.0  # a worker silent this long counts as down
HEARTBEAT_FORGET_SECONDS = 3600.0  # a worker silent this long is forgotten (no longer a scrape target)


@dataclass(frozen=True)
class ListedWorker:
    """A worker heard within the last hour: its name, metrics address and last beat (s since epoch)."""

    name: str
    address: str
    last_seen: float


def workers_key() -> str:
    """Sorted set: worker name -> time of its last heartbeat (s since epoch)."""
    return "rq:workers"


def worker_addresses_key() -> str:
    """Hash: worker name -> "host:port" of its ``/metrics``, written with each beat and forgotten
    with it (worker/lua/heartbeat.lua)."""
    return "rq:workers:addresses"


def advertised_address(advertise: str | None, port: int | None) -> str | None:
    """Where Prometheus reaches a worker's ``/metrics``: ``RATEQUEUE_METRICS_ADVERTISE`` as given,
    else this host's name and ``RATEQUEUE_METRICS_PORT`` (a container's name is its hostname under
    compose); None when the worker serves no metrics."""
    if advertise:
        return advertise
    return f"{socket.gethostname()}:{port}" if port is not None else None


def redis_now(client: redis.Redis) -> float:
    """Redis's clock (s since epoch): heartbeats are written at it, so hosts whose clocks disagree
    judge them alike."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def live_workers(client: redis.Redis) -> int:
    """How many workers sent a heartbeat within ``HEARTBEAT_STALE_SECONDS`` (by Redis's clock)."""
    return int(client.zcount(workers_key(), redis_now(client) - HEARTBEAT_STALE_SECONDS, "+inf"))


def listed_workers(client: redis.Redis) -> list[ListedWorker]:
    """Every worker with a metrics address whose heartbeat is not yet forgotten (an hour), newest
    beat first. Live or dead alike: Prometheus reads ``up`` 0 for a dead one, which is what
    ``RatequeueWorkerDown`` needs. Beats are forgotten by the next worker's beat; with none
    beating, the age bound here still drops them."""
    with client.pipeline(transaction=False) as pipe:
        pipe.zrevrangebyscore(workers_key(), "+inf", redis_now(client) - HEARTBEAT_FORGET_SECONDS, withscores=True)
        pipe.hgetall(worker_addresses_key())
        beats, addresses = pipe.execute()
    found = {text(name): text(address) for name, address in addresses.items()}
    return [ListedWorker(text(name), found[text(name)], float(seen)) for name, seen in beats if text(name) in found]


def holders(entries: Iterable[Any]) -> Counter[str]:
    """How many workers hold each account, from their ``keys.accounts_held`` entries ("a,b"; None
    for a worker that wrote none)."""
    return Counter(name for entry in entries if entry for name in text(entry).split(",") if name)


def live_holders(client: redis.Redis) -> Counter[str]:
    """How many live workers (a heartbeat within ``HEARTBEAT_STALE_SECONDS``) hold each account's key."""
    live = [text(n) for n in client.zrangebyscore(workers_key(), redis_now(client) - HEARTBEAT_STALE_SECONDS, "+inf")]
    return holders(client.hmget(keys.accounts_held(), live) if live else [])
