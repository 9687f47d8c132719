"""Which charge rule does the server apply? Read it off ``x-ratelimit-remaining-tokens`` and
``x-ratelimit-reset-tokens``, against the account-wide ledger (``worker/ledger.py``).

Public sources disagree: OpenAI's platform docs charge max(prompt, n x max_tokens), its help
centre and Azure prompt + n x max_tokens. The server's token bucket refills at limit/60 per
second. Two tests, each sound whatever other workers of this deployment send (the ledger has
their charges too):

- **window**: between two of this process's requests A and B the server charged

      C_server = R_A - R_B + limit/60 x (t_B - t_A)

  for everything sent in between, which the ledger prices under each rule (D_sum, D_max): the
  nearer one is the server's. Only if the server's bucket cannot have filled up meanwhile
  (refill beyond its capacity is lost and the arithmetic fails): the tokens it was missing at A
  (``reset-tokens`` x limit/60) must exceed what flowed in until B.
- **tail**: the tokens a bucket misses right after a request was charged are at least that
  request's charge. A sum-rule charge larger than what the server misses means the server did
  not charge by sum. This is the test that works when the server's bucket is nearly full, which
  is what happens when ratequeue overcharges (sum configured, a max-rule server) and the window
  test has nothing to say.

Answers arrive out of order; a window only moves forward in ledger order, and a later answer of
an earlier ticket adds nothing but its tail test.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratequeue.worker.ledger import Ticket

_FULL = 0.98  # no reset header: remaining at or above this share of the limit may have been clipped
_CLEAR = 0.5  # the better rule must explain the server's charge this much better than the other
_TAIL_SHARE = 0.1  # share of a window's answers whose tail refutes "sum" before "max" is said
_TAIL_MIN = 3  # ... and at least this many


@dataclass(frozen=True)
class Observation:
    """One answered request: its ticket, its own charge under each rule, the server's headers.
    ``exact`` when the request set its output budget (else the server's default max output,
    unknown to us, was charged: no tail test)."""

    ticket: Ticket
    sum_charge: int
    max_charge: int
    remaining: int
    limit: int
    reset: float | None  # x-ratelimit-reset-tokens, seconds
    exact: bool = True

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
    not_sum: int = 0  # answers whose tail refutes the sum rule


def _tolerance(obs: Observation) -> float:
    """Our prompt count may differ a little from the server's; reset headers are rounded to 1 ms."""
    return 8 + 0.02 * obs.sum_charge + obs.limit / 60.0 * 0.002


class ChargeRuleCheck:
    """Per (account, model) windows of answers; ``observe`` returns a verdict when one closes."""

    def __init__(self, window: float = 2.0, min_requests: int = 10) -> None:
        self._window = window
        self._min_requests = min_requests
        self._open: dict[str, _Window] = {}

    def observe(self, pair: str, obs: Observation) -> str | None:
        """Account one answered request; "sum" or "max" when a window closes with a clear answer."""
        win = self._open.get(pair)
        if win is None or win.last.limit != obs.limit:
            self._open[pair] = _Window(obs, obs, clipped=_may_be_full(obs))
            return None
        if _refutes_sum(obs):
            win.not_sum += 1
        if obs.ticket.n <= win.last.ticket.n:
            return None
        win.clipped = win.clipped or _may_have_filled(win.last, obs)
        win.last = obs
        win.requests += 1
        if obs.ticket.at - win.first.ticket.at < self._window or win.requests < self._min_requests:
            return None
        self._open[pair] = _Window(obs, obs, clipped=_may_be_full(obs))
        if win.not_sum >= max(_TAIL_MIN, _TAIL_SHARE * win.requests):
            return "max"
        first, last = win.first, win.last
        sum_total = last.ticket.sum_total - first.ticket.sum_total
        max_total = last.ticket.max_total - first.ticket.max_total
        if win.clipped or sum_total == max_total:
            return None
        server = first.remaining - last.remaining + last.limit / 60.0 * (last.ticket.at - first.ticket.at)
        return judge(server, sum_total, max_total)


def _refutes_sum(obs: Observation) -> bool:
    """The tail test: the server misses fewer tokens than the sum rule charged this request alone
    (but at least what the max rule charged)."""
    missing = obs.missing
    if not obs.exact or obs.sum_charge <= obs.max_charge or missing is None:
        return False
    return obs.sum_charge > missing + _tolerance(obs) >= obs.max_charge


def _may_be_full(obs: Observation) -> bool:
    """Without a reset header: is the server's bucket near its capacity (a limit's worth at most)?"""
    return obs.reset is None and obs.remaining >= _FULL * obs.limit


def _may_have_filled(before: Observation, after: Observation) -> bool:
    """Could the server's bucket have reached its capacity between two answers (refill lost)?"""
    missing = before.missing
    if missing is None:
        return _may_be_full(before) or _may_be_full(after)
    return missing <= before.limit / 60.0 * (after.ticket.at - before.ticket.at)


def judge(server: float, sum_total: int, max_total: int) -> str | None:
    """The rule whose total is clearly nearer the server's charge, or None when unclear."""
    gap = abs(sum_total - max_total)
    sum_off, max_off = abs(server - sum_total), abs(server - max_total)
    if min(sum_off, max_off) > gap * (1 - _CLEAR) or abs(sum_off - max_off) < gap * _CLEAR:
        return None
    return "sum" if sum_off < max_off else "max"
