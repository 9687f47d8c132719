"""The worker's side of budgets in USD (issue 14; the rules are in ``ratequeue/jobstore/budgets.py``).

``reserve`` is called just before a job is sent (its bucket capacity already granted), so a
reservation is held only while its call is in flight; ``settle`` replaces it by the actual cost.
A refused job is deferred, never failed:

- others hold reservations in the refusing scope: their answers may cost less than reserved and
  make room, so it is tried again in ``RETRY_SOON`` seconds;
- nothing is reserved there: only a raised budget (or, for the daily one, the next UTC day) lets it
  run; it waits ``RECHECK`` seconds, and ``ratequeue budget`` makes it due at once.

Its first-run time is reset: time spent waiting for budget is not counted against the job's
deadline (RATEQUEUE_JOB_DEADLINE bounds trying, and a raise must let it complete).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ratequeue.config.models import ModelSpec
from ratequeue.config.settings import Settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.budgets import to_nano
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.scripts import lua_source
from ratequeue.worker.attempt import Deferral, JobRun, Step
from ratequeue.worker.settle import Settler

log = logging.getLogger(__name__)

RETRY_SOON = 1.0  # seconds: a refusal while other calls hold reservations
RECHECK = 300.0  # seconds: a refusal with nothing in flight (a raise wakes the job sooner)
SETTLE_RETRIES = 600  # one a second: a settle that fails for 10 minutes is left to expire
HOLD_MARGIN = 60.0  # seconds a reservation outlives the longest call before it is given back
# How long a worker trusts its reading that no budget applies to a batch. Holding and settling cost
# two Redis round trips per call (20,000 jobs: 15.6 s instead of 11.4 s, bench/pipeline_bench.py
# without latency), paid by no one while there is no budget; a budget set later starts from what
# was spent (jobstore.budgets), and is followed here within this long.
NO_BUDGET_TTL = 0.25


@dataclass(frozen=True)
class Reservation:
    member: str
    batch_id: str
    day: str


@dataclass(frozen=True)
class Refusal:
    scope: str  # "batch" or "daily"
    wait: float  # seconds until the job is tried again


def worst_case_usd(spec: ModelSpec, job: StoredJob) -> float:
    """The most the call can cost: its prompt at list price (no cache) and its whole reserved output."""
    return spec.cost_usd(job.prompt_tokens, 0, job.output_tokens)


class Budgets:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._redis = client
        self._reserve = client.register_script(lua_source("budget_reserve"))
        self._settle = client.register_script(lua_source("budget_settle"))
        self._hold_ms = int((settings.read_timeout + settings.connect_timeout + HOLD_MARGIN) * 1000)
        daily = settings.daily_budget_usd
        self._daily_default = -1 if daily is None else to_nano(daily)
        self._later: set[asyncio.Task[None]] = set()  # settles retried while Redis is down or full
        self._refused: dict[str, float] = {}  # batch_id -> when a job of it was last refused here (monotonic)
        self._unbudgeted: dict[str, float] = {}  # batch_id -> when no budget applied to it (monotonic)

    def known_free(self, batch_id: str) -> bool:
        """No budget applied to this batch a moment ago (no Redis call: the hot path asks first)."""
        seen = self._unbudgeted.get(batch_id)
        return seen is not None and self._daily_default < 0 and time.monotonic() - seen < NO_BUDGET_TTL

    def refused_lately(self, batch_id: str) -> bool:
        """A job of this batch was refused here lately: ``precheck`` has something to check."""
        return batch_id in self._refused

    async def _applies(self, batch_id: str) -> bool:
        """Does a budget (the batch's or the day's) apply to this batch's calls? Read at most every
        NO_BUDGET_TTL seconds per batch while none does; always with a daily budget in the environment."""
        if self._daily_default >= 0:
            return True
        if self.known_free(batch_id):
            return False
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hexists(keys.budget_batches(), f"{batch_id}:limit")
            pipe.hexists(keys.budget_days(), "limit")
            batch_limit, day_limit = await pipe.execute()
        if batch_limit or day_limit:
            self._unbudgeted.pop(batch_id, None)
            return True
        if len(self._unbudgeted) > 10_000:  # batches come and go: keep the cache bounded
            self._unbudgeted.clear()
        self._unbudgeted[batch_id] = time.monotonic()
        return False

    async def reserve(self, batch_id: str, spec: ModelSpec, job: StoredJob) -> Reservation | Refusal | None:
        """Hold the job's worst case against its budgets; None: no budget applies, nothing held."""
        if not await self._applies(batch_id):
            return None
        member = f"{batch_id} {job.custom_id} {secrets.token_hex(6)}"
        amount = to_nano(worst_case_usd(spec, job))
        reply = await self._reserve(keys=keys.budget_keys(),
                                    args=[batch_id, member, amount, self._hold_ms, self._daily_default])
        if int(reply[0]) == 1:
            self._refused.pop(batch_id, None)
            return Reservation(member, batch_id, text(reply[1]))
        return Refusal(text(reply[1]), RETRY_SOON if int(reply[2]) > 0 else RECHECK)

    async def settle(self, held: Reservation | None, actual_usd: float) -> None:
        """The reservation replaced by the actual cost (0: a failed call, released; None: nothing held).

        Never raises a Redis error: the answer is paid for, and a job whose pass raised would be
        sent again. While Redis is down or full the settle is retried in the background; a worker
        that dies first leaves the reservation to expire (its spend is then not counted)."""
        if held is None:
            return
        args: list[str | int] = [held.member, held.batch_id, held.day, to_nano(max(actual_usd, 0.0))]
        try:
            await self._settle(keys=keys.budget_keys()[:4], args=args)
        except (RedisError, OSError) as exc:
            log.warning("budget settle of %s failed (%s): retried in the background", held.batch_id, exc)
            task = asyncio.get_running_loop().create_task(self._settle_later(args))
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def _settle_later(self, args: list[str | int]) -> None:
        for _ in range(SETTLE_RETRIES):
            await asyncio.sleep(1.0)
            try:
                await self._settle(keys=keys.budget_keys()[:4], args=args)
                return
            except (RedisError, OSError):
                continue
        log.error("budget settle of %s given up after %d s: its reservation expires", args[1], SETTLE_RETRIES)

    async def defer(self, settler: Settler, run: JobRun, refusal: Refusal) -> Step:
        """Defer a refused job; its deadline starts again when it runs. If it fits now (a raise
        came between the refusal and the deferral, and its wake missed this job; or calls in
        flight settled for less), it is made due now."""
        self._refused[run.batch_id] = time.monotonic()
        step = await settler.defer(run, refusal.wait, Deferral.BUDGET)
        await self._redis.hdel(keys.batch_started(run.batch_id), run.job.custom_id)
        if await self._check(run.batch_id, run.spec, run.job) is None:
            await settler.store.defer(run.batch_id, run.job.custom_id, 0.0)
        return step

    async def precheck(self, batch_id: str, spec: ModelSpec, job: StoredJob) -> Refusal | None:
        """Before a job takes bucket capacity: a batch refused on this worker lately is checked
        first (read only; the reservation stays the rule), so that jobs which cannot fit do not
        take the bucket's grants in turn only to give them back (a stopped batch's hundreds of
        jobs would otherwise each pass through the bucket to be refused). Other batches: no call."""
        refused_at = self._refused.get(batch_id)
        if refused_at is None:
            return None
        if time.monotonic() - refused_at > RECHECK:
            del self._refused[batch_id]
            return None
        return await self._check(batch_id, spec, job)

    async def _check(self, batch_id: str, spec: ModelSpec, job: StoredJob) -> Refusal | None:
        """Would the job's worst case fit now? The rule of budget_reserve.lua, read without holding."""
        amount = to_nano(worst_case_usd(spec, job))
        day = int(time.time()) // 86400  # this host's clock: only a hint, the script uses Redis's
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.budget_batches(), [f"{batch_id}:{f}" for f in ("limit", "spent", "reserved")])
            pipe.hmget(keys.budget_days(), ["limit", f"{day}:spent", f"{day}:reserved"])
            (b_limit, b_spent, b_reserved), (d_limit, d_spent, d_reserved) = await pipe.execute()
        daily = int(d_limit) if d_limit is not None else self._daily_default
        for scope, limit, spent, reserved in (("batch", None if b_limit is None else int(b_limit), b_spent, b_reserved),
                                              ("daily", None if daily < 0 else daily, d_spent, d_reserved)):
            if limit is not None and int(spent or 0) + int(reserved or 0) + amount > limit:
                return Refusal(scope, RETRY_SOON if int(reserved or 0) > 0 else RECHECK)
        return None
