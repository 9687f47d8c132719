"""The server's allowance per choice of a request without a max output, solved for over a run of
windows (``worker/chargerule.py``), with a margin that keeps it on the safe side: above the
server's figure, so that our bucket never lets through more than the server's does.

One window of ~2 s solves it badly at a high rate (issue 11: 1,912 learned once against the
simulator's 2,000 at 3M TPM; window figures of 1,955-2,055 in one run): what the server charged
is read between two answers, and the ends are blurred. The ledger orders sends by their batch
flush, not by their arrival at the server (another worker's sends may be counted before an end
the server charged them after, a whole request of ~2,000 tokens each), and a send's clock is taken
before its request goes out (a 10 ms lag at 3M TPM is 500 tokens of refill). That error belongs to
the ends, not to the length: windows that follow one another share their ends, so over a run of
them the errors of the inner ends cancel and the two outer ones are spread over every choice of
the run. Each window's misfit against the run's figure shows how blurred an end is; the figure
learned is the run's, plus ``MARGIN`` x that misfit spread over the run's choices; it is followed
only when the run clearly says the allowance in force is wrong (else a loaded machine's blur would
keep raising it).
"""

from __future__ import annotations

import math
from collections import deque

from ratequeue.config.charge import ChargeRule
from ratequeue.worker.ledger import Terms

RUN_WINDOWS = 10  # windows of a run at most (~20 s of 2 s windows): the allowance does not change
MIN_RUN = 3  # windows before a figure (the misfit of fewer says little)
MARGIN = 3.0  # misfits (one standard deviation of the run's error) added: the safe side
# ... for a short run, whose misfits say little of the blur: Student's t (one-sided 99%) by the
# misfits' degrees of freedom (windows - 1), MARGIN beyond
_SHORT_MARGIN = {2: 6.96, 3: 4.54, 4: 3.75, 5: 3.36, 6: 3.14}
MIN_CHOICES = 3  # choices without a max output in the run before its allowance is solved for
AGREES = 0.05  # an allowance this share above the server's is close enough (no switch to save it)


def choices_of(sent: Terms, rule: ChargeRule) -> int:
    """The choices an allowance is charged for: n counted or not."""
    return sent.dchoices if rule.n_multiplies else sent.dprompts


def solve_missing(server: float, sent: Terms, rule: ChargeRule) -> int | None:
    """The allowance per choice without a max output that makes `rule` charge what the server
    did (None when the answer is no allowance at all: the window's other figures are off)."""
    choices = choices_of(sent, rule)
    solved = (server - sent.total(rule, 0)) / choices if choices else 0
    return round(solved) if solved >= 1 else None


class AllowanceRun:
    """The windows of one process on one pair that followed one another (each began at the answer
    that closed the last, and the server's bucket cannot have filled up in any)."""

    def __init__(self) -> None:
        self._windows: deque[tuple[float, Terms]] = deque(maxlen=RUN_WINDOWS)  # (server charge, sent)
        self._settled = False

    def add(self, server: float, sent: Terms) -> None:
        # The first window of a run is left out: it begins as the server's bucket stops filling up,
        # while our sending speeds up, so more of it is on its way than at the run's later ends
        # (an end all the run's windows share: their misfits cannot show it).
        if self._settled:
            self._windows.append((server, sent))
        self._settled = True

    def clear(self) -> None:
        """A window that does not follow (clipped, or the limit changed): a new run begins."""
        self._windows.clear()
        self._settled = False

    def allowance(self, rule: ChargeRule, missing: int) -> int | None:
        """The run's allowance under `rule`'s combine and n, raised by its margin, when the run
        shows `missing` (the allowance in force) wrong: the raised figure clearly below it, or
        even the figure less its margin above it (we under-reserve). None when the run agrees,
        is too short, or has too few choices without a max output."""
        solved, blur = self._solve(rule), self.blur(rule)
        if solved is None or blur is None:
            return None
        margin = _SHORT_MARGIN.get(len(self._windows) - 1, MARGIN) * blur / choices_of(self._sent(), rule)
        if solved + margin < missing * (1 - AGREES) or solved - margin > missing:
            return round(solved + margin)
        return None

    def blur(self, rule: ChargeRule) -> float | None:
        """How far off one window's reading of the server's charge may be, in tokens: the spread of
        each window's misfit against the run's allowance (the error of two ends, as over the whole
        run). None while the run is too short to say."""
        solved = self._solve(rule)
        if solved is None or len(self._windows) < MIN_RUN:
            return None
        misfits = [charge - terms.total(rule, 0) - solved * choices_of(terms, rule) for charge, terms in self._windows]
        return math.sqrt(sum(m * m for m in misfits) / (len(misfits) - 1))  # one figure fitted

    def _sent(self) -> Terms:
        return sum((terms for _, terms in self._windows), Terms())

    def _solve(self, rule: ChargeRule) -> float | None:
        sent = self._sent()
        choices = choices_of(sent, rule)
        if choices < MIN_CHOICES:
            return None
        solved = (sum(charge for charge, _ in self._windows) - sent.total(rule, 0)) / choices
        return solved if solved >= 1 else None
