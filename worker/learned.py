"""What the server's answers teach one worker process about each (account, model) pair.

- the limits it announces (``x-ratelimit-limit-*``), which override configured ones and are
  shared with other workers through Redis (``rq:learned``);
- the charge rule it applies, read off ``x-ratelimit-remaining-tokens`` against the account-wide
  charge ledger (``worker/chargerule.py``, ``worker/ledger.py``), followed by default (the
  configured rule is the starting guess; ``RATEQUEUE_LEARN_CHARGE_RULE=0`` pins it) and shared with
  the other workers through Redis (``rq:rules``);
- a slowdown after 429s that carry no headers to learn from: cut by a fifth, then recover slowly.
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
from ratequeue.jobstore.scripts import lua_source
from ratequeue.worker.chargerule import ChargeRuleCheck, Observation
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.ledger import ChargeLedger, Ticket
from ratequeue.worker.limiter import BucketLimits

log = logging.getLogger(__name__)
RELOAD_SECONDS = 5.0  # how often the limits and rules other workers learned are read again
CONFIRMATIONS = 2  # verdicts in a row (of one process) before a rule is switched


class Learned:
    """Per-pair knowledge of one event loop; ``pair`` is ``parking.pair_field(account, model)``."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._limits: dict[str, tuple[int, int]] = {}  # pair -> (rpm, tpm) the server announced
        self._loaded: dict[str, float] = {}  # pair -> monotonic time of the last read from Redis
        self._rules: dict[str, str] = {}  # pair -> charge rule learned from the server (by any worker)
        self._verdicts: dict[str, tuple[str, int]] = {}  # pair -> (last verdict, how many in a row)
        self._warned: dict[str, str] = {}  # pair -> the rule a pinned pair was last said to differ by
        # pair -> (share of the limits in force, time of the last cut)
        self._throttle: dict[str, tuple[float, float]] = {}
        self._rule_check = ChargeRuleCheck()
        self.confirmations = CONFIRMATIONS
        self.ledger = ChargeLedger(redis)
        self._set_rule = redis.register_script(lua_source("set_rule", "ratequeue.worker"))
        self._background: set[asyncio.Future[Any]] = set()  # fire-and-forget writes, kept referenced

    async def load(self, pair: str) -> None:
        """Take the limits and the charge rule other workers learned for `pair` (read again every
        RELOAD_SECONDS: a limit learned lower elsewhere must soon fail a request too large for it
        here too, and a rule learned elsewhere must soon price the jobs here)."""
        now = time.monotonic()
        learn = self.settings.learn_limits or self.settings.learn_charge_rule
        if not learn or now - self._loaded.get(pair, float("-inf")) < RELOAD_SECONDS:
            return
        self._loaded[pair] = now
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.learned_limits(), pair)
            pipe.hget(keys.learned_rules(), pair)
            raw, rule = await pipe.execute()
        if raw and self.settings.learn_limits:
            known = orjson.loads(raw)
            self._limits[pair] = (int(known["rpm"]), int(known["tpm"]))
        if rule and self.settings.learn_charge_rule:
            rule = rule.decode() if isinstance(rule, bytes) else rule
            if self._rules.get(pair) != rule:
                log.info("%s: charging by the %r rule another worker learned", pair, rule)
            self._rules[pair] = rule

    def tpm(self, pair: str, spec: ModelSpec) -> int:
        """The TPM limit in force, without the throttle: learned from the server, else configured."""
        return self._limits.get(pair, (spec.rpm, spec.tpm))[1]

    def rule(self, pair: str, spec: ModelSpec) -> str:
        """The charge rule in force: learned from the server (unless pinned), else configured."""
        if not self.settings.learn_charge_rule:
            return spec.charge_rule
        return self._rules.get(pair, spec.charge_rule)

    def limits(self, pair: str, spec: ModelSpec) -> BucketLimits:
        """The limits in force: learned (else configured), times the throttle's share."""
        rpm, tpm = self._limits.get(pair, (spec.rpm, spec.tpm))
        share = self._throttle.get(pair, (1.0, 0.0))[0]
        return BucketLimits(rpm * share, tpm * share, self.settings.burst_seconds)

    def learn_limits(self, pair: str, spec: ModelSpec, headers: RateLimitHeaders, gate: BucketGate) -> None:
        """Take the limits the server announces (x-ratelimit-limit-*) over configured ones."""
        if not self.settings.learn_limits or (headers.limit_requests is None and headers.limit_tokens is None):
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
            self._remember(self.redis.hset(keys.learned_limits(), pair, record))

    def check_rule(
        self, pair: str, rule: str, job: StoredJob, headers: RateLimitHeaders, ticket: Ticket | None
    ) -> None:
        """Account a success in the charge-rule check; follow a verdict confirmed CONFIRMATIONS
        times in a row (or, pinned, say once that the server seems to charge otherwise)."""
        if ticket is None or headers.remaining_tokens is None or headers.limit_tokens is None:
            return
        obs = Observation(ticket, job.charge_under("sum"), job.charge_under("max"), headers.remaining_tokens,
                          headers.limit_tokens, headers.reset_tokens, exact=sets_output_budget(job))
        seen = self._rule_check.observe(pair, obs)
        if seen is None:
            return
        last, count = self._verdicts.get(pair, (seen, 0))
        count = count + 1 if last == seen else 1
        self._verdicts[pair] = (seen, count)
        if count < self.confirmations or seen == rule:
            return
        if self.settings.learn_charge_rule:
            self._rules[pair] = seen
            self._remember(self._publish_rule(pair, seen, rule))
        elif self._warned.get(pair) != seen:
            self._warned[pair] = seen
            log.warning("%s: the server seems to charge by the %r rule, not the configured %r "
                        "(RATEQUEUE_LEARN_CHARGE_RULE=0 pins the configured rule)", pair, seen, rule)

    async def _publish_rule(self, pair: str, seen: str, was: str) -> int:
        """Share a learned rule; the worker whose write changed it says so (once per change)."""
        changed = int(await self._set_rule(keys=[keys.learned_rules()], args=[pair, seen]))
        if changed:
            log.warning("%s: the server charges by the %r rule, not %r: switching", pair, seen, was)
        return changed

    def _remember(self, work: Awaitable[Any]) -> None:
        """Run a fire-and-forget Redis write, kept referenced until it is done."""
        self._background.add(asyncio.ensure_future(work))
        for task in [t for t in self._background if t.done()]:
            self._background.discard(task)

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


def sets_output_budget(job: StoredJob) -> bool:
    """Did the request name its output budget? Without one the server charges its own default
    maximum, which our model table may not know (the tail test then proves nothing)."""
    return any(job.body.get(k) is not None for k in ("max_tokens", "max_completion_tokens", "max_output_tokens"))
