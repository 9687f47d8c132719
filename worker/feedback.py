"""What the server says about its limits: Retry-After in its three forms, and x-ratelimit-*.

    retry-after-ms: 1500                 wins over retry-after (Azure, sometimes OpenAI)
    retry-after: 2 | Wed, 21 Oct 2026 07:28:00 GMT
    "... Please try again in 1.2s ..."   in a 429 body, when no header says it
    x-ratelimit-limit-requests / -tokens           integers; -1 or 0 mean "unknown" (Azure)
    x-ratelimit-remaining-requests / -tokens       trusted only beside a positive limit; a negative one
                                                   (Azure's -1) makes both unknown
    x-ratelimit-reset-requests / -tokens           Go durations: "1s", "20ms", "6m0s", "1h2m3.5s"

Everything here is read defensively (issue 8): a server-given wait that is not finite, zero,
negative or garbage is ignored (the caller falls back to its own backoff), a positive one is raised
to ``MIN_SERVER_WAIT`` (``retry-after: 0`` made 6 attempts in 20 ms) and capped at
``MAX_SERVER_WAIT`` (``1e308`` must not reach time arithmetic or a Redis PX argument).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

_TRY_AGAIN = re.compile(r"try again in\s+((?:\d+(?:\.\d+)?(?:ms|us|µs|ns|h|m|s))+)", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RETRY_AFTER_IN_MESSAGE = re.compile(r"retry after (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)
MIN_SERVER_WAIT = 0.5  # seconds: the least wait a server's word can buy (a 0 is ignored, not obeyed)
MAX_SERVER_WAIT = 86_400.0  # seconds: a day; longer is read as a day (it parks the pair anyway)
_MAX_LIMIT = 10**12  # an x-ratelimit-limit-* above this is garbage, not a limit


def bounded_wait(seconds: float | None) -> float | None:
    """A server-given wait made safe: None when not finite or not positive, else within
    [``MIN_SERVER_WAIT``, ``MAX_SERVER_WAIT``] seconds."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(max(seconds, MIN_SERVER_WAIT), MAX_SERVER_WAIT)


def _number(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


def parse_duration(text: str) -> float | None:
    """A Go-style duration ("1s", "20ms", "17.28s", "6m0s", "1h2m3.5s") in seconds; None if malformed.

    A bare number is taken as seconds (some proxies send "0.5"); a negative one is 0, and one
    that is not finite (or absurdly long) is malformed.
    """
    text = text.strip()
    value = _number(text)
    if value is None:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        value = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(value) or value > MAX_SERVER_WAIT * 366:
        return None
    return max(0.0, value)


def retry_after_seconds(headers: Mapping[str, str], message: str = "", now: float | None = None) -> float | None:
    """The wait the server asked for, in seconds (see ``bounded_wait``), or None when it did not
    say anything usable.

    Order: ``retry-after-ms``, ``retry-after`` (seconds, then HTTP date), then the body's message
    ("try again in 1.2s", Azure's "retry after 86400 seconds"); a garbage, zero, negative or
    non-finite value is skipped and the next source is read.
    """
    ms = _number(headers.get("retry-after-ms") or "")
    if ms is not None and bounded_wait(ms / 1000.0) is not None:
        return bounded_wait(ms / 1000.0)
    ra = headers.get("retry-after")
    if ra is not None:
        wait = _number(ra)
        if wait is None:
            try:
                wait = parsedate_to_datetime(ra).timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError, OverflowError):
                wait = None
        if bounded_wait(wait) is not None:
            return bounded_wait(wait)
    if message:
        m = _TRY_AGAIN.search(message)
        if m:
            return bounded_wait(parse_duration(m.group(1)))
        m = _RETRY_AFTER_IN_MESSAGE.search(message)
        if m:
            return bounded_wait(float(m.group(1)))
    return None


@dataclass(frozen=True)
class RateLimitHeaders:
    """The x-ratelimit-* headers of one response; None for what was missing or a sentinel."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @property
    def empty(self) -> bool:
        return self == _EMPTY

    def per_minute(self, window_seconds: float, tokens_window: float | None = None) -> RateLimitHeaders:
        """These headers with the limits read as counts per `window_seconds` (the token limit per
        `tokens_window`, if it has its own) and turned into per-minute limits: Azure reports a
        deployment's limits per enforcement window (120 RPM at 10 s windows shows
        ``x-ratelimit-limit-requests: 20``). Remaining counts stay as they are: they are what the
        server's bucket holds now, and ``remaining x 60 / limit`` then gives the seconds of limit
        held, never more than the window."""
        tokens_window = window_seconds if tokens_window is None else tokens_window
        if window_seconds == tokens_window == 60.0:
            return self
        return dataclasses.replace(
            self,
            limit_requests=None if self.limit_requests is None else round(self.limit_requests * 60.0 / window_seconds),
            limit_tokens=None if self.limit_tokens is None else round(self.limit_tokens * 60.0 / tokens_window),
        )


_EMPTY = RateLimitHeaders()


def _positive_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):  # "inf" overflows int()
        return None
    return value if 0 < value <= _MAX_LIMIT else None


def _remaining(raw: str | None, limit: int | None) -> int | None:
    """Remaining counts only beside a known limit: with -1/0/no limit it is a sentinel too."""
    if raw is None or limit is None:
        return None
    try:
        return min(max(0, int(float(raw))), limit)
    except (ValueError, OverflowError):
        return None


def _sentinel(raw: str | None) -> bool:
    """A negative remaining count: Azure's "unknown" (sent as -1 requests beside 0 tokens)."""
    try:
        return raw is not None and float(raw) < 0
    except ValueError:
        return False


AZURE_WINDOWS = (1.0, 10.0)  # the windows Azure enforces a deployment's limits over


def header_window(limit: int | None, configured: float, per_minute: float) -> float:
    """The window (seconds) an Azure deployment's ``x-ratelimit-limit-requests`` (or ``-tokens``)
    counts over: the configured ``window_seconds`` or Azure's other one, whichever makes the header
    nearer the configured RPM (TPM). A deployment left at the default 1 s whose resource enforces
    10 s reports 20 for 120 RPM: read per second that is 1,200 RPM, a 429 storm; per 10 s it is 120."""
    if limit is None or per_minute <= 0:
        return configured
    candidates = sorted({configured, *AZURE_WINDOWS})
    return min(candidates, key=lambda w: (abs(math.log(limit * 60.0 / w / per_minute)), w != configured))


def parse_ratelimit_headers(headers: Mapping[str, Any]) -> RateLimitHeaders:
    """Read the x-ratelimit-* headers; never raises."""
    limit_r = _positive_int(headers.get("x-ratelimit-limit-requests"))
    limit_t = _positive_int(headers.get("x-ratelimit-limit-tokens"))
    reset_r = headers.get("x-ratelimit-reset-requests")
    reset_t = headers.get("x-ratelimit-reset-tokens")
    raw_r, raw_t = headers.get("x-ratelimit-remaining-requests"), headers.get("x-ratelimit-remaining-tokens")
    # Azure sometimes sends remaining-requests -1 beside remaining-tokens 0: neither is a reading, and
    # a 0 taken as one would empty our bucket and cut the shared share for nothing.
    odd = _sentinel(raw_r) or _sentinel(raw_t)
    return RateLimitHeaders(
        limit_requests=limit_r,
        limit_tokens=limit_t,
        remaining_requests=None if odd else _remaining(raw_r, limit_r),
        remaining_tokens=None if odd else _remaining(raw_t, limit_t),
        reset_requests=parse_duration(reset_r) if reset_r else None,
        reset_tokens=parse_duration(reset_t) if reset_t else None,
    )
