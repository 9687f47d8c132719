"""What to do with an upstream answer: store it, retry it, or fail the job at once.

    classify(response) -> Verdict
        SUCCESS    2xx with a JSON object body
        RETRY      429 rate_limit_exceeded, 408, 409, 5xx, timeouts, connection errors, and a 2xx
                   whose body is not a JSON object ("invalid_response": broken JSON, HTML, empty)
        PARK       429 insufficient_quota, 401 (key refused), a Retry-After beyond the park bound
        FAIL       400, 403, 404, other 4xx, 429 "Request too large", content filter, and a 2xx
                   larger than the response size limit ("response_too_large")

Why an oversize 2xx fails at once while a broken one is retried: the same request gets an answer
of about the same size again (a huge completion, a misrouted download), and every retry is paid
for and moves up to the limit over the network again; a broken or empty body is what a proxy
or a cut connection produces now and then, and a second try usually works.

The wait before a retry honours the server (``retry-after-ms``, ``retry-after`` as seconds or an
HTTP date, or "Please try again in 1.2s" in a 429 message) and otherwise uses exponential backoff
with full jitter (tenacity's ``wait_random_exponential``); see ``worker.feedback``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tenacity import wait_random_exponential

from ratequeue.worker.feedback import retry_after_seconds
from ratequeue.worker.upstream import UpstreamResponse

_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class Verdict(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"
    PARK = "park"  # the (account, model) cannot work for a while: pause it, keep its jobs queued
    FAIL = "fail"


@dataclass(frozen=True)
class Classified:
    verdict: Verdict
    reason: str  # low-cardinality label: "ok", "rate_limit_tokens", "server_error", "timeout", ...
    retry_after: float | None = None  # seconds the server asked us to wait, if it said


def classify(resp: UpstreamResponse, park_after: float = float("inf")) -> Classified:
    """Decide what an upstream answer means for the job.

    ``park_after``: a requested wait (seconds) longer than this parks the pair instead of
    retrying (Azure's daily quota says "retry after 86400 seconds").
    """
    if resp.status == 0:
        reason = "timeout" if (resp.transport_error or "").startswith("timeout") else "connection"
        return Classified(Verdict.RETRY, reason)
    if 200 <= resp.status < 300:
        if resp.too_large:
            return Classified(Verdict.FAIL, "response_too_large")
        if resp.body_problem is not None:
            return Classified(Verdict.RETRY, "invalid_response")
        return Classified(Verdict.SUCCESS, "ok")
    err = resp.error
    code = str(err.get("code") or "")
    etype = str(err.get("type") or "")
    message = str(err.get("message") or "")
    if resp.status == 429:
        if code == "insufficient_quota" or etype == "insufficient_quota":
            return Classified(Verdict.PARK, "insufficient_quota")
        if message.startswith("Request too large"):
            return Classified(Verdict.FAIL, "request_too_large")
        kind = "requests" if etype.startswith("requests") else "tokens"
        wait = retry_after_seconds(resp.headers, message)
        if wait is not None and wait > park_after:
            return Classified(Verdict.PARK, "long_retry_after", wait)
        return Classified(Verdict.RETRY, f"rate_limit_{kind}", wait)
    if resp.status == 401:
        return Classified(Verdict.PARK, "invalid_api_key")
    should_retry = resp.headers.get("x-should-retry")
    if should_retry == "false":
        return Classified(Verdict.FAIL, f"http_{resp.status}")
    if resp.status in _RETRY_STATUSES or resp.status >= 500 or should_retry == "true":
        reason = "server_error" if resp.status >= 500 else f"http_{resp.status}"
        wait = retry_after_seconds(resp.headers, message)
        if wait is not None and wait > park_after:
            return Classified(Verdict.PARK, "long_retry_after", wait)
        return Classified(Verdict.RETRY, reason, wait)
    return Classified(Verdict.FAIL, code or f"http_{resp.status}")


class Backoff:
    """Seconds to wait before retry ``attempt`` (1-based): the server's word, else full jitter."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self._jitter = wait_random_exponential(multiplier=base, max=cap)

    def delay(self, attempt: int, classified: Classified) -> float:
        """Seconds, finite and > 0 when the server said so (``worker.feedback.bounded_wait``)."""
        if classified.retry_after is not None:
            return classified.retry_after
        state = _AttemptState(attempt)
        return float(self._jitter(state))  # type: ignore[arg-type]


class _AttemptState:
    """The one field of tenacity's RetryCallState that its wait strategies read."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number
