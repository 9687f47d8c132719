"""The adaptive concurrency window of a self-hosted server (issue 13, part 2): how many calls of one
(account, model) pair a worker process keeps in flight when the server's limit is how many requests
it serves at once, not a rate.

Which pairs: those whose model has no known limits (``spec.limits_known`` False), and those whose
server sent no ``x-ratelimit-*`` header in its first ``HEADERLESS_ANSWERS`` answers (a vLLM or
Ollama server says nothing about its limits). One answer with such a header ends it for good: the
shared bucket (``worker.limiter``) paces that pair, exactly as before.

How the window moves (TCP's congestion window, with the latency signal of TCP Vegas as Netflix's
concurrency-limits library applies it to request concurrency, ``VegasLimit`` and ``Gradient2Limit``):

- it is judged once per *round*, a window's worth of answers (about one round trip, at least
  ``MIN_ROUND``), on the round's quickest answer against the base, the quickest of the last
  ``BASE_ROUNDS`` rounds (so a base that is no longer true ages out): a standing queue delays every
  request alike, while a round's mean follows its mix of long and short outputs;
- that delay over the round's mean latency (the *rise*) is the share of the calls in flight that
  wait in the server's queue (Little's law: Vegas's ``queue = limit x (1 - base / now)``, over the
  limit). Judged as a ratio, as Gradient2's tolerance is, not as Vegas's count of this process's
  own queued requests: every worker sees the same rise, so several workers stop at the same queue
  at the server, where per-process queue targets add up (measured with Vegas's count: 3.7% of
  requests refused with two workers on a queue of 4); less what the mix of output lengths alone
  puts between a round's quickest and the base (``_mix_gap``; zero when latency is flat);
- growth: while the rise stays under ``GROW_BELOW`` and the round's requests were sent at the full
  window (a window that was not used says nothing: no growth, Gradient2's "app limited" rule): by
  half per measured round until the rise reaches half of that (slow start; every other round, like
  Vegas's slow start, since each step is measured before the next), then by a tenth (at least one)
  per round: one step cannot take the rise from under ``GROW_BELOW`` past ``SHRINK_ABOVE``;
- a rise over ``SHRINK_ABOVE`` cuts it at once to what the server serves without queueing
  (Gradient2's ``limit x gradient``, gradient = 1 - rise), never below half;
- a refusal (429 or 503: the server's queue is full) cuts it by 30% (CUBIC's beta, RFC 9438),
  at most once per round: the refusals of requests sent before a cut are not counted again; and
  it stays under 90% of the calls that drew it, one more allowed per ``BASE_ROUNDS`` calm rounds
  (CUBIC's plateau at its last maximum, made flat), none after ``CLEAR_ROUNDS`` rounds in a row
  without any queue (the other workers that shared the server then have left);
- a queue that stood for nearly ``BASE_ROUNDS`` rounds would become the base as the unqueued rounds
  age out (Vegas's known base inflation): before that, the window drops for a round to what the
  server serves without queueing and the base is measured again (BBR's ProbeRTT).

Each worker process runs its own windows; they converge as TCP flows do (see BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Mapping

from ratequeue.config.models import ModelSpec
from ratequeue.worker import metrics
from ratequeue.worker.inflight import FairInFlight

log = logging.getLogger(__name__)

__all__ = ["HEADERLESS_ANSWERS", "AdaptiveWindow", "ConcurrencyWindows"]

INITIAL = 4  # calls in flight before anything is known
SLOW_START_GROWTH = 1.5  # per measured round before the first signal
REFUSAL_CUT = 0.7  # CUBIC's multiplicative decrease
CEILING = 0.9  # the window stays under this share of the calls in flight that drew a refusal
CLEAR_ROUNDS = 30  # measured rounds in a row without a queue that lift that ceiling
LATENCY_FLOOR = 0.5  # a latency cut keeps at least half of the window (Gradient2's bound)
GROW_BELOW = 0.10  # rise (share of the calls in flight that queue) under which the window grows
SHRINK_ABOVE = 0.25  # rise over which it shrinks
BASE_ROUNDS = 30  # rounds over which the base latency is the minimum (probed again before it ages out)
MIN_ROUND = 8  # answers per round at least: a small window is not judged on a handful of answers
MIX_SPACINGS = 2.0  # a round's quickest less its second quickest, times this: the mix's share of a rise
HEADERLESS_ANSWERS = 3  # answers without x-ratelimit-* before a pair counts as concurrency-bound


class AdaptiveWindow:
    """One pair's window in one process. Feed it every answer; ``size`` is the calls it allows."""

    def __init__(self, maximum: int, initial: int = INITIAL) -> None:
        if maximum < 1:
            raise ValueError(f"maximum must be >= 1, got {maximum}")
        self.maximum = maximum
        self.limit = float(min(initial, maximum))
        self.slow_start = True
        self._bases: deque[float] = deque(maxlen=BASE_ROUNDS)
        self._spacings: deque[float] = deque(maxlen=BASE_ROUNDS)  # each round's second quickest less its quickest
        self._latencies: list[float] = []
        self._sent_at: list[int] = []
        self._answers = 0
        self._cut_this_round = False
        self._queued_rounds = 0  # rounds in a row whose latency stood over the base
        # What a refusal taught: the window stays under 90% of the calls in flight that drew it (a
        # queue of one or two hides from the quickest answer now and then: without this, the window
        # crept back to the refusals every few seconds, 3.7% of requests refused); one more is
        # allowed every BASE_ROUNDS rounds without a refusal, in case the server grew; and none is
        # left after CLEAR_ROUNDS measured rounds in a row without any queue (another worker that
        # shared the server when the refusal came has stopped: its calls' room is free).
        self._ceiling = float(maximum)
        self._calm_rounds = 0
        self._clear_rounds = 0

    @property
    def size(self) -> int:
        return max(1, int(self.limit + 1e-9))  # 6 / 1.5 is 3.9999999999999996

    def answered(self, latency: float, in_flight: int) -> bool:
        """A success that took ``latency`` seconds, sent with ``in_flight`` calls of its pair out
        (itself included). True when the window changed."""
        self._latencies.append(latency)
        self._sent_at.append(in_flight)
        return self._count()

    def other(self) -> bool:
        """An answer that says nothing about load (a 400, a 404...): it only counts in the round."""
        return self._count()

    def refused(self, in_flight: int) -> bool:
        """A 429 or 503 of a request sent with ``in_flight`` calls of its pair out: the server's
        queue is full. True when the window changed."""
        self._ceiling = min(self._ceiling, max(1.0, CEILING * (in_flight - 1)))
        self._calm_rounds = self._clear_rounds = 0
        if self._cut_this_round:
            return self._count()
        before = self.size
        self.limit = max(1.0, self.limit * REFUSAL_CUT)
        self.slow_start = False
        self._new_round()
        self._cut_this_round = True  # until a whole round of answers came after the cut
        return self.size != before

    def _count(self) -> bool:
        self._answers += 1
        if self._answers < max(self.size, MIN_ROUND):
            return False
        before = self.size
        self._judge()
        self._new_round()
        return self.size != before

    def _new_round(self) -> None:
        self._latencies.clear()
        self._sent_at.clear()
        self._answers = 0
        self._cut_this_round = False

    def _judge(self) -> None:
        self._calm_rounds += 1
        if self._calm_rounds >= BASE_ROUNDS:
            self._ceiling, self._calm_rounds = min(float(self.maximum), self._ceiling + 1), 0
        if not self._latencies:
            return
        sent_at = sum(self._sent_at) / len(self._sent_at)
        # The round's quickest answer against the quickest of recent rounds: a standing queue delays
        # every request by the same wait, whatever its size, while the mean follows the round's mix
        # of long and short answers (output lengths vary 10-fold).
        self._bases.append(min(self._latencies))
        if len(self._latencies) > 1:
            quickest, second = sorted(self._latencies)[:2]
            self._spacings.append(second - quickest)
        rise = self._rise(self._latencies)
        self._queued_rounds = self._queued_rounds + 1 if rise >= GROW_BELOW / 2 else 0
        if self._queued_rounds >= BASE_ROUNDS - 2:
            # The unqueued rounds are about to age out of the base, and a queued latency would become
            # the base: the window would creep up one queue at a time. Drop to what the server serves
            # without queueing for a round, so that the base is measured again (BBR's ProbeRTT).
            self.limit = min(self.limit, max(1.0, sent_at * (1 - rise)))
            self._queued_rounds = 0
            return
        if rise > SHRINK_ABOVE:
            self.limit = min(self.limit, max(self.limit * LATENCY_FLOOR, sent_at * (1 - rise), 1.0))
            self.slow_start = False
            return
        # Growth is judged on the answers sent at this window only: one quick answer sent before the
        # last step would hide the queue the step built. Too few: not measured yet (or not used).
        measured = [lat for lat, n in zip(self._latencies, self._sent_at, strict=True) if n >= self.size]
        if len(measured) < len(self._latencies) / 2:
            return
        rise = self._rise(measured)
        self._clear_rounds = self._clear_rounds + 1 if rise < GROW_BELOW / 2 else 0
        if self._clear_rounds >= CLEAR_ROUNDS:
            self._ceiling = float(self.maximum)
        if self.slow_start and rise >= GROW_BELOW / 2:  # a queue begins (Vegas's gamma)
            self.slow_start = False
        if rise < GROW_BELOW:
            grown = self.limit * SLOW_START_GROWTH if self.slow_start else self.limit + max(1.0, self.limit / 10)
            self.limit = max(self.limit, min(float(self.maximum), self._ceiling, grown))

    def _rise(self, latencies: list[float]) -> float:
        """The wait of the quickest of ``latencies`` over the base, per unit of their mean: the share
        of the calls in flight that wait in the server's queue."""
        mean = sum(latencies) / len(latencies)
        wait = min(latencies) - min(self._bases) - self._mix_gap()
        return max(0.0, wait) / mean if mean > 0 else 0.0

    def _mix_gap(self) -> float:
        """How far above the base a round's quickest answer may fall with no queue at all, from the
        mix of output lengths alone. The base is the quickest of some 30 rounds' answers, so a
        round's quickest lies above it whenever lengths vary: by about the gap between a round's
        quickest and its second quickest, and it strays from round to round by about as much
        again (``MIX_SPACINGS`` of them). A queue delays both of a round's quickest alike, and a
        queue that forms during a round delays neither: the gap says nothing of a queue. Zero when
        latency is flat. Without it, with outputs of 20-100% of max_tokens, slow start ended on the
        mix and the window took a median 23 round trips to open, not 6 (tests/test_concurrency_mix.py)."""
        return MIX_SPACINGS * statistics.median(self._spacings) if self._spacings else 0.0


def announces_limits(headers: Mapping[str, str]) -> bool:
    """Does an answer carry any ``x-ratelimit-*`` header (even Azure's -1 sentinels)?"""
    return any(name.lower().startswith("x-ratelimit-") for name in headers)


class ConcurrencyWindows:
    """The windows of one worker process, kept as caps of its ``FairInFlight``."""

    def __init__(self, maximum: int, in_flight: FairInFlight) -> None:
        self.maximum = max(1, min(maximum, in_flight.limit))
        self._in_flight = in_flight
        self._windows: dict[str, AdaptiveWindow] = {}
        self._headerless: dict[str, int] = {}  # pair -> answers without x-ratelimit-* (while none had any)
        self._announced: set[str] = set()  # pairs whose server sent x-ratelimit-*: never bound
        self._ceilings: dict[str, int] = {}  # pair -> its account's max_concurrency (models file)

    def bound(self, pair: str, spec: ModelSpec) -> bool:
        """Is ``pair`` bound by the server's concurrency (its window in force)?"""
        return pair in self._windows or (pair not in self._announced and not spec.limits_known)

    def size(self, pair: str) -> int | None:
        window = self._windows.get(pair)
        return None if window is None else window.size

    def before_send(self, pair: str, spec: ModelSpec, account: str, ceiling: int | None = None) -> None:
        """A model with no known limits is windowed from its first call. ``ceiling``: the route's
        own maximum (an openai-compatible account's ``max_concurrency``), under the worker's."""
        if ceiling is not None:
            self._ceilings[pair] = max(1, ceiling)
        if pair not in self._windows and pair not in self._announced and not spec.limits_known:
            self._start(pair, spec.name, account)

    def answered(self, pair: str, spec: ModelSpec, account: str, status: int, headers: Mapping[str, str],
                 latency: float, in_flight: int) -> bool:
        """Account one answer (``status`` 0: a transport failure, which says nothing); True when
        ``pair`` is concurrency-bound, this answer included."""
        if status == 0:
            return self.bound(pair, spec)
        if announces_limits(headers):
            if pair not in self._announced:
                self._announced.add(pair)
                self._headerless.pop(pair, None)
                if self._windows.pop(pair, None) is not None:
                    self._in_flight.set_cap(pair, None)
                    metrics.set_concurrency_window(spec.name, account, 0)
            return False
        if pair in self._announced:
            return False
        window = self._windows.get(pair)
        if window is None:
            seen = self._headerless[pair] = self._headerless.get(pair, 0) + 1
            if spec.limits_known and seen < HEADERLESS_ANSWERS:
                return False
            window = self._start(pair, spec.name, account)
        if status in (429, 503):
            changed = window.refused(in_flight)
        elif 200 <= status < 300:
            changed = window.answered(latency, in_flight)
        else:
            changed = window.other()
        if changed:
            self._in_flight.set_cap(pair, window.size)
            metrics.set_concurrency_window(spec.name, account, window.size)
            log.debug("%s: concurrency window %d (status %d)", pair, window.size, status)
        return True

    def _start(self, pair: str, model: str, account: str) -> AdaptiveWindow:
        maximum = min(self.maximum, self._ceilings.get(pair, self.maximum))
        window = self._windows[pair] = AdaptiveWindow(maximum)
        log.warning("%s: no rate-limit headers from its server: calls in flight follow an adaptive window "
                    "(from %d, at most %d)", pair, window.size, maximum)
        self._in_flight.set_cap(pair, window.size)
        metrics.set_concurrency_window(model, account, window.size)
        return window
