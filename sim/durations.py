"""Go-style duration strings, as OpenAI prints them in headers and 429 messages.

Examples: ``"0s"``, ``"20ms"``, ``"1s"``, ``"17.28s"``, ``"6m0s"``, ``"1h2m3.5s"``.
"""

from __future__ import annotations

import math

_NS_PER_S = 1_000_000_000
_NS_PER_MIN = 60 * _NS_PER_S
_NS_PER_H = 60 * _NS_PER_MIN


def _with_fraction(value: int, unit: int) -> str:
    """Write ``value / unit`` with its fraction trimmed of trailing zeros, like Go does."""
    whole, frac = divmod(value, unit)
    if frac == 0:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{str(frac).rjust(digits, '0').rstrip('0')}"


def format_duration(seconds: float) -> str:
    """Format ``seconds`` exactly like Go's ``time.Duration.String`` (nanosecond resolution)."""
    ns = round(seconds * _NS_PER_S)
    if ns <= 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _with_fraction(ns, 1_000) + "µs"
    if ns < _NS_PER_S:
        return _with_fraction(ns, 1_000_000) + "ms"
    hours, rest = divmod(ns, _NS_PER_H)
    minutes, rest = divmod(rest, _NS_PER_MIN)
    secs = _with_fraction(rest, _NS_PER_S) + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up: a client that waits this long is never early."""
    if seconds <= 0:
        return 0
    # The epsilon keeps float noise (0.1 * 3 = 0.30000000000000004) from adding a millisecond.
    return math.ceil(seconds * 1000 - 1e-6)


def format_wait(seconds: float) -> str:
    """Format a wait the way OpenAI does: millisecond precision, rounded up (``"1.2s"``, ``"340ms"``)."""
    return format_duration(ceil_ms(seconds) / 1000)
