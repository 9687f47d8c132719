"""The charge rule each (account, model) pair is priced by: configured (config/charge.py), and
unless pinned, each of its dimensions followed to what the server's answers show
(``worker/chargerule.py``), shared with the other workers through Redis (``rq:rules``).

A pair is pinned by ``charge_rule_pinned = true`` in its model's table entry, or every pair by
``RATEQUEUE_LEARN_CHARGE_RULE=0``: its configured rule is kept, and a server that seems to charge
otherwise is said once per dimension and value (the allowance: once above, once below ours).

``rq:rules`` holds one field per dimension, written only when it changes (``set_rule.lua``), so
two workers learning different dimensions at once never undo each other's:
``<pair>`` -> "sum" | "max", ``<pair>|n`` -> "1" | "0", ``<pair>|missing`` -> tokens per choice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from ratequeue.config.charge import ChargeRule
from ratequeue.config.models import ModelSpec
from ratequeue.config.settings import Settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.scripts import lua_source
from ratequeue.worker.allowance import AGREES
from ratequeue.worker.chargerule import ChargeRuleCheck, Observation
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.ledger import Terms, Ticket

log = logging.getLogger(__name__)
CONFIRMATIONS = 2  # verdicts in a row (of one process) before a dimension is switched
DIMENSIONS = ("combine", "n_multiplies", "missing_max_tokens")
_SUFFIX = {"combine": "", "n_multiplies": "|n", "missing_max_tokens": "|missing"}


def rule_fields(pair: str) -> list[str]:
    """The ``rq:rules`` fields of `pair`, in DIMENSIONS order."""
    return [pair + _SUFFIX[dimension] for dimension in DIMENSIONS]


def _encode(value: Any) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def _decode(dimension: str, raw: bytes | str) -> Any:
    text = raw.decode() if isinstance(raw, bytes) else raw
    if dimension == "n_multiplies":
        return text == "1"
    return int(text) if dimension == "missing_max_tokens" else text


def _say(dimension: str, value: Any) -> str:
    """A dimension's value, for logs."""
    if dimension == "combine":
        return f"by the {value!r} rule"
    if dimension == "n_multiplies":
        return "n x the output allowance" if value else "one output allowance whatever n"
    return f"{value} tokens per choice without max_tokens"


class RuleLearner:
    """Per-pair charge rules of one event loop; ``pair`` is ``parking.pair_field(account, model)``."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, write: Callable[[Awaitable[Any]], None]) -> None:
        self.settings = settings
        self._write = write  # fire-and-forget Redis writes (Learned keeps them referenced)
        self._learned: dict[str, dict[str, Any]] = {}  # pair -> dimension -> value (by any worker)
        # (pair, dimension) -> (last side, in a row, the value in force they were judged against,
        # the value to take)
        self._verdicts: dict[tuple[str, str], tuple[Any, int, Any, Any]] = {}
        self._warned: set[tuple[str, str, Any]] = set()  # (pair, dimension, side) a pinned pair was told
        self.check = ChargeRuleCheck()
        self.confirmations = CONFIRMATIONS
        self._set_rule = redis.register_script(lua_source("set_rule", "ratequeue.worker"))

    def pinned(self, spec: ModelSpec) -> bool:
        return not self.settings.learn_charge_rule or spec.charge_rule_pinned

    def rule(self, pair: str, spec: ModelSpec) -> ChargeRule:
        """The rule in force: each dimension learned from the server (unless pinned), else configured."""
        learned = self._learned.get(pair)
        return spec.rule if learned is None or self.pinned(spec) else replace(spec.rule, **learned)

    def take(self, pair: str, raw: list[bytes | str | None]) -> None:
        """Take what the workers published for `pair` (the values of ``rule_fields(pair)``)."""
        if not self.settings.learn_charge_rule:
            return
        for dimension, value in zip(DIMENSIONS, raw, strict=True):
            if value is None:
                continue
            decoded = _decode(dimension, value)
            learned = self._learned.setdefault(pair, {})
            if learned.get(dimension) != decoded:
                log.info("%s: charging %s, as another worker learned", pair, _say(dimension, decoded))
            learned[dimension] = decoded

    def observe(self, pair: str, spec: ModelSpec, rule: ChargeRule, job: StoredJob, headers: RateLimitHeaders,
                ticket: Ticket | None) -> None:
        """Account a success priced under `rule`; follow each dimension's verdict once confirmed
        ``confirmations`` times in a row (or, pinned, say once that the server seems to charge otherwise)."""
        if ticket is None or headers.remaining_tokens is None or headers.limit_tokens is None:
            return
        obs = Observation(ticket, Terms.of(job), headers.remaining_tokens, headers.limit_tokens, headers.reset_tokens)
        verdict = self.check.observe(pair, obs, rule, spec.max_output_tokens)
        if verdict:
            for dimension in DIMENSIONS:
                self._confirm(pair, spec, dimension, getattr(verdict, dimension))

    def _confirm(self, pair: str, spec: ModelSpec, dimension: str, seen: Any) -> None:
        if seen is None:
            return
        now = getattr(self.rule(pair, spec), dimension)
        if dimension == "missing_max_tokens" and now is None:
            now = spec.max_output_tokens
        side = _side(dimension, now, seen)
        last, count, against, top = self._verdicts.get((pair, dimension), (None, 0, now, seen))
        # Verdicts against a value no longer in force do not count (a bound of 2,202 that took over
        # from 16,384 is not confirmed by the "lower" said of 16,384).
        count = count + 1 if last == side and against == now else 1
        if dimension == "missing_max_tokens":  # of the figures that agree, the highest: the safe side
            seen = max(seen, top) if count > 1 else seen
        self._verdicts[pair, dimension] = (side, count, now, seen)
        if count < self.confirmations or side == "same":
            return
        if not self.pinned(spec):
            self._learned.setdefault(pair, {})[dimension] = seen
            self._write(self._publish(pair, dimension, seen, now))
        elif (pair, dimension, side) not in self._warned:  # the allowance: once per side, whatever its figure
            self._warned.add((pair, dimension, side))
            said = _say(dimension, now)
            configured = f"the configured {now!r}" if dimension == "combine" else f"{said} as configured"
            log.warning("%s: the server seems to charge %s, not %s (charge_rule_pinned or "
                        "RATEQUEUE_LEARN_CHARGE_RULE=0 pins the configured rule)", pair, _say(dimension, seen),
                        configured)

    async def _publish(self, pair: str, dimension: str, seen: Any, was: Any) -> int:
        """Share a learned dimension; the worker whose write changed it says so (once per change)."""
        field = pair + _SUFFIX[dimension]
        changed = int(await self._set_rule(keys=[keys.learned_rules()], args=[field, _encode(seen)]))
        if changed:
            before = {"combine": repr(was), "missing_max_tokens": str(was)}.get(dimension) or _say(dimension, was)
            log.warning("%s: the server charges %s, not %s: switching", pair, _say(dimension, seen), before)
        return changed


def _side(dimension: str, now: Any, seen: Any) -> Any:
    """What a verdict says against the value in force: "same", or the value itself; for the
    allowance, "lower" (by more than AGREES: a little above the server's is the safe side) or
    "higher" (the check says so only when a run of windows shows it, worker/allowance.py); each
    window's figure differs a little: the highest of those in a row is taken."""
    if dimension != "missing_max_tokens":
        return "same" if seen == now else seen
    if seen > now:
        return "higher"
    return "lower" if seen < now * (1 - AGREES) else "same"
