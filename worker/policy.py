"""What to do with an upstream answer: store it, retry it, or fail the job at once.

    classify(response) -> Verdict
        SUCCESS    2xx with a JSON object body
        RETRY      429 rate_limit_exceeded, 408, 409, 5xx, timeouts, connection errors, and a 2xx
                   whose body is not a JSON object ("invalid_response": broken JSON, HTML, empty);
                   from a concurrency-bound server (no rate-limit headers), a 503 or a 429 that is
                   not OpenAI's rate-limit error is "overloaded": a pace signal, not an attempt
        PARK       429 insufficient_quota, 401 (key refused), a Retry-After beyond the park bound
        FAIL       400, 403, 404, other 4xx, 429 "Request too large", content filter, and a 2xx
                   larger than the response size limit ("response_too_large")

Why an oversize 2xx fails at once while a broken one is retried: the same request gets an answer
of about the same size again (a huge completion, a misrouted download), and every retry is paid
for and moves up to the limit over the network again; a broken or empty body is what a proxy
or a cut connection produces now and then, and a second try usually works.

The wait before a retry honours the server (``retry-after-ms``, ``retry-after`` as seconds or an
HTTP date, or "Please try again in 1.2s" in a 429 message) and otherwise uses exponential backoff
with full jitter (as tenacity's ``wait_random_exponential``); see ``worker.feedback``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ratequeue.worker.feedback import retry_after_seconds
from ratequeue.worker.upstream import UpstreamResponse

_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class Verdict(enum.Enum):
    """What to do with the job; the values are the ``outcome`` label of the upstream metrics."""

    SUCCESS = "success"
    RETRY = "retry"
    PARK = "park"  # the (account, model) cannot work for a while: pause it, keep its jobs queued
    FAIL = "fail"


class Reason(enum.StrEnum):
    """Why an answer got its verdict. The values are the metrics' ``reason``/``type`` labels and the
    stored error codes, exactly as before the enum existed: dashboards and alerts in ``ops/`` match
    them, so a value here must never change. Control flow tests members, never string prefixes.

    Two members stand for open families whose label is carried in ``Classified.detail``:
    ``HTTP_STATUS`` (``http_<status>``) and ``UPSTREAM_CODE`` (the server's own error code).
    """

    OK = "ok"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    INVALID_RESPONSE = "invalid_response"
    RESPONSE_TOO_LARGE = "response_too_large"
    RATE_LIMIT_REQUESTS = "rate_limit_requests"
    RATE_LIMIT_TOKENS = "rate_limit_tokens"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    REQUEST_TOO_LARGE = "request_too_large"
    LONG_RETRY_AFTER = "long_retry_after"
    INVALID_API_KEY = "invalid_api_key"
    SERVER_ERROR = "server_error"
    OVERLOADED = "overloaded"  # a concurrency-bound server's queue is full (worker.concurrency)
    HTTP_STATUS = "http_status"  # label: http_<status>, in Classified.detail
    UPSTREAM_CODE = "upstream_code"  # label: the server's error code, in Classified.detail

    @property
    def rate_limited(self) -> bool:
        """A 429 refusal for our rate: the pair's shared "not before" applies to every worker."""
        return self in (Reason.RATE_LIMIT_REQUESTS, Reason.RATE_LIMIT_TOKENS)


@dataclass(frozen=True)
class Classified:
    verdict: Verdict
    kind: Reason
    retry_after: float | None = None  # seconds the server asked us to wait, if it said
    detail: str | None = None  # the label of an open family (HTTP_STATUS, UPSTREAM_CODE)

    @property
    def reason(self) -> str:
        """The low-cardinality label: "ok", "rate_limit_tokens", "http_408", "content_filter", ..."""
        return self.detail or str(self.kind.value)


def classify(resp: UpstreamResponse, park_after: float = float("inf"), concurrency_bound: bool = False) -> Classified:
    """Decide what an upstream answer means for the job.

    ``park_after``: a requested wait (seconds) longer than this parks the pair instead of
    retrying (Azure's daily quota says "retry after 86400 seconds"). ``concurrency_bound``: the
    pair's server sends no rate-limit headers (``worker.concurrency``), so its 503s, and its 429s
    without OpenAI's error object (text-generation-inference's "Model is overloaded"), say that
    its queue is full.
    """
    if resp.status == 0:
        # UpstreamClient's transport_error starts with the failure's class: "timeout: ..." or "connection: ..."
        timed_out = (resp.transport_error or "").startswith("timeout")
        return Classified(Verdict.RETRY, Reason.TIMEOUT if timed_out else Reason.CONNECTION)
    if 200 <= resp.status < 300:
        if resp.too_large:
            return Classified(Verdict.FAIL, Reason.RESPONSE_TOO_LARGE)
        if resp.body_problem is not None:
            return Classified(Verdict.RETRY, Reason.INVALID_RESPONSE)
        return Classified(Verdict.SUCCESS, Reason.OK)
    err = resp.error
    if concurrency_bound and (resp.status == 503 or (resp.status == 429 and not err)):
        wait = retry_after_seconds(resp.headers)
        if wait is not None and wait > park_after:
            return Classified(Verdict.PARK, Reason.LONG_RETRY_AFTER, wait)
        return Classified(Verdict.RETRY, Reason.OVERLOADED, wait)
    code = str(err.get("code") or "")
    etype = str(err.get("type") or "")
    message = str(err.get("message") or "")
    if resp.status == 429:
        if code == "insufficient_quota" or etype == "insufficient_quota":
            return Classified(Verdict.PARK, Reason.INSUFFICIENT_QUOTA)
        if message.startswith("Request too large"):
            return Classified(Verdict.FAIL, Reason.REQUEST_TOO_LARGE)
        # OpenAI's 429 type is "requests" or "tokens" (sometimes with a suffix such as "requests_usage").
        kind = Reason.RATE_LIMIT_REQUESTS if etype.startswith("requests") else Reason.RATE_LIMIT_TOKENS
        wait = retry_after_seconds(resp.headers, message)
        if wait is not None and wait > park_after:
            return Classified(Verdict.PARK, Reason.LONG_RETRY_AFTER, wait)
        return Classified(Verdict.RETRY, kind, wait)
    if resp.status == 401:
        return Classified(Verdict.PARK, Reason.INVALID_API_KEY)
    should_retry = resp.headers.get("x-should-retry")
    if should_retry == "false":
        return _http_status(Verdict.FAIL, resp.status)
    if resp.status in _RETRY_STATUSES or resp.status >= 500 or should_retry == "true":
        wait = retry_after_seconds(resp.headers, message)
        if wait is not None and wait > park_after:
            return Classified(Verdict.PARK, Reason.LONG_RETRY_AFTER, wait)
        if resp.status >= 500:
            return Classified(Verdict.RETRY, Reason.SERVER_ERROR, wait)
        return _http_status(Verdict.RETRY, resp.status, wait)
    if code:
        return Classified(Verdict.FAIL, Reason.UPSTREAM_CODE, detail=code)
    return _http_status(Verdict.FAIL, resp.status)


CONTENT_FILTER = "content_filter"  # Azure's error code and finish_reason


def filter_details(error: Mapping[str, Any]) -> str:
    """The categories Azure's content filter fired on, from a 400 ``content_filter`` error's
    ``innererror.content_filter_result``: "violence (high), hate (medium)"; "" when it names none."""
    inner = error.get("innererror")
    results = inner.get("content_filter_result") if isinstance(inner, Mapping) else None
    if not isinstance(results, Mapping):
        return ""
    fired = [f"{category} ({verdict.get('severity', 'unknown')})" for category, verdict in results.items()
             if isinstance(verdict, Mapping) and verdict.get("filtered")]
    return ", ".join(fired[:10])


def output_filtered(body: Any) -> bool:
    """A 2xx whose output the content filter withheld: a choice finished as ``content_filter``."""
    choices = body.get("choices") if isinstance(body, Mapping) else None
    return isinstance(choices, list) and any(
        isinstance(c, Mapping) and c.get("finish_reason") == CONTENT_FILTER for c in choices)


def _http_status(verdict: Verdict, status: int, wait: float | None = None) -> Classified:
    return Classified(verdict, Reason.HTTP_STATUS, wait, detail=f"http_{status}")


class Backoff:
    """Seconds to wait before retry ``attempt`` (1-based): the server's word, else full jitter.

    Full jitter is what tenacity's ``wait_random_exponential`` draws, written out: a job's attempts
    span Celery deliveries and workers (the count lives in Redis), so no tenacity retry loop owns
    them. tenacity drives the loops that do run in one place (``worker.gate``, ``worker.store``).
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self._base = base
        self._cap = cap

    def delay(self, attempt: int, classified: Classified) -> float:
        """Seconds, finite and > 0 when the server said so (``worker.feedback.bounded_wait``)."""
        if classified.retry_after is not None:
            return classified.retry_after
        return random.uniform(0.0, min(self._cap, self._base * 2 ** max(0, attempt - 1)))
