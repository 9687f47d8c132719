"""What the server's answers teach one worker process about each (account, model) pair.

- the limits it announces (``x-ratelimit-limit-*``), which override configured ones and are
  shared with other workers through Redis (``rq:learned``);
- the charge rule it applies, read off ``x-ratelimit-remaining-tokens`` against the account-wide
  charge ledger (``worker/chargerule.py``, ``worker/ledger.py``), followed by default (the
  configured rule is the starting guess; pinned per model or for all) and shared with the other
  workers through Redis (``rq:rules``; ``worker/rulelearner.py``);
- a slowdown after 429s that carry no headers to learn from: cut by a fifth, then recover slowly;
- the server's window (``worker/window.py``): our bucket's burst follows it, and stays in Redis;
- slow start: until the server announces a pair's limits to this worker, one request, then two
  more per answer, shared by every worker in slow start (``reserve.lua``, ``slow_start.lua``).
- the share of the limits other clients of the account leave us, kept in the shared bucket
  (reconcile.lua) and followed here, under the configured ``max_share``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ratequeue.config.charge import ChargeRule
from ratequeue.config.models import ModelSpec
from ratequeue.config.settings import Settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.ledger import ChargeLedger, Ticket
from ratequeue.worker.limiter import BucketLimits, Limiter, LimiterError, slow_start_key
from ratequeue.worker.rulelearner import RuleLearner, rule_fields
from ratequeue.worker.window import SHRINK_TOLERANCE, TOLERANCE, WindowLearner

log = logging.getLogger(__name__)
RELOAD_SECONDS = 5.0  # how often the limits and rules other workers learned are read again
# While a pair is in slow start here: how often to look whether another worker has heard the server
# announce its limits (``load``, ``await_announcement``), and for how long one watch lasts.
ANNOUNCED_POLL_SECONDS, ANNOUNCED_WATCH_SECONDS = 0.2, 60.0
ANNOUNCED_FIELD = "an"  # in the pair's slow-start hash: the limits (JSON) the server announced to a worker


class Learned:
    """Per-pair knowledge of one event loop; ``pair`` is ``parking.pair_field(account, model)``."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._limits: dict[str, tuple[int, int]] = {}  # pair -> (rpm, tpm) the server announced
        self._loaded: dict[str, float] = {}  # pair -> monotonic time of the last read from Redis
        # pair -> (share of the limits in force, time of the last cut)
        self._throttle: dict[str, tuple[float, float]] = {}
        self._shares: dict[str, float] = {}  # pair -> share of the limits the shared bucket leaves us
        self._guessed: set[str] = set()  # pairs whose share is still the opening's guess
        self._share_cut_at: dict[str, float] = {}  # pair -> monotonic time this worker last took a cut
        self.windows = WindowLearner(settings.burst_seconds)
        self._confirmed: set[str] = set()  # pairs whose limits the server announced: no slow start
        self._announced: set[str] = set()  # announced, slow start ends once the bucket took the answer
        self._watches: dict[str, asyncio.Future[None]] = {}  # pair -> its await_announcement
        self._limiter = Limiter(redis)  # slow-start credits live beside the pair's bucket
        self.ledger = ChargeLedger(redis)
        self._background: set[asyncio.Future[Any]] = set()  # fire-and-forget writes, kept referenced
        self.rules = RuleLearner(settings, redis, self._write)

    async def load(self, pair: str) -> None:
        """Take the limits and the charge rule other workers learned for `pair` (read again every
        RELOAD_SECONDS: a limit learned lower elsewhere must soon fail a request too large for it
        here too, and a rule learned elsewhere must soon price the jobs here). In slow start, every
        ANNOUNCED_POLL_SECONDS, also whether another worker heard the server announce the limits:
        then slow start is over here too, at the share the shared bucket holds. Why: slow start's
        credits come only with answers to slow-start requests, and the first worker out of it sent
        on without them; a second worker waited 10 s for a stale credit while the first spent a
        60 s server window's opening allowance (issue 11)."""
        now = time.monotonic()
        learn = self.settings.learn_limits or self.settings.learn_charge_rule
        slow = pair not in self._confirmed
        if not (learn or slow) or now - self._loaded.get(pair, float("-inf")) < (
            ANNOUNCED_POLL_SECONDS if slow else RELOAD_SECONDS
        ):
            return
        self._loaded[pair] = now
        bucket = keys.bucket_key(*pair.split(":", 1))  # the pair is "<account>:<model>"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.learned_limits(), pair)
            pipe.hmget(keys.learned_rules(), rule_fields(pair))
            pipe.hget(slow_start_key(bucket), ANNOUNCED_FIELD)
            pipe.hget(bucket, "fs")  # reconcile.lua's share
            raw, rule, heard, share = await pipe.execute()
        if raw and self.settings.learn_limits:
            known = orjson.loads(raw)
            self._limits[pair] = (int(known["rpm"]), int(known["tpm"]))
            self._confirmed.add(pair)
        if learn:
            self.rules.take(pair, rule)
        if heard and slow and share is not None:
            known = orjson.loads(heard)
            if self.settings.learn_limits and pair not in self._limits:
                self._limits[pair] = (int(known["rpm"]), int(known["tpm"]))
            self._confirmed.add(pair)
            if float(share) < 1.0:
                self._shares[pair] = float(share)
            log.info("%s: slow start over (another worker heard the server announce the limits)", pair)

    def watch_announcement(self, pair: str, spec: ModelSpec, gate: BucketGate) -> None:
        """Run ``await_announcement`` for ``gate`` unless a watch of ``pair`` runs already."""
        if pair not in self._watches or self._watches[pair].done():
            self._watches[pair] = asyncio.ensure_future(self.await_announcement(pair, spec, gate))

    async def await_announcement(self, pair: str, spec: ModelSpec, gate: BucketGate) -> None:
        """While ``gate`` is in slow start (for ANNOUNCED_WATCH_SECONDS at most): give it the limits
        as soon as another worker has heard them announced (``load``). Its jobs wait inside the
        gate, and no new pass of theirs would look."""
        until = time.monotonic() + ANNOUNCED_WATCH_SECONDS
        while gate.limits.slow_start and pair not in self._confirmed and time.monotonic() < until:
            await asyncio.sleep(ANNOUNCED_POLL_SECONDS)
            try:
                await self.load(pair)
            except RedisError as exc:  # slow start goes on with its credits meanwhile
                log.warning("reading what other workers learned of %s failed: %s", pair, exc)
        if pair in self._confirmed and gate.limits != self.limits(pair, spec):
            gate.update_limits(self.limits(pair, spec))

    def tpm(self, pair: str, spec: ModelSpec) -> int:
        """The TPM limit in force, without the throttle: learned from the server, else configured."""
        return self._limits.get(pair, (spec.rpm, spec.tpm))[1]

    def rule(self, pair: str, spec: ModelSpec) -> ChargeRule:
        """The charge rule in force: learned from the server (unless pinned), else configured."""
        return self.rules.rule(pair, spec)

    def limits(self, pair: str, spec: ModelSpec) -> BucketLimits:
        """The limits in force: learned (else configured), times the throttle's share; spent at
        the share other clients leave us, under the configured ``max_share``."""
        rpm, tpm = self._limits.get(pair, (spec.rpm, spec.tpm))
        throttle = self._throttle.get(pair, (1.0, 0.0))[0]
        share = self.settings.max_share * self._shares.get(pair, 1.0)
        # Deferred work is priced at the whole limits while the share is the opening's guess: priced
        # at it, a batch started in a route's opening was booked at half speed, then brought forward
        # route by route as each one's share came back, and the chunks in between all went to the
        # route repriced first (two routes, 3,000 jobs: one idle for 5 s, 36.7 s for 30 s of limit).
        priced = self.settings.max_share if pair in self._guessed and pair in self._shares else None
        return BucketLimits(rpm * throttle, tpm * throttle, self.windows.window(pair),
                            slow_start=pair not in self._confirmed, share=share, max_share=self.settings.max_share,
                            priced_share=priced)

    def follow_share(self, pair: str, spec: ModelSpec, gate: BucketGate, share: float, guessed: bool = False) -> None:
        """Spend at the share of the limits the shared bucket reports (cut by 429s that other
        clients' spending caused, given back when they stop): every worker follows it.
        `guessed`: that share is still the opening's guess."""
        old = self._shares.get(pair, 1.0)
        opening = pair in self._announced and pair not in self._confirmed
        if opening:
            self._confirmed.add(pair)
            # For the workers still in slow start (``load``): only now, once the shared bucket has
            # taken the answer (its level lowered to a part of the server's room, its window stored).
            self._write(self._announce(gate.key, *self._limits.get(pair, (spec.rpm, spec.tpm))))
        if guessed != (pair in self._guessed):
            self._guessed.symmetric_difference_update({pair})
        elif not opening and abs(share - old) < 0.005 and (share < 1.0) == (old < 1.0):
            return
        if share < old - 0.1 or (share >= 1.0 and old < 1.0):
            log.info("%s: spending %.0f%% of the limits (other clients of the account)", pair, share * 100)
        if share < old:
            self._share_cut_at[pair] = time.monotonic()
        if share >= 1.0:
            self._shares.pop(pair, None)
        else:
            self._shares[pair] = share
        gate.update_limits(self.limits(pair, spec))

    def learn_limits(
        self, pair: str, spec: ModelSpec, headers: RateLimitHeaders, gate: BucketGate, refused: bool = False
    ) -> None:
        """Take the limits the server announces (x-ratelimit-limit-*) over configured ones, and
        its window; count the answer in slow start. `refused`: the answer was a 429."""
        announced = headers.limit_requests is not None or headers.limit_tokens is not None
        in_slow_start = gate.limits.slow_start
        if announced and pair not in self._confirmed:
            # This worker's slow start ends once the shared bucket has taken this answer (follow_share,
            # after the reconciler's flush): its level is lowered to a part of the server's remaining and
            # its share is set. Ended here, the worker granted a whole configured bucket within those
            # 50 ms, before either: another deployment on the key did the same (issue 11).
            self._announced.add(pair)
        window = self.windows.observe(pair, headers, refused) if self.settings.learn_window else None
        if in_slow_start or window is not None:
            # In this order: a worker still in slow start is given more credits only once the
            # bucket has the server's window, or it could spend a burst of the wrong size.
            self._write(self._share(pair, spec, gate, window, (1 if refused else 2) if in_slow_start else 0))
        if self.settings.learn_limits and announced:
            self._take_limits(pair, spec, headers)
        if gate.limits != self.limits(pair, spec):
            gate.update_limits(self.limits(pair, spec))

    async def _announce(self, key: str, rpm: int, tpm: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(slow_start_key(key), ANNOUNCED_FIELD, orjson.dumps({"rpm": rpm, "tpm": tpm}))
            pipe.pexpire(slow_start_key(key), 600_000)  # as slow_start.lua: idle for 10 min, slow again
            await pipe.execute()

    def _take_limits(self, pair: str, spec: ModelSpec, headers: RateLimitHeaders) -> None:
        rpm, tpm = self._limits.get(pair, (spec.rpm, spec.tpm))
        new = (headers.limit_requests or rpm, headers.limit_tokens or tpm)
        if new == (rpm, tpm) and pair in self._limits:
            return
        self._limits[pair] = new
        if new != (rpm, tpm):
            log.warning("learned limits of %s from the server: %d RPM, %d TPM", pair, *new)
            record = orjson.dumps({"rpm": new[0], "tpm": new[1], "at": time.time()})
            self._write(self.redis.hset(keys.learned_limits(), pair, record))

    def _write(self, call: Awaitable[Any]) -> None:
        """A fire-and-forget Redis write (a lost one is learned again from the next answers)."""
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("storing what was learned failed: %r", task.exception())

    async def _share(self, pair: str, spec: ModelSpec, gate: BucketGate, window: float | None, credits: int) -> None:
        """Tell every worker: the bucket's new window (set_window.lua: once, whoever comes first),
        then the slow-start credits this answer earned (2, doubling per round trip; 1 after a 429)."""
        try:
            if window is not None:
                # What was in force before any worker learned a window: the configured burst
                # (this worker's gate already uses the new one).
                before = BucketLimits(gate.limits.rpm, gate.limits.tpm, self.windows.default(pair))
                tolerance = (TOLERANCE, SHRINK_TOLERANCE)
                self.windows.adopt(pair, await self._limiter.set_window(gate.key, before, window, tolerance))
            if credits:
                held = await self._limiter.slow_start_answered(gate.key, credits)
                if held >= gate.limits.request_capacity and pair not in self._confirmed:
                    log.warning("%s: slow start over without the server announcing limits", pair)
                    self._confirmed.add(pair)
        except LimiterError as exc:  # the next answer tells it again; a lost credit comes back in 10 s
            log.warning("window or slow start of %s not stored: %s", pair, exc)
            return
        if gate.limits != self.limits(pair, spec):
            gate.update_limits(self.limits(pair, spec))

    def check_rule(self, pair: str, spec: ModelSpec, rule: ChargeRule, job: StoredJob, headers: RateLimitHeaders,
                   ticket: Ticket | None) -> None:
        """Account a success, priced under `rule`, in the charge-rule check (worker/rulelearner.py)."""
        self.rules.observe(pair, spec, rule, job, headers, ticket)

    def share_cut_at(self, pair: str) -> float:
        """When this worker last spent less after a cut (monotonic; -inf if never): the answers
        to requests sent before it say nothing about the share now in force."""
        return self._share_cut_at.get(pair, float("-inf"))

    def throttled(self, pair: str) -> bool:
        return pair in self._throttle

    def adjust_throttle(self, pair: str, spec: ModelSpec, gate: BucketGate, refused: bool) -> None:
        """With no headers to learn from, the 429s themselves say the limits are set too high:
        cut the rate by a fifth (at most once a second, since one overrun draws many refusals at
        once), and give back 0.5% per success until the configured limits are reached again."""
        share, cut_at = self._throttle.get(pair, (1.0, 0.0))
        now = time.monotonic()
        if refused:
            if now - cut_at < 1.0:
                return
            share, cut_at = max(0.05, share * 0.8), now
            log.warning("%s: 429 without rate-limit headers: slowing to %.0f%% of the limits", pair, share * 100)
        else:
            share = min(1.0, share + 0.005)
        if share >= 1.0:
            self._throttle.pop(pair, None)
        else:
            self._throttle[pair] = (share, cut_at)
        gate.update_limits(self.limits(pair, spec))

