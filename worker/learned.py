"""What the server's answers teach one worker process about each (account, model) pair.

- the limits it announces (``x-ratelimit-limit-*``), which override configured ones and are
  shared with other workers through Redis (``rq:learned``);
- the charge rule it applies, read off ``x-ratelimit-remaining-tokens`` (``worker/chargerule.py``)
  and followed when the user allows it;
- a slowdown after 429s that carry no headers to learn from: cut by a fifth, then recover slowly;
- the share of the limits other clients of the account leave us, kept in the shared bucket
  (reconcile.lua) and followed here, under the configured ``max_share``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import redis.asyncio as aioredis

from ratequeue.config.models import ModelSpec
from ratequeue.config.settings import Settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.chargerule import ChargeRuleCheck
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.limiter import BucketLimits

log = logging.getLogger(__name__)
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
        self._shares: dict[str, float] = {}  # pair -> share of the limits the shared bucket leaves us
        self._share_cut_at: dict[str, float] = {}  # pair -> monotonic time this worker last took a cut
        self._rule_check = ChargeRuleCheck()
        self._background: set[asyncio.Future[int]] = set()  # fire-and-forget writes, kept referenced

    async def load(self, pair: str) -> None:
        """Take the limits another worker learned for `pair` (read again every RELOAD_SECONDS:
        a limit learned lower elsewhere must soon fail a request too large for it here too)."""
        now = time.monotonic()
        if not self.settings.learn_limits or now - self._loaded.get(pair, float("-inf")) < RELOAD_SECONDS:
            return
        self._loaded[pair] = now
        raw = await self.redis.hget(keys.learned_limits(), pair)
        if raw:
            known = orjson.loads(raw)
            self._limits[pair] = (int(known["rpm"]), int(known["tpm"]))

    def tpm(self, pair: str, spec: ModelSpec) -> int:
        """The TPM limit in force, without the throttle: learned from the server, else configured."""
        return self._limits.get(pair, (spec.rpm, spec.tpm))[1]

    def rule(self, pair: str, spec: ModelSpec) -> str:
        """The charge rule in force: learned from the server, else configured."""
        return self._rules.get(pair, spec.charge_rule)

    def limits(self, pair: str, spec: ModelSpec) -> BucketLimits:
        """The limits in force: learned (else configured), times the throttle's share; spent at
        the share other clients leave us, under the configured ``max_share``."""
        rpm, tpm = self._limits.get(pair, (spec.rpm, spec.tpm))
        throttle = self._throttle.get(pair, (1.0, 0.0))[0]
        share = self.settings.max_share * self._shares.get(pair, 1.0)
        return BucketLimits(rpm * throttle, tpm * throttle, self.settings.burst_seconds, share)

    def follow_share(self, pair: str, spec: ModelSpec, gate: BucketGate, share: float) -> None:
        """Spend at the share of the limits the shared bucket reports (cut by 429s that other
        clients' spending caused, given back when they stop): every worker follows it."""
        old = self._shares.get(pair, 1.0)
        if abs(share - old) < 0.005 and (share < 1.0) == (old < 1.0):
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
            self._background.add(asyncio.ensure_future(self.redis.hset(keys.learned_limits(), pair, record)))
            for task in [t for t in self._background if t.done()]:
                self._background.discard(task)

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
