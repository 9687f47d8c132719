"""Each pair's queue of jobs waiting for its bucket in this worker, and deferring what would wait
in it too long before it takes a chunk slot (issue 11: a fair share of slots).

Why: a chunk holds one of the worker's slots (a Celery thread) until every one of its jobs is
stored or deferred, and the broker's queue is first in, first out. With one model's backlog queued
first, every slot held a chunk of that model waiting up to ``defer_after`` seconds on its bucket;
its jobs were deferred, came back as new messages and took the slots again, while another model's
chunks waited behind them (measured: 8 slots, a 120 RPM model's 1,200 jobs queued before a
600 RPM model's 600: the 600 RPM model ran at 35% of its limit). Now, with ``patience`` the
seconds a job may wait here for its bucket (``defer_after``):

- a chunk whose pair already has more than ``patience`` of work waiting here is deferred whole,
  at once (``worker.engine``): its slot is free again in milliseconds;
- a chunk admitted keeps its place: its jobs are counted here from admission (chunks that arrive
  before they reach the bucket see them), none of them is deferred for the wait it was admitted
  with, and each may wait that long plus ``patience`` for the bucket;
- a pair holds at most an equal share of the slots among the pairs with work here (``within_share``;
  half of them while its limits are a guess): its next chunk is deferred, so that the chunks of the
  others do not wait behind its own in the broker's queue (4 slots, chunks of 10: every chunk of a
  600 RPM model fitted its queue and took a slot, and a 120 RPM model's waited 10 s);
- a job that would wait longer than its patience behind its pair's queue is deferred at once, not
  when the wait times out (``worker.runner``: jobs admitted while the limits were still a guess).

So a pair holds about as many slots as its limit drains in ``patience`` plus one chunk (deficit by
limit), within its share, and the other slots go to the pairs that can use them.

When deferred work comes back: at its turn by this worker's queue and the work deferred before it
(a schedule per pair), ``LEAD_SECONDS`` early so the queue never runs dry. It is then admitted
whole and runs at the turn it was booked for. (Before, a chunk of 25 jobs of a 120 RPM model,
12.5 s of its limit, came back to a queue of 5 s: its jobs past ``defer_after`` were deferred again
to the end of the schedule, the work booked after it came back late, and the model waited 3-6 s
between answers: 87.6-96.8% of its limit. And chunks that arrived within the same few milliseconds
all found the queue short, as their jobs had not reached the bucket yet: 10 chunks of one model
were admitted at once and held every slot.)
A schedule is priced by the limits in force when it was booked; when they grow (the share of the
account given back after another client's spending cut it), ``reprice`` shrinks each wait by the
speed-up (``worker.reschedule`` moves the deferred set's entries): priced at a quarter share, 50 jobs
waited 10 s a chunk after the share was whole again, and each chunk, back at once, went out in one
burst. At most ``MAX_DEFER_SECONDS`` ahead: a longer schedule would leave the pair idle if the jobs in it
never came back (cancelled, or taken by another worker). Other workers' use of the same bucket is
not seen here: deferred work then comes back early and is deferred again, which costs a message.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.worker.limiter import BucketLimits

__all__ = [
    "CATCH_UP_SECONDS", "CREDIT_SECONDS", "LEAD_SECONDS", "MAX_DEFER_SECONDS", "MIN_PATIENCE_SECONDS",
    "REPRICE_SPEEDUP", "Backlog", "job_ref", "seconds_of",
]

MAX_DEFER_SECONDS = 60.0
# A shorter queue may run dry before deferred work comes back (the mover looks every 0.5 s).
MIN_PATIENCE_SECONDS = 2.0
# How early deferred work comes back before its turn (at most half of the patience): each
# second of it holds a slot per chunk of the pair's limit's worth longer, so it is short.
LEAD_SECONDS = 2.0
# How long a level reported by the bucket's last correction is believed (they come every 50 ms
# while answers arrive; the level also pays for what was granted since).
CREDIT_SECONDS = 2.0
# Limits this many times faster than those that priced deferred work bring it forward (a share
# given back by a few percent at a time would otherwise rewrite the schedule on every answer).
REPRICE_SPEEDUP = 1.15
# A schedule this many seconds behind the work waiting here is brought forward (``catch_up``); less
# is not worth a write (the mover looks every 0.5 s).
CATCH_UP_SECONDS = 1.0


@dataclass
class _Queue:
    limits: BucketLimits
    requests: int = 0  # jobs of this worker waiting for the pair's bucket
    tokens: int = 0  # their charges
    # Jobs the engine admitted that have not reached the bucket yet, counted above (chunks that
    # arrive meanwhile see them): job_ref -> (charge, seconds of work ahead of it when admitted,
    # None unless it keeps its place).
    admitted: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    schedule_end: float = 0.0  # monotonic time until which deferred work is due back
    # deferred-set member -> (monotonic time it is due back, the limits that priced it): what
    # ``recall`` brings back early, and ``reprice`` sooner
    deferred: dict[str, tuple[float, BucketLimits]] = field(default_factory=dict)
    slowest: BucketLimits | None = None  # the slowest limits among those that priced the schedule
    credit: float = 0.0  # seconds of limits the bucket held at its last correction (``credit``)
    credit_at: float = float("-inf")  # monotonic time of that correction

    def work(self, now: float) -> float:
        """Seconds of the bucket the jobs waiting here need beyond what it holds (a recent
        ``credit``): a generous server's opening allowance, or a gift of its room, is spent at once."""
        held = self.credit if now - self.credit_at < CREDIT_SECONDS else 0.0
        return max(0.0, seconds_of(self.limits, self.requests, self.tokens) - held)

    def forget(self, job: str) -> None:
        """Stop counting ``job`` as admitted (it reached the bucket, or its run ended)."""
        admitted = self.admitted.pop(job, None)
        if admitted is not None:
            self.requests -= 1
            self.tokens -= admitted[0]


def job_ref(batch_id: str, custom_id: str) -> str:
    """How the backlog names a job (custom ids repeat across batches): as the deferred set does,
    so that ``recall`` hands back members of that set."""
    return f"{batch_id}{DEFERRED_SEP}{custom_id}"


def _speedup(before: BucketLimits, after: BucketLimits) -> float:
    """How many times sooner ``after`` drains the same work as ``before`` (the lesser of its
    request and token speed-ups: either may bind)."""
    return min(after.request_rate / before.request_rate, after.token_rate / before.token_rate)


def seconds_of(limits: BucketLimits, requests: float, tokens: float) -> float:
    """Seconds the bucket takes to refill ``requests`` requests and ``tokens`` tokens."""
    return max(requests / limits.request_rate, tokens / limits.token_rate)


class Backlog:
    """The jobs each bucket key has waiting in this process (one event loop; no locking)."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._holding: dict[str, int] = {}  # key -> chunks holding a slot for its jobs

    def hold(self, key: str) -> None:
        """Count a chunk slot as held for ``key``'s jobs (until ``let_go``)."""
        self._holding[key] = self._holding.get(key, 0) + 1

    def let_go(self, keys: Iterable[str]) -> None:
        """The chunks held for ``keys`` (one each) ended."""
        for key in keys:
            self._holding[key] -= 1
            if not self._holding[key]:
                del self._holding[key]

    def within_share(self, key: str, slots: int) -> bool:
        """May ``key`` hold one more of the worker's ``slots``? Yes while it holds fewer than an
        equal share of them among the pairs with work here (jobs waiting, chunks held, or work
        booked to come back), at least one: a pair over its share would keep the chunks of the
        others waiting behind its own in the broker's queue."""
        now = time.monotonic()
        busy = {k for k, queue in self._queues.items() if queue.requests or queue.schedule_end > now}
        busy.update(self._holding)
        busy.add(key)
        return self._holding.get(key, 0) < max(1, slots // len(busy))

    def ahead(self, key: str) -> tuple[float, BucketLimits | None]:
        """Seconds of the bucket's limits the jobs waiting on ``key`` here need, and those limits
        (None while no job of ``key`` has waited here)."""
        queue = self._queues.get(key)
        if queue is None:
            return 0.0, None
        return queue.work(time.monotonic()), queue.limits

    def booked(self, key: str) -> float:
        """Seconds until the work deferred here on ``key`` and not back yet (``returned``) is due."""
        queue = self._queues.get(key)
        if queue is None or not queue.deferred:
            return 0.0
        return max(0.0, max(at for at, _ in queue.deferred.values()) - time.monotonic())

    def returned(self, members: Iterable[str]) -> None:
        """Deferred work is back (a new run of its jobs): no route's ``booked`` waits for it any more,
        whichever it takes now."""
        for member in members:
            for queue in self._queues.values():
                queue.deferred.pop(member, None)

    def schedule(
        self, key: str, limits: BucketLimits, costs: Sequence[int], patience: float, members: Iterable[str] = ()
    ) -> float:
        """Seconds to defer jobs charging ``costs`` for: until their turn behind the queue here
        and the work deferred before them, less half of ``patience``: back then, they find the
        queue short enough to be admitted. ``MAX_DEFER_SECONDS`` at most: work past it asks again
        then, and is not booked. ``members`` (their job_refs) are remembered for ``recall``."""
        queue = self._queue(key, limits)
        priced = queue.limits.priced()  # the whole limits while the share is the opening's guess
        now = time.monotonic()
        lead = min(max(patience, MIN_PATIENCE_SECONDS) / 2, LEAD_SECONDS)
        due = max(now + queue.work(now) * queue.limits.share / priced.share - lead, queue.schedule_end, now)
        if due - now >= MAX_DEFER_SECONDS:  # beyond the schedule kept: it asks again then
            due = now + MAX_DEFER_SECONDS
        else:
            queue.schedule_end = due + seconds_of(priced, len(costs), sum(costs))
        if len(queue.deferred) > 10_000:  # those already back are of no more use
            queue.deferred = {m: booked for m, booked in queue.deferred.items() if booked[0] > now}
        queue.deferred.update(dict.fromkeys(members, (due, priced)))
        if queue.slowest is None or _speedup(queue.slowest, priced) < 1:
            queue.slowest = priced
        return min(due - now, MAX_DEFER_SECONDS)  # exactly the cap when capped (float rounding)

    def admit(self, key: str, limits: BucketLimits, jobs: dict[str, int], keep_place: bool = True) -> None:
        """Count ``jobs`` (job_ref -> charge, in their order) as waiting on ``key`` from now on:
        the engine admitted them, and the chunks that arrive before they reach the bucket must see
        them. With ``keep_place`` each is not deferred for its wait (``defer_for``), and
        ``patience`` allows for the wait it had ahead when admitted (not when that wait is priced
        by limits that are a guess: such a job waits ``defer_after`` at most, as any other)."""
        queue = self._queue(key, limits)
        for job, cost in jobs.items():
            if job not in queue.admitted:
                ahead = seconds_of(limits, queue.requests, queue.tokens) if keep_place else None
                queue.admitted[job] = (cost, ahead)
                queue.requests += 1
                queue.tokens += cost

    def patience(self, job: str, default: float) -> float:
        """Seconds ``job`` may wait for the bucket: ``default``, plus the wait it was admitted with."""
        for queue in self._queues.values():
            ahead = queue.admitted[job][1] if job in queue.admitted else None
            if ahead is not None:
                return default + ahead
        return default

    def release(self, jobs: Iterable[str]) -> None:
        """Stop counting admitted ``jobs`` that never waited on the bucket (their run ended first)."""
        for job in jobs:
            for queue in self._queues.values():
                queue.forget(job)

    def recall(self, key: str) -> list[str]:
        """The deferred-set members of ``key``'s work deferred here and not yet due, forgotten with
        the schedule: it was priced by a charge rule no longer in force (a cheaper one learned
        would otherwise leave the bucket idle until the old schedule's end, up to a minute)."""
        queue = self._queues.get(key)
        if queue is None:
            return []
        now = time.monotonic()
        members = [member for member, (at, _) in queue.deferred.items() if at > now]
        queue.deferred.clear()
        queue.schedule_end, queue.slowest = 0.0, None
        return members

    def credit(self, key: str, limits: BucketLimits, requests: float, tokens: float) -> None:
        """The bucket's levels as its last correction reported them: work that fits in what it
        holds waits for nobody. Why: priced at the refill rate alone, the work behind a 60 s server
        window's opening allowance (1,500 jobs that fit in it) was deferred in chunks of 50 every 2 s
        while the server reported 35 s of limit left (wall 1.5-3.2 times the minimum)."""
        queue = self._queue(key, limits)
        queue.credit = max(0.0, min(requests / limits.request_rate, tokens / limits.token_rate))
        queue.credit_at = time.monotonic()

    def reprice(self, key: str, limits: BucketLimits) -> dict[str, float]:
        """Bring ``key``'s schedule forward when ``limits`` spend faster than those that priced
        it (the share given back after a cut, by REPRICE_SPEEDUP at least): each member's wait
        from now shrinks by its speed-up. Returns the members moved, with their seconds from now.
        Why: work deferred during a deep cut (a share of 0.25 priced 50 jobs at 10 s) came back on
        that schedule after the share was back at 1: the bucket idled between chunks, and each
        chunk, back at once, was sent in one burst (measured: 50 calls every 10 s for 40 s at
        half the limit left by another client)."""
        queue = self._queues.get(key)
        limits = limits.priced()
        if queue is None or queue.slowest is None or _speedup(queue.slowest, limits) < REPRICE_SPEEDUP:
            return {}
        now = time.monotonic()
        moved: dict[str, float] = {}
        for member, (at, priced) in queue.deferred.items():
            speedup = _speedup(priced, limits)
            if at > now and speedup >= REPRICE_SPEEDUP:
                moved[member] = (at - now) / speedup
                queue.deferred[member] = (now + moved[member], limits)
        if queue.schedule_end > now:
            queue.schedule_end = now + (queue.schedule_end - now) / _speedup(queue.slowest, limits)
        queue.slowest = limits
        return moved

    def catch_up(self, key: str) -> dict[str, float]:
        """Bring ``key``'s schedule forward when the work booked ahead of it here is gone sooner
        than priced (sent from what the bucket held: a generous server's room, a gift): its first
        booking is then due at its turn behind what waits here now, and the rest as many seconds
        earlier. Returns the members moved, with their seconds from now. Why: with a 60 s server
        window, 100 jobs booked behind 900 at the opening came back at t=27-29 s, while everything
        ahead of them was sent by t=9 s and the server's room refilled unused (wall 2.6 times the
        minimum)."""
        queue = self._queues.get(key)
        now = time.monotonic()
        due = [at for at, _ in queue.deferred.values() if at > now] if queue is not None else []
        if queue is None or not due:
            return {}
        early = min(due) - (now + max(0.0, queue.work(now) - LEAD_SECONDS))
        if early < CATCH_UP_SECONDS:
            return {}
        moved: dict[str, float] = {}
        for member, (at, priced) in queue.deferred.items():
            if at > now:
                moved[member] = max(0.0, at - early - now)
                queue.deferred[member] = (now + moved[member], priced)
        queue.schedule_end = max(now, queue.schedule_end - early)
        return moved

    def defer_for(self, key: str, limits: BucketLimits, cost: int, patience: float, job: str = "") -> float | None:
        """None when a job charging ``cost`` should queue now, else the seconds to defer it for:
        the jobs ahead of it here already need more than ``patience`` seconds of the bucket.
        A job the engine admitted (``admit``) queues: its place was judged on arrival."""
        ahead, _ = self.ahead(key)
        queue = self._queues.get(key)
        kept = queue is not None and job in queue.admitted and queue.admitted[job][1] is not None
        if ahead <= patience or limits.slow_start or kept:
            return None  # slow start: the limits are still a guess, no schedule is priced by them
        return self.schedule(key, limits, [cost], patience, (job,) if job else ())

    @contextmanager
    def waiting(self, key: str, limits: BucketLimits, cost: int, job: str = "") -> Iterator[None]:
        """Count a job charging ``cost`` as waiting on ``key`` (with ``limits``) while the block
        runs; an admitted ``job`` was counted already, and stops being counted at the end."""
        queue = self._queue(key, limits)
        queue.forget(job)  # counted since its admission, at its charge then
        queue.requests += 1
        queue.tokens += cost
        try:
            yield
        finally:
            queue.requests -= 1
            queue.tokens -= cost

    def _queue(self, key: str, limits: BucketLimits) -> _Queue:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(limits)
        queue.limits = limits
        return queue
