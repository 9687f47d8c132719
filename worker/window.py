"""The server's enforcement window, learned per (account, model) pair, both ways.

Our bucket holds ``burst_seconds`` of refill (RATEQUEUE_BURST_SECONDS, 5 s by default). Servers
publish neither their window nor whether they forgive a burst; their answers show it:

- ``x-ratelimit-remaining-*`` plus ``x-ratelimit-reset-*`` (time until the server's bucket is full
  again) give the server's capacity at the instant it answered: ``remaining + rate x reset``,
  i.e. a window of ``remaining x 60 / limit + reset`` seconds. Other clients of the account do
  not disturb it (they lower remaining and lengthen reset alike), so this one reading is used both
  ways, as soon as it differs from ours by more than a tenth.
- Without a reset header, ``remaining`` alone is a lower bound of the server's capacity: when it
  stays above ours while we spend, the server allows more, and the burst widens to it.
- A 429 with no reading at all, while our bucket granted the request, means the server's window
  is shorter than ours: the burst is halved (at most once per ``SHRINK_EVERY`` seconds).

The server's window is taken between 1 s (``MIN_WINDOW``) and 60 s (a per-minute limit never
forgives more), and our bucket holds ``HEADROOM`` (3%) less than what was read. It is stored in
Redis beside the bucket (``set_window.lua``), where every bucket script reads it: all workers, and
the next run, size the bucket by it at once.
"""

from __future__ import annotations

import logging
import math
import time

from ratequeue.worker.feedback import RateLimitHeaders

log = logging.getLogger(__name__)

MIN_WINDOW = 1.0  # seconds of limit: the shortest burst we ever keep
MAX_WINDOW = 60.0  # a per-minute limit: the longest a server can forgive
SHRINK_EVERY = 2.0  # seconds between two blind halvings (one overrun draws many 429s at once)
# Our bucket holds a little less than the server's: its counts are made on arrival and from its
# own token count, a few tokens a request away from our estimate; an exact-size opening burst drew a 429.
HEADROOM = 0.03
# A reading must be this much above ours to widen (headers are rounded), and this much below to
# shrink: shrinking by a little is cheap, an opening burst of exactly the server's size is not.
TOLERANCE = 0.1
SHRINK_TOLERANCE = 0.01


def server_window(headers: RateLimitHeaders) -> tuple[float | None, float | None]:
    """(the server's window read exactly, a lower bound of it), in seconds; None where the
    headers do not tell. Of the request and token buckets, the shorter one counts."""
    exact: list[float] = []
    lower: list[float] = []
    for limit, remaining, reset in (
        (headers.limit_requests, headers.remaining_requests, headers.reset_requests),
        (headers.limit_tokens, headers.remaining_tokens, headers.reset_tokens),
    ):
        if not limit or remaining is None:
            continue
        held = remaining * 60.0 / limit
        lower.append(held)
        if reset is not None and math.isfinite(reset):
            exact.append(held + reset)
    return (min(exact) if exact else None), (min(lower) if lower else None)


def _clamp(window: float) -> float:
    return min(MAX_WINDOW, max(MIN_WINDOW, window))


class WindowLearner:
    """The learned window of each pair in one process; ``pair`` is ``parking.pair_field``."""

    def __init__(self, default_window: float) -> None:
        self.default_window = default_window
        self._windows: dict[str, float] = {}
        self._blind_cut_at: dict[str, float] = {}
        self._ceilings: dict[str, float] = {}  # pair -> the most our bucket may hold (an Azure deployment's window)

    def window(self, pair: str) -> float:
        """The burst, in seconds of limit, our bucket holds for `pair`."""
        return self._windows.get(pair, self.default(pair))

    def default(self, pair: str) -> float:
        """The burst before anything was learned: the server's known window (its ceiling), else the
        configured burst."""
        return self._ceilings.get(pair, self.default_window)

    def bound(self, pair: str, seconds: float | None) -> None:
        """The server is known to enforce over `seconds` (an Azure deployment's window_seconds): our
        bucket holds that, less the headroom, and never more (None: no bound)."""
        if seconds is not None and seconds > 0 and pair not in self._ceilings:
            self._ceilings[pair] = seconds * (1 - HEADROOM)
            if pair in self._windows:
                self._windows[pair] = min(self._windows[pair], self._ceilings[pair])

    def adopt(self, pair: str, window: float) -> None:
        """Take the window in force in Redis (learned by any worker) for `pair`."""
        if math.isfinite(window) and window > 0:
            self._windows[pair] = min(window, self._ceilings.get(pair, window))

    def observe(self, pair: str, headers: RateLimitHeaders, refused: bool) -> float | None:
        """Learn from one answer; returns the new window when it changed, else None."""
        current = self.window(pair)
        exact, lower = server_window(headers)
        if exact is not None:
            new = _clamp(exact) * (1 - HEADROOM)
            if current * (1 - SHRINK_TOLERANCE) <= new <= current * (1 + TOLERANCE):
                return None
        elif lower is not None and lower > current * (1 + TOLERANCE):
            new = _clamp(lower) * (1 - HEADROOM)  # the server holds more than our whole bucket
        elif refused:
            now = time.monotonic()
            if now - self._blind_cut_at.get(pair, float("-inf")) < SHRINK_EVERY or current <= MIN_WINDOW:
                return None
            self._blind_cut_at[pair] = now
            new = _clamp(current / 2)
        else:
            return None
        new = min(new, self._ceilings.get(pair, new))
        if new == current:
            return None
        self._windows[pair] = new
        log.warning("%s: the server's window is about %.1f s of limit; bucket burst %.1f s -> %.1f s",
                    pair, exact if exact is not None else new, current, new)
        return new
