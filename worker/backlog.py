"""Each pair's queue of jobs waiting for its bucket in this worker, and deferring what would wait
in it too long before it takes a chunk slot (issue 11: a fair share of slots).

Why: a chunk holds one of the worker's slots (a Celery thread) until every one of its jobs is
stored or deferred, and the broker's queue is first in, first out. With one model's backlog queued
first, every slot held a chunk of that model waiting up to ``defer_after`` seconds on its bucket;
its jobs were deferred, came back as new messages and took the slots again, while another model's
chunks waited behind them (measured: 8 slots, a 120 RPM model's 1,200 jobs queued before a
600 RPM model's 600: the 600 RPM model ran at 35% of its limit). Now:

- a chunk whose pair already has ``admit_seconds`` of work queued here is deferred whole, at
  once (``worker.engine``): its slot is free again in milliseconds;
- a job that would wait longer than its patience (``defer_after``) behind its pair's queue is
  deferred at once, not when the wait times out (``worker.runner``).

So a pair holds about as many slots as its limit drains in ``admit_seconds`` plus one chunk
(deficit by limit), and the other slots go to the pairs that can use them. ``admit_seconds`` is
at least the bucket's burst, so that a full bucket can still be spent at once.

When deferred work comes back: at its turn by this worker's queue and the work deferred before
it (a schedule per pair), a little early so the queue never runs dry, and at most
``MAX_DEFER_SECONDS`` ahead (a longer schedule would leave the pair idle if the jobs in it never
came back: cancelled, or taken by another worker). Other workers' use of the same bucket is not
seen here: deferred work then comes back early and is deferred again, which costs a message.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ratequeue.worker.limiter import BucketLimits

__all__ = ["MAX_DEFER_SECONDS", "MIN_ADMIT_SECONDS", "Backlog"]

MAX_DEFER_SECONDS = 60.0
MIN_ADMIT_SECONDS = 2.0  # a shorter queue may run dry before deferred work comes back (mover: 0.5 s)


@dataclass
class _Queue:
    limits: BucketLimits
    requests: int = 0  # jobs of this worker waiting for the pair's bucket
    tokens: int = 0  # their charges
    schedule_end: float = 0.0  # monotonic time until which deferred work is due back
    # deferred-set member -> monotonic time it is due back: what ``recall`` brings back early
    deferred: dict[str, float] = field(default_factory=dict)


def seconds_of(limits: BucketLimits, requests: float, tokens: float) -> float:
    """Seconds the bucket takes to refill ``requests`` requests and ``tokens`` tokens."""
    return max(requests / limits.request_rate, tokens / limits.token_rate)


def admit_seconds(limits: BucketLimits) -> float:
    """How much queued work (in seconds of the limits) a pair may have here before its chunks wait."""
    return max(MIN_ADMIT_SECONDS, limits.burst_seconds)


class Backlog:
    """The jobs each bucket key has waiting in this process (one event loop; no locking)."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}

    def ahead(self, key: str) -> tuple[float, BucketLimits | None]:
        """Seconds of the bucket's limits the jobs waiting on ``key`` here need, and those limits
        (None while no job of ``key`` has waited here)."""
        queue = self._queues.get(key)
        if queue is None:
            return 0.0, None
        return seconds_of(queue.limits, queue.requests, queue.tokens), queue.limits

    def schedule(self, key: str, requests: int, tokens: int, members: Iterable[str] = ()) -> float:
        """Seconds to defer work of ``requests`` requests and ``tokens`` tokens for: until its turn
        behind the queue here and the work deferred before it, less half of ``admit_seconds``: it
        then finds the queue short enough to be admitted (work that comes back to a queue still
        too long goes to the end of the schedule, and the queue ran dry while it waited)."""
        queue = self._queues[key]
        now = time.monotonic()
        lead = admit_seconds(queue.limits) / 2
        due = max(now + seconds_of(queue.limits, queue.requests, queue.tokens) - lead, queue.schedule_end, now)
        if due - now >= MAX_DEFER_SECONDS:  # beyond the schedule kept: it asks again then
            due = now + MAX_DEFER_SECONDS
        else:
            queue.schedule_end = due + seconds_of(queue.limits, requests, tokens)
        if len(queue.deferred) > 10_000:  # those already back are of no more use
            queue.deferred = {m: at for m, at in queue.deferred.items() if at > now}
        queue.deferred.update(dict.fromkeys(members, due))
        return due - now

    def recall(self, key: str) -> list[str]:
        """The deferred-set members of ``key``'s work deferred here and not yet due, forgotten with
        the schedule: it was priced by a charge rule no longer in force (a cheaper one learned
        would otherwise leave the bucket idle until the old schedule's end, up to a minute)."""
        queue = self._queues.get(key)
        if queue is None:
            return []
        now = time.monotonic()
        members = [member for member, at in queue.deferred.items() if at > now]
        queue.deferred.clear()
        queue.schedule_end = 0.0
        return members

    def defer_for(self, key: str, limits: BucketLimits, cost: int, patience: float, member: str = "") -> float | None:
        """None when a job charging ``cost`` should queue now, else the seconds to defer it for:
        the jobs ahead of it here already need more than ``patience`` seconds of the bucket."""
        ahead, _ = self.ahead(key)
        if ahead <= patience or limits.slow_start:  # limits still a guess: no schedule priced by them
            return None
        self._queues[key].limits = limits
        return self.schedule(key, 1, cost, (member,) if member else ())

    @contextmanager
    def waiting(self, key: str, limits: BucketLimits, cost: int) -> Iterator[None]:
        """Count a job charging ``cost`` as waiting on ``key`` (with ``limits``) while the block runs."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(limits)
        queue.limits = limits
        queue.requests += 1
        queue.tokens += cost
        try:
            yield
        finally:
            queue.requests -= 1
            queue.tokens -= cost
