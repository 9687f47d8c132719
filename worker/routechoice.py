"""Which of a model's several routes a job takes (issue 13 part 4): the one that can start it soonest.

A route's expected wait is what its bucket says now plus what this worker already has queued for it:

- ``bucket_wait``: from the shared bucket's levels (``peek.lua``: one Redis call per route and
  chunk, all routes at once). Every worker's reservations are debited there at once (negative
  levels: debt), and a 429's not-before is there too, so this part is right across many workers.
- ``ahead``: seconds of this worker's admitted jobs still waiting for the bucket (worker.backlog):
  the chunks chosen just before this one, not yet reserved, would otherwise all look elsewhere;
  or, when longer, until the work this worker deferred on the route and not back yet is due
  (``booked``).

A parked route is skipped. It is still probed as before (worker.parking: one job per cooldown across
all workers), but only while the other routes have a queue: an idle healthy route needs no help, and
a job sent to probe a route that keeps failing (a refused key) must not be the batch's last job for
ever. A route this worker holds no key for is skipped while any other is usable. When every route is
parked or refused the job takes the first (the runner then defers it as it does for one route).

The choice is made once per run (worker.engine, before the chunk's jobs are admitted) and kept in
``Routing`` for the runner: a job stays on one route for the whole run, charged on that bucket only;
deferred, its next run chooses again. Each choice is counted per route (``keys.route_use``) for
``ratequeue status``; the metrics need no new label, since a route's pair (account, model) labels
already tell the routes apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.backlog import Backlog, job_ref
from ratequeue.worker.bucket_values import BucketLevels, BucketLimits
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import Limiter, LimiterError
from ratequeue.worker.parking import Parking
from ratequeue.worker.routing import Routing, Target

log = logging.getLogger(__name__)

TIE_SECONDS = 0.05  # expected waits this close are a tie
PROBE_BEHIND_SECONDS = 0.1  # a parked route is probed only while the best healthy one has this much queued
ROUTE_USE_TTL = 7 * 86400  # the per-route counts outlive a week of idleness, not for ever


@dataclass(frozen=True)
class Candidate:
    """What the choice knows of one route for one job (seconds; flags)."""

    wait: float = 0.0  # until the shared bucket could send this job (bucket_wait)
    ahead: float = 0.0  # of this worker's work already queued for the bucket
    parked: bool = False
    probe_due: bool = False  # parked, and its cooldown has passed: a job may probe it
    refused: bool = False  # this worker holds no key for it

    @property
    def expected(self) -> float:
        return self.wait + self.ahead


def choose(candidates: Sequence[Candidate], turn: int = 0) -> int:
    """The index of the route to take. Routes within ``TIE_SECONDS`` of the soonest are taken in
    turn (`turn`: a count of the choices made): deferred work coming back finds every route idle,
    and always the first listed left the others idle while it worked through it (measured: 2 routes
    of 3,000 RPM, 1,339 and 761 calls of 2,100)."""
    usable = [i for i, c in enumerate(candidates) if not c.refused and not c.parked]
    keyed = [i for i, c in enumerate(candidates) if not c.refused]
    due = [i for i in keyed if candidates[i].probe_due]
    if usable:
        soonest = min(candidates[i].expected for i in usable)
        ties = [i for i in usable if candidates[i].expected <= soonest + TIE_SECONDS]
        best = ties[turn % len(ties)]
        return due[0] if due and candidates[best].expected >= PROBE_BEHIND_SECONDS else best
    return (due or keyed or [0])[0]


def bucket_wait(levels: BucketLevels, limits: BucketLimits, cost: int) -> float:
    """Seconds until the bucket read as `levels` could grant one request of `cost` tokens (reserve.lua's rule)."""
    now = levels.now_us / 1e6
    return max(0.0, (1 - levels.requests) / limits.request_rate, (cost - levels.tokens) / limits.token_rate,
               levels.not_before_ms / 1000 - now)


class RouteChooser:
    """Chooses the routes of a chunk's jobs for one worker process (one event loop)."""

    def __init__(self, routing: Routing, limiter: Limiter, parking: Parking, backlog: Backlog, learned: Learned,
                 redis: aioredis.Redis) -> None:
        self.routing, self.limiter, self.parking = routing, limiter, parking
        self.backlog, self.learned, self.redis = backlog, learned, redis
        self._probing: dict[str, float] = {}  # pair -> when this worker last sent a job to probe it
        self._counting: set[asyncio.Task[None]] = set()  # kept referenced until done
        # Choices made per model: whose turn a tie is. Per model: with one count for all, two models'
        # chunks arriving in turn each got the same tie index for ever (one route took all of each).
        self._turns: Counter[str] = Counter()

    async def assign(self, batch_id: str, batch_account: str, jobs: Sequence[StoredJob]) -> None:
        """Choose the route of the jobs that have several (noted in ``routing`` until ``forget``).

        One route per chunk (its jobs share a model and an account): a chunk holds one of the
        worker's slots for one pair (worker.backlog's fair slots), and a chunk split over two
        buckets would count against both pairs' shares. Successive chunks spread over the routes
        as their waits grow. A probe is one job, never a chunk: the rest take the best usable route."""
        groups: dict[tuple[str | None, str], list[StoredJob]] = defaultdict(list)
        for job in jobs:
            groups[job.account, job.model].append(job)
        several = [(group, targets) for group in groups.values()
                   if len(targets := self.routing.targets(batch_account, group[0])) > 1]
        if not several:
            return
        # Back from a deferral, chosen afresh: its booking would keep the route that deferred it looking
        # busy (two routes, 3,000 jobs: one sat idle 7 s while the chunks booked on it went to the other).
        self.backlog.returned(job_ref(batch_id, job.custom_id) for group, _ in several for job in group)
        unique = list({t.key: t for _, targets in several for t in targets}.values())
        for t in unique:  # what other workers learned of a route this one has not used yet (cached)
            await self.learned.load(t.pair)
        levels = await self._levels(unique)
        used: Counter[tuple[str, str, str]] = Counter()
        for group, targets in several:
            costs = [group[0].charge_under(self.learned.rule(t.pair, t.spec)) for t in targets]
            candidates = [await self._candidate(t, levels.get(t.key), cost)
                          for t, cost in zip(targets, costs, strict=True)]
            turn = self._turns[group[0].model] = self._turns[group[0].model] + 1
            best = choose([dataclasses.replace(c, probe_due=False) for c in candidates], turn)
            probe = choose(candidates, turn)
            if probe != best and candidates[probe].parked:
                self._probing[targets[probe].pair] = time.monotonic()
                self._take(batch_id, group[:1], targets[probe], used)
                group = group[1:]
            self._take(batch_id, group, targets[best], used)
        # Counted in the background: the engine admits the chunk (worker.backlog) with no await
        # between this return and that, so the next chunk's choice sees this one's jobs queued.
        task = asyncio.get_running_loop().create_task(self._count(used))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    def _take(self, batch_id: str, jobs: Sequence[StoredJob], target: Target,
              used: Counter[tuple[str, str, str]]) -> None:
        for job in jobs:
            self.routing.assign(job_ref(batch_id, job.custom_id), target.route)
        used[target.route.model, target.route.name, target.pair] += len(jobs)

    async def _candidate(self, target: Target, levels: BucketLevels | None, cost: int) -> Candidate:
        if target.refused is not None:
            return Candidate(refused=True)
        parked = await self.parking.state(target.account, target.spec.name)
        if parked is not None:
            last = parked.last_probe or parked.since
            mine = self._probing.get(target.pair, float("-inf"))  # this worker's own probe, not yet recorded
            due = time.time() >= last + parked.cooldown and time.monotonic() >= mine + parked.cooldown
            return Candidate(parked=True, probe_due=due)
        limits = self._limits(target)
        wait = 0.0 if levels is None else bucket_wait(levels, limits, cost)
        ahead, priced = self.backlog.ahead(target.key)
        if priced is not None and priced != limits:
            # Priced by the limits in force at admission (a guess before the server announced
            # them: 500 RPM where it serves 3,000 kept a route looking six times as busy as it
            # was): rescaled to today's, an upper bound whichever of the two buckets binds.
            ahead *= max(priced.request_rate / limits.request_rate, priced.token_rate / limits.token_rate)
        # A chunk past the queue's patience is booked at the schedule's end: with both routes'
        # queues past it, the queues alone sent every deferred chunk to the one a hair shorter
        # (3,000 jobs on two routes: 30 chunks booked 60 s ahead on one, 15 s on the other).
        return Candidate(wait=wait, ahead=max(ahead, self.backlog.booked(target.key)))

    def _limits(self, target: Target) -> BucketLimits:
        """The bucket's limits now: learned (here or by another worker), else configured."""
        return self.learned.limits(target.pair, target.spec)

    async def _levels(self, targets: list[Target]) -> dict[str, BucketLevels]:
        """Every route's bucket levels, read at once; none when Redis fails (the local view decides)."""
        try:
            read = await asyncio.gather(*(self.limiter.peek(t.key, self._limits(t)) for t in targets))
        except LimiterError as exc:
            log.warning("route choice without the buckets' levels: %s", exc)
            return {}
        return {t.key: lv for t, lv in zip(targets, read, strict=True)}

    async def _count(self, used: Counter[tuple[str, str, str]]) -> None:
        """Add this chunk's choices to the per-route counts `status` shows (lost counts lose nothing
        else), with each route's pair: `status` may run where the key its bucket id derives from is not."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (model, route, pair), n in used.items():
                    pipe.hincrby(keys.route_use(model), route, n)
                    pipe.hset(keys.route_use(model), keys.route_pair_field(route), pair)
                    pipe.expire(keys.route_use(model), ROUTE_USE_TTL)
                await pipe.execute()
        except Exception as exc:  # RedisError and connection errors: the count only informs
            log.warning("route use not counted: %s", exc)


__all__ = ["Candidate", "RouteChooser", "bucket_wait", "choose"]
