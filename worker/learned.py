"""What the server's answers teach one worker process about each (account, model) pair.

- the limits it announces (``x-ratelimit-limit-*``), which override configured ones and are
  shared with other workers through Redis (``rq:learned``);
- the charge rule it applies, read off ``x-ratelimit-remaining-tokens`` (``worker/chargerule.py``)
  and followed when the user allows it;
- a slowdown after 429s that carry no headers to learn from: cut by a fifth, then recover slowly;
- the server's window (``worker/window.py``): our bucket's burst follows it, and stays in Redis;
- slow start: until the server announces a pair's limits, one request, then two per answer
  (``reserve.lua``); the first announcement ends it for every worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import orjson
import redis.asyncio as aioredis

from ratequeue.config.models import ModelSpec
from ratequeue.config.settings import Settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.chargerule import ChargeRuleCheck
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.limiter import BucketLimits, Limiter, LimiterError
from ratequeue.worker.window import WindowLearner

log = logging.getLogger(__name__)
_WINDOWS = f"{keys.PREFIX}:window"  # hash: pair -> JSON {window, at}, the server's window learned
RELOAD_SECONDS = 5.0  # how often the limits other workers learned are read again


class Learned:
    """Per-pair knowledge of one event loop; ``pair`` is ``parking.pair_field(account, model)``."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._limits: dict[str, tuple[int, int]] = {}  # pair -> (rpm, tpm) the server announced
        self._loaded: dict[str, float] = {}  # pair -> monotonic time of the last read from Redis
        self._rules: dict[str, str] = {}  # pair -> charge rule learned from the server
        # pair -> (share of the limits in force, time of the last cut)
        self._throttle: dict[str, tuple[float, float]] = {}
        self._rule_check = ChargeRuleCheck()
        self.windows = WindowLearner(settings.burst_seconds)
        self._confirmed: set[str] = set()  # pairs whose limits the server announced: no slow start
        self._limiter = Limiter(redis)  # slow-start credits live beside the pair's bucket
        self._background: set[asyncio.Future[int]] = set()  # fire-and-forget writes, kept referenced

    async def load(self, pair: str) -> None:
        """Take the limits another worker learned for `pair` (read again every RELOAD_SECONDS:
        a limit learned lower elsewhere must soon fail a request too large for it here too)."""
        now = time.monotonic()
        if not self.settings.learn_limits or now - self._loaded.get(pair, float("-inf")) < RELOAD_SECONDS:
            return
        self._loaded[pair] = now
        raw, window = await self.redis.hget(keys.learned_limits(), pair), await self.redis.hget(_WINDOWS, pair)
        if raw:
            known = orjson.loads(raw)
            self._limits[pair] = (int(known["rpm"]), int(known["tpm"]))
            self._confirmed.add(pair)
        self.windows.adopt(pair, window)

    def tpm(self, pair: str, spec: ModelSpec) -> int:
        """The TPM limit in force, without the throttle: learned from the server, else configured."""
        return self._limits.get(pair, (spec.rpm, spec.tpm))[1]

    def rule(self, pair: str, spec: ModelSpec) -> str:
        """The charge rule in force: learned from the server, else configured."""
        return self._rules.get(pair, spec.charge_rule)

    def limits(self, pair: str, spec: ModelSpec) -> BucketLimits:
        """The limits in force: learned (else configured), times the throttle's share."""
        rpm, tpm = self._limits.get(pair, (spec.rpm, spec.tpm))
        share = self._throttle.get(pair, (1.0, 0.0))[0]
        return BucketLimits(rpm * share, tpm * share, self.windows.window(pair), slow_start=pair not in self._confirmed)

    def learn_limits(
        self, pair: str, spec: ModelSpec, headers: RateLimitHeaders, gate: BucketGate, refused: bool = False
    ) -> None:
        """Take the limits the server announces (x-ratelimit-limit-*) over configured ones, and
        its window; count the answer in slow start. `refused`: the answer was a 429."""
        announced = headers.limit_requests is not None or headers.limit_tokens is not None
        if gate.limits.slow_start:
            self._slow_start_answered(pair, spec, gate, announced, refused)
        if not self.settings.learn_limits:
            return
        if (window := self.windows.observe(pair, headers, refused)) is not None:
            gate.update_limits(self.limits(pair, spec))
            self._write(self.redis.hset(_WINDOWS, pair, self.windows.record(window)))
        if not announced:
            return
        rpm, tpm = self._limits.get(pair, (spec.rpm, spec.tpm))
        new = (headers.limit_requests or rpm, headers.limit_tokens or tpm)
        if new == (rpm, tpm) and pair in self._limits:
            return
        self._limits[pair] = new
        if new != (gate.limits.rpm, gate.limits.tpm):
            log.warning("learned limits of %s from the server: %d RPM, %d TPM", pair, *new)
            gate.update_limits(self.limits(pair, spec))
            record = orjson.dumps({"rpm": new[0], "tpm": new[1], "at": time.time()})
            self._write(self.redis.hset(keys.learned_limits(), pair, record))

    def _write(self, call: Awaitable[Any]) -> None:
        """A fire-and-forget Redis write (a lost one is learned again from the next answers)."""
        self._background.add(asyncio.ensure_future(call))
        for task in [t for t in self._background if t.done()]:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("storing what was learned failed: %s", task.exception())

    def _slow_start_answered(
        self, pair: str, spec: ModelSpec, gate: BucketGate, announced: bool, refused: bool
    ) -> None:
        """An answer in slow start: the server's limits end it (here at once, elsewhere through
        Redis); otherwise two more requests may go (one after a 429), until a burst's worth."""
        if announced:
            self._confirmed.add(pair)
            gate.update_limits(self.limits(pair, spec))
            self._write(self._limiter.slow_start_answered(gate.key, None))
            return
        self._write(self._credit(pair, spec, gate, 1 if refused else 2))

    async def _credit(self, pair: str, spec: ModelSpec, gate: BucketGate, credits: int) -> None:
        try:
            held = await self._limiter.slow_start_answered(gate.key, credits)
        except LimiterError as exc:  # a lost credit comes back by itself (reserve.lua, 10 s)
            log.warning("slow-start credit of %s lost: %s", pair, exc)
            return
        if held >= gate.limits.request_capacity and pair not in self._confirmed:
            log.warning("%s: slow start over without the server announcing limits", pair)
            self._confirmed.add(pair)
            gate.update_limits(self.limits(pair, spec))

    def check_rule(self, pair: str, rule: str, job: StoredJob, headers: RateLimitHeaders) -> None:
        """Account a success in the charge-rule check; switch rules when it says so and that is allowed."""
        seen = self._rule_check.observe(
            pair, time.monotonic(), headers.remaining_tokens, headers.limit_tokens,
            job.charge_under("sum"), job.charge_under("max"),
        )
        if seen is None or seen == rule:
            return
        if self.settings.learn_charge_rule:
            log.warning("%s: the server charges by the %r rule, not %r: switching", pair, seen, rule)
            self._rules[pair] = seen
        else:
            log.warning("%s: the server seems to charge by the %r rule, not the configured %r "
                        "(set RATEQUEUE_LEARN_CHARGE_RULE=1 to follow it)", pair, seen, rule)

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
