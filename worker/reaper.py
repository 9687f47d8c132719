"""Gives back the chunks of workers that stopped heartbeating, within seconds of the heartbeat's
stale bound instead of at the broker's visibility timeout (30 min).

Issue 10: after ``kill -9`` of every worker, the new workers found the dead ones' chunks unacked
in kombu's ``unacked`` hash, invisible until the visibility timeout restored them 31.5 minutes
later. Now every worker runs a reaper thread: every ``interval`` seconds one of them (a Redis
key taken for the interval; it saves work, correctness does not rest on it) reads who holds which
unacked message (``ratequeue.broker.holders``), and gives back, through ``ratequeue.broker.reclaim``, the
messages of every holder whose heartbeat (``worker.metrics_server``) is older than the stale
bound or gone. A holder with nothing left holds no record, so a dead worker is forgotten as soon
as its last message is back. A reaper acts only once its own worker's beats have gone through
for the stale bound (``Heartbeat.steady_for``): after a Redis outage, or a pause of the whole
host, every worker is silent at once, and none is dead.

Why redelivery is safe for a worker that is only slow or cut off from Redis: a redelivered chunk
finds its jobs leased by the old run (60 s, renewed while it runs, ``worker.leases``) and re-checks
them later instead of running them; they run once the old run's leases are gone. For the same
reason the reaper does not release the old run's leases: a heartbeat that stopped proves no
death, and a released lease would let a second call start while the first may still be open.
A killed worker's chunks so come back ~30-40 s after the kill (stale bound, beat and reaper
intervals), and its jobs run when its last lease ends (at most 60 s after the kill: the re-check
is due then, ``recheck_later.lua``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from ratequeue import broker
from ratequeue.worker import metrics
from ratequeue.worker.metrics_server import HEARTBEAT_STALE_SECONDS, Heartbeat, workers_key

log = logging.getLogger(__name__)

LOCK_KEY = "rq:reaper:lock"


class Reaper:
    """A daemon thread that reclaims the unacked messages of workers whose heartbeat went stale."""

    def __init__(self, client: redis.Redis, app: Any, heartbeat: Heartbeat, interval: float = 5.0,
                 stale_after: float = HEARTBEAT_STALE_SECONDS) -> None:
        self._redis = client
        self._app = app
        self._heartbeat = heartbeat
        self.name = heartbeat.name  # this worker's: never reaped by itself
        self._interval = interval
        self._stale_after = stale_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ratequeue-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def reap(self) -> dict[str, int]:
        """One pass: dead holder -> how many of its messages this pass gave back. Raises redis errors."""
        if self._heartbeat.steady_for() < self._stale_after:
            return {}
        # One pass per interval across the fleet: the first reaper to come takes the turn, which
        # lapses by itself (a longer pass may overlap the next one: harmless, see ``broker.reclaim``).
        if not self._redis.set(LOCK_KEY, self.name, nx=True, px=max(1, int(self._interval * 1000))):
            return {}
        return self._reclaim_dead()

    def dead_holders(self, held: dict[str, list[str]]) -> dict[str, float | None]:
        """The holders among ``held`` whose last heartbeat is older than the stale bound, with its
        age in seconds (None: no heartbeat at all, e.g. a worker stopped since)."""
        others = [holder for holder in held if holder != self.name]
        if not others:
            return {}
        seconds, micros = self._redis.time()  # the heartbeats' clock (worker/lua/heartbeat.lua)
        now = seconds + micros / 1e6
        ages = [None if beat is None else now - beat for beat in self._redis.zmscore(workers_key(), others)]
        return {holder: age for holder, age in zip(others, ages, strict=True) if age is None or age > self._stale_after}

    def _reclaim_dead(self) -> dict[str, int]:
        held = broker.holders(self._redis)
        reclaimed = {}
        for holder, age in self.dead_holders(held).items():
            count = reclaimed[holder] = broker.reclaim(self._app, holder, held[holder])
            if count:
                metrics.chunks_reclaimed(count)
                silent = "has no heartbeat" if age is None else f"missed its heartbeats for {age:.0f} s"
                log.warning("worker %s %s: %d chunk(s) it held given back to the queue", holder, silent, count)
        return reclaimed

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.reap()
            except Exception as exc:  # the thread must outlive Redis restarts and broker hiccups
                log.warning("reaper: %s; retrying", exc)
