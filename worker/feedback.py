"""What the server says about its limits: Retry-After in its three forms, and x-ratelimit-*.

    retry-after-ms: 1500                 wins over retry-after (Azure, sometimes OpenAI)
    retry-after: 2 | Wed, 21 Oct 2026 07:28:00 GMT
    "... Please try again in 1.2s ..."   in a 429 body, when no header says it
    x-ratelimit-limit-requests / -tokens           integers; -1 or 0 mean "unknown" (Azure)
    x-ratelimit-remaining-requests / -tokens       trusted only beside a positive limit
    x-ratelimit-reset-requests / -tokens           Go durations: "1s", "20ms", "6m0s", "1h2m3.5s"
"""

from __future__ import annotations

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


def parse_duration(text: str) -> float | None:
    """A Go-style duration ("1s", "20ms", "17.28s", "6m0s", "1h2m3.5s") in seconds; None if malformed.

    A bare number is taken as seconds (some proxies send "0.5").
    """
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str], message: str = "", now: float | None = None) -> float | None:
    """The wait the server asked for, in seconds, or None when it did not say.

    Order: ``retry-after-ms``, ``retry-after`` (seconds, then HTTP date), then the body's message
    ("try again in 1.2s", Azure's "retry after 86400 seconds").
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            try:
                when = parsedate_to_datetime(ra).timestamp()
                return max(0.0, when - (time.time() if now is None else now))
            except (TypeError, ValueError, IndexError):
                pass
    if message:
        m = _TRY_AGAIN.search(message)
        if m:
            return parse_duration(m.group(1))
        m = _RETRY_AFTER_IN_MESSAGE.search(message)
        if m:
            return float(m.group(1))
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


_EMPTY = RateLimitHeaders()


def _positive_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        return None
    return value if value > 0 else None


def _remaining(raw: str | None, limit: int | None) -> int | None:
    """Remaining counts only beside a known limit: with -1/0/no limit it is a sentinel too."""
    if raw is None or limit is None:
        return None
    try:
        return max(0, int(float(raw)))
    except ValueError:
        return None


def parse_ratelimit_headers(headers: Mapping[str, Any]) -> RateLimitHeaders:
    """Read the x-ratelimit-* headers; never raises."""
    limit_r = _positive_int(headers.get("x-ratelimit-limit-requests"))
    limit_t = _positive_int(headers.get("x-ratelimit-limit-tokens"))
    reset_r = headers.get("x-ratelimit-reset-requests")
    reset_t = headers.get("x-ratelimit-reset-tokens")
    return RateLimitHeaders(
        limit_requests=limit_r,
        limit_tokens=limit_t,
        remaining_requests=_remaining(headers.get("x-ratelimit-remaining-requests"), limit_r),
        remaining_tokens=_remaining(headers.get("x-ratelimit-remaining-tokens"), limit_t),
        reset_requests=parse_duration(reset_r) if reset_r else None,
        reset_tokens=parse_duration(reset_t) if reset_t else None,
    )
