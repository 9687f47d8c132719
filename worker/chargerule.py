"""Which charge rule does the server apply (config/charge.py: sum or max; n counted or not; the
allowance of a request without a max output)? Read it off ``x-ratelimit-remaining-tokens`` and
``x-ratelimit-reset-tokens``, against the account-wide ledger (``worker/ledger.py``).

Public sources disagree: OpenAI's platform docs charge max(prompt, n x max_tokens), its help
centre and Azure prompt + n x max_tokens. The server's token bucket refills at limit/60 per
second. Two tests, each sound whatever other workers of this deployment send (the ledger has
their charges too):

- **window**: between two of this process's requests A and B the server charged

      C_server = R_A - R_B + limit/60 x (t_B - t_A)

  for everything sent in between, which the ledger prices under each (combine, n counted) pair;
  each dimension is judged on its own: the best candidate against the best one that differs in
  that dimension (a dimension the window's requests cannot tell apart, say n with every n = 1,
  gets no verdict). Requests without a max output are charged the server's own allowance per
  choice, unknown: in a window that has some, each candidate's allowance is solved for from the
  whole window, and the candidates are judged by how well that predicts the window's first half
  (only a wrong candidate's allowance depends on the mix of requests), once they part by more than
  a window's ends can be off. The allowance itself is read over the run of windows that followed
  one another, with a margin for those ends (``worker/allowance.py``). Only if the server's
  bucket cannot have filled up meanwhile (refill beyond its capacity is lost and the arithmetic
  fails): the tokens it was missing at A (``reset-tokens`` x limit/60) must exceed what flowed in
  until B.
- **tail**: the tokens a bucket misses right after a request was charged are at least that
  request's charge. A sum-rule charge larger than what the server misses means the server did
  not charge by sum; an allowance per choice larger than what it misses after a request without
  a max output is not the server's. This is the test that works when the server's bucket is
  nearly full, which is what happens when ratequeue overcharges (sum configured, a max-rule
  server; or the model's whole max output reserved, the server charging less) and the window
  test has nothing to say.

Answers arrive out of order; a window only moves forward in ledger order, and a later answer of
an earlier ticket adds nothing but its tail test.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from ratequeue.config.charge import COMBINES, ChargeRule
from ratequeue.worker.allowance import AGREES, MARGIN, AllowanceRun, choices_of, solve_missing
from ratequeue.worker.ledger import Terms, Ticket

_FULL = 0.98  # no reset header: remaining at or above this share of the limit may have been clipped
_CLEAR = 0.5  # the better rule must explain the server's charge this much better than the other
_TAIL_SHARE = 0.1  # share of a window's answers whose tail refutes "sum" before "max" is said
_TAIL_MIN = 3  # ... and at least this many
_MIN_DEFAULTED = 3  # choices without a max output in a window before their allowance is solved for
_CEILING_ANSWERS = 30  # answers without a max output whose least tail bounds the allowance
_SHAPES = tuple(ChargeRule(c, m) for c in COMBINES for m in (True, False))


@dataclass(frozen=True)
class Verdict:
    """What one window says of each dimension of the rule (None: nothing)."""

    combine: str | None = None
    n_multiplies: bool | None = None
    missing_max_tokens: int | None = None

    def __bool__(self) -> bool:
        return self != Verdict()


@dataclass(frozen=True)
class Observation:
    """One answered request: its ticket, its own ledger terms, the server's headers."""

    ticket: Ticket
    terms: Terms
    remaining: int
    limit: int
    reset: float | None  # x-ratelimit-reset-tokens, seconds

    @property
    def missing(self) -> float | None:
        """Tokens the server's bucket lacked after this request (None without a reset header)."""
        return None if self.reset is None else self.reset * self.limit / 60.0


@dataclass
class _Window:
    first: Observation
    last: Observation
    clipped: bool = False
    requests: int = 0  # of this process (answers in ledger order)
    refuted: dict[ChargeRule, int] = field(default_factory=dict)  # shape -> answers whose tail refutes it
    middle: list[Observation] = field(default_factory=list)  # the answers in between, in ledger order

    def server_charge(self, until: Observation) -> float:
        """What the server charged from the window's first answer to `until` (see the module doc)."""
        first = self.first
        return first.remaining - until.remaining + until.limit / 60.0 * (until.ticket.at - first.ticket.at)


def _tolerance(obs: Observation) -> float:
    """Our prompt count may differ a little from the server's; reset headers are rounded to 1 ms."""
    return 8 + 0.02 * obs.terms.sum + obs.limit / 60.0 * 0.002


class ChargeRuleCheck:
    """Per (account, model) windows of answers; ``observe`` returns a verdict when one closes."""

    def __init__(self, window: float = 2.0, min_requests: int = 10) -> None:
        self._window = window
        self._min_requests = min_requests
        self._open: dict[str, _Window] = {}
        self._ceilings: dict[str, deque[float]] = {}  # pair -> allowance ceilings of its last answers
        self._since_cap: dict[str, int] = {}  # pair -> answers with a ceiling since the last look
        self._runs: dict[str, AllowanceRun] = {}  # pair -> its windows that followed one another

    def observe(self, pair: str, obs: Observation, rule: ChargeRule, default_missing: int) -> Verdict:
        """Account one answered request, priced by `rule` in force (`default_missing` per choice
        without a max output when the rule does not say); a verdict when a window closes, or when
        the tails of requests without a max output show our allowance too high."""
        missing = rule.missing_max_tokens or default_missing
        verdict = self._window_verdict(pair, obs, rule, missing)
        if verdict.missing_max_tokens is None and (capped := self._cap(pair, obs, rule, missing)) is not None:
            verdict = replace(verdict, missing_max_tokens=capped)
        return verdict

    def _cap(self, pair: str, obs: Observation, rule: ChargeRule, missing: int) -> int | None:
        """Every _MIN_DEFAULTED answers without a max output: the least ceiling of the recent ones
        when it is clearly below our allowance. Answer by answer, not per window: such answers
        are few while our allowance is far too high (it paces them), and the window test is mute
        then (our over-reserving keeps the server's bucket full)."""
        ceiling = allowance_ceiling(obs, rule)
        if ceiling is None:
            return None
        recent = self._ceilings.setdefault(pair, deque(maxlen=_CEILING_ANSWERS))
        recent.append(ceiling)
        self._since_cap[pair] = since = self._since_cap.get(pair, 0) + 1
        if since < _MIN_DEFAULTED:
            return None
        self._since_cap[pair] = 0
        capped = math.ceil(min(recent))
        return capped if capped < missing * (1 - AGREES) else None

    def _window_verdict(self, pair: str, obs: Observation, rule: ChargeRule, missing: int) -> Verdict:
        win = self._open.get(pair)
        if win is None or win.last.limit != obs.limit:
            self._open[pair] = _Window(obs, obs, clipped=_may_be_full(obs))
            self._runs.pop(pair, None)  # the next window does not follow the last one
            return Verdict()
        for shape in refuted_shapes(obs):
            win.refuted[shape] = win.refuted.get(shape, 0) + 1
        if obs.ticket.n <= win.last.ticket.n:
            return Verdict()
        win.clipped = win.clipped or _may_have_filled(win.last, obs)
        if win.last is not win.first:
            win.middle.append(win.last)
        win.last = obs
        win.requests += 1
        if obs.ticket.at - win.first.ticket.at < self._window or win.requests < self._min_requests:
            return Verdict()
        self._open[pair] = _Window(obs, obs, clipped=_may_be_full(obs))
        return self._judge(pair, win, rule, missing)

    def _judge(self, pair: str, win: _Window, rule: ChargeRule, missing: int) -> Verdict:
        run = self._runs.setdefault(pair, AllowanceRun())
        if win.clipped:
            run.clear()
        else:
            run.add(win.server_charge(win.last), win.last.ticket.totals - win.first.ticket.totals)
        refuted = {s for s, count in win.refuted.items() if count >= max(_TAIL_MIN, _TAIL_SHARE * win.requests)}
        if found := judge_tails(refuted):
            return Verdict(**found)
        if win.clipped:
            return Verdict()
        sent = win.last.ticket.totals - win.first.ticket.totals
        server = win.server_charge(win.last)
        if sent.dchoices < _MIN_DEFAULTED or not win.middle:
            found = judge_shape(server, {s: sent.total(s, missing) for s in _SHAPES})
        else:
            half = win.middle[len(win.middle) // 2]
            # Candidates must part by more than a window's ends can be off, as the run shows under
            # the shape that fits it best (a steady mix hardly parts them: every candidate's
            # allowance absorbs the difference); no verdict before the run shows it.
            floor = MARGIN * min((b for b in map(run.blur, _SHAPES) if b is not None), default=math.inf)
            found = judge_mixed(server, sent, win.server_charge(half), half.ticket.totals - win.first.ticket.totals,
                                floor)
        # The allowance of the rule then in force, over the run of windows (worker/allowance.py).
        allowance = run.allowance(replace(ChargeRule(rule.combine, rule.n_multiplies), **found), missing)
        if allowance is not None:
            found["missing_max_tokens"] = allowance
        return Verdict(**found)


def allowance_ceiling(obs: Observation, rule: ChargeRule) -> float | None:
    """The most the server can have allowed each choice of a request without a max output: the
    tokens its bucket misses right after charging it include that charge (whatever the combine
    rule, the allowance alone is at most that; no prompt count of ours enters it, so the only
    slack is the reset header's rounding to 1 ms)."""
    choices = choices_of(obs.terms, rule)
    if not choices or obs.missing is None:
        return None
    return (obs.missing + 1 + obs.limit / 60.0 * 0.001) / choices


def judge_mixed(server: float, sent: Terms, server_half: float, sent_half: Terms, floor: float) -> dict[str, Any]:
    """A window with requests that named no max output: each candidate's allowance solved for
    from the whole window predicts its first half; the candidates are judged on that (only a
    wrong candidate's allowance depends on the mix of requests)."""
    solved = {shape: solve_missing(server, sent, shape) for shape in _SHAPES}
    return judge_shape(server_half, {s: sent_half.total(s, x) for s, x in solved.items() if x is not None}, floor)


def judge_shape(server: float, totals: dict[ChargeRule, int], floor: float = 0.0) -> dict[str, Any]:
    """Each of combine and n counted, where the candidates' totals tell them apart (by more than
    `floor` tokens)."""
    if not totals:
        return {}
    best = min(totals, key=lambda shape: abs(server - totals[shape]))
    found: dict[str, Any] = {}
    for dimension in ("combine", "n_multiplies"):
        rivals = [s for s in totals if getattr(s, dimension) != getattr(best, dimension)]
        if not rivals:
            continue
        rival = min(rivals, key=lambda shape: abs(server - totals[shape]))
        if abs(totals[rival] - totals[best]) > floor and nearer(server, totals[best], totals[rival]) == 0:
            found[dimension] = getattr(best, dimension)
    return found


def refuted_shapes(obs: Observation) -> list[ChargeRule]:
    """The tail test: the shapes that charged this request alone more than the server's bucket
    misses after it (when one at least did not). Only for a request that named its max output
    (else the server's allowance, unknown to us, was charged)."""
    missing, terms = obs.missing, obs.terms
    if terms.dchoices or missing is None:
        return []
    bound = missing + _tolerance(obs)
    refuted = [shape for shape in _SHAPES if terms.total(shape, 0) > bound]
    return refuted if len(refuted) < len(_SHAPES) else []


def judge_tails(refuted: set[ChargeRule]) -> dict[str, Any]:
    """A dimension whose every candidate of one value the tails refuted takes the other value."""
    found: dict[str, Any] = {}
    for dimension, values in (("combine", COMBINES), ("n_multiplies", (True, False))):
        left = {getattr(s, dimension) for s in _SHAPES if s not in refuted}
        if len(left) == 1 and len(values) == 2:
            found[dimension] = left.pop()
    return found


def _may_be_full(obs: Observation) -> bool:
    """Without a reset header: is the server's bucket near its capacity (a limit's worth at most)?"""
    return obs.reset is None and obs.remaining >= _FULL * obs.limit


def _may_have_filled(before: Observation, after: Observation) -> bool:
    """Could the server's bucket have reached its capacity between two answers (refill lost)?"""
    missing = before.missing
    if missing is None:
        return _may_be_full(before) or _may_be_full(after)
    return missing <= before.limit / 60.0 * (after.ticket.at - before.ticket.at)


def nearer(server: float, first: float, second: float) -> int | None:
    """0 or 1: which of two totals clearly explains the server's charge better; None when unclear."""
    gap = abs(first - second)
    first_off, second_off = abs(server - first), abs(server - second)
    if min(first_off, second_off) > gap * (1 - _CLEAR) or abs(first_off - second_off) < gap * _CLEAR:
        return None
    return 0 if first_off < second_off else 1


def judge(server: float, sum_total: int, max_total: int) -> str | None:
    """The combine rule whose total is clearly nearer the server's charge, or None when unclear."""
    which = nearer(server, sum_total, max_total)
    return None if which is None else COMBINES[which]
