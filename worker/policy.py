"""What to do with an upstream answer: store it, retry it, or fail the job at once.

    classify(response) -> Verdict
        SUCCESS    2xx
        RETRY      429 rate_limit_exceeded, 408, 409, 5xx, timeouts, connection errors
        FAIL       400, 401, 403, 404, other 4xx, 429 "Request too large", insufficient_quota

The wait before a retry honours the server (``retry-after-ms``, ``retry-after`` as seconds or an
HTTP date, or "Please try again in 1.2s" in a 429 message) and otherwise uses exponential backoff
with full jitter (tenacity's ``wait_random_exponential``).
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from tenacity import wait_random_exponential

from worker.upstream import UpstreamResponse

_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
_TRY_AGAIN = re.compile(r"try again in\s+((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Verdict(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class Classified:
    verdict: Verdict
    reason: str  # low-cardinality label: "ok", "rate_limit_tokens", "server_error", "timeout", ...
    retry_after: float | None = None  # seconds the server asked us to wait, if it said


def parse_duration(text: str) -> float | None:
    """Parse a Go-style duration ("1s", "20ms", "17.28s", "6m0s", "1h2m3.5s") into seconds."""
    parts = _DURATION_PART.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def retry_after_seconds(resp: UpstreamResponse, now: float | None = None) -> float | None:
    """The wait the server asked for, in seconds, or None when it did not say."""
    h = resp.headers
    ms = h.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = h.get("retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            try:
                when = parsedate_to_datetime(ra).timestamp()
                return max(0.0, when - (time.time() if now is None else now))
            except (TypeError, ValueError):
                pass
    message = resp.error.get("message")
    if isinstance(message, str):
        m = _TRY_AGAIN.search(message)
        if m:
            return parse_duration(m.group(1))
    return None


def classify(resp: UpstreamResponse) -> Classified:
    """Decide what an upstream answer means for the job."""
    if resp.status == 0:
        reason = "timeout" if (resp.transport_error or "").startswith("timeout") else "connection"
        return Classified(Verdict.RETRY, reason)
    if 200 <= resp.status < 300:
        return Classified(Verdict.SUCCESS, "ok")
    err = resp.error
    code = str(err.get("code") or "")
    etype = str(err.get("type") or "")
    message = str(err.get("message") or "")
    if resp.status == 429:
        if code == "insufficient_quota" or etype == "insufficient_quota":
            return Classified(Verdict.FAIL, "insufficient_quota")
        if message.startswith("Request too large"):
            return Classified(Verdict.FAIL, "request_too_large")
        kind = "requests" if etype.startswith("requests") else "tokens"
        return Classified(Verdict.RETRY, f"rate_limit_{kind}", retry_after_seconds(resp))
    should_retry = resp.headers.get("x-should-retry")
    if should_retry == "false":
        return Classified(Verdict.FAIL, f"http_{resp.status}")
    if resp.status in _RETRY_STATUSES or resp.status >= 500 or should_retry == "true":
        reason = "server_error" if resp.status >= 500 else f"http_{resp.status}"
        return Classified(Verdict.RETRY, reason, retry_after_seconds(resp))
    return Classified(Verdict.FAIL, code or f"http_{resp.status}")


class Backoff:
    """Seconds to wait before retry ``attempt`` (1-based): the server's word, else full jitter."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self._jitter = wait_random_exponential(multiplier=base, max=cap)

    def delay(self, attempt: int, classified: Classified) -> float:
        if classified.retry_after is not None:
            return classified.retry_after
        state = _AttemptState(attempt)
        return float(self._jitter(state))  # type: ignore[arg-type]


class _AttemptState:
    """The one field of tenacity's RetryCallState that its wait strategies read."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number
