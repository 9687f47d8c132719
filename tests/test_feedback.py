"""Every header format and error body of the facts document, read the way the worker reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from ratequeue.worker.feedback import parse_duration, parse_ratelimit_headers, retry_after_seconds
from ratequeue.worker.policy import Backoff, Classified, Verdict, classify
from ratequeue.worker.upstream import UpstreamResponse


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("20ms", 0.02), ("17.28s", 17.28), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("0s", 0.0),
     ("0.5", 0.5), ("12ms", 0.012), ("1m30s", 90.0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s1", "1s garbage"])
def test_malformed_durations_are_none(text: str) -> None:
    assert parse_duration(text) is None


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5


def test_retry_after_in_seconds_and_as_http_date() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds({"retry-after": later}, now=now.timestamp()) == pytest.approx(30.0)
    assert retry_after_seconds({"retry-after": "not a date"}) is None


def test_retry_after_from_the_429_message() -> None:
    msg = ("Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, Used 29000, "
           "Requested 1500. Please try again in 1.2s. Visit https://platform.openai.com/account/rate-limits")
    assert retry_after_seconds({}, msg) == pytest.approx(1.2)
    assert retry_after_seconds({}, "... Please try again in 340ms. ...") == 0.5  # raised to MIN_SERVER_WAIT
    assert retry_after_seconds({}, "... Please try again in 6m0s. ...") == pytest.approx(360)
    assert retry_after_seconds({}, "Requests ... Please retry after 86400 seconds.") == 86400
    assert retry_after_seconds({}, "no hint here") is None


def test_ratelimit_headers_complete() -> None:
    h = parse_ratelimit_headers({
        "x-ratelimit-limit-requests": "5000", "x-ratelimit-limit-tokens": "800000",
        "x-ratelimit-remaining-requests": "4999", "x-ratelimit-remaining-tokens": "799200",
        "x-ratelimit-reset-requests": "12ms", "x-ratelimit-reset-tokens": "6m0s",
    })
    assert (h.limit_requests, h.limit_tokens, h.remaining_requests, h.remaining_tokens) == (5000, 800000, 4999, 799200)
    assert (h.reset_requests, h.reset_tokens) == (pytest.approx(0.012), 360.0)


def test_ratelimit_sentinels_and_missing_headers_say_nothing() -> None:
    azure = parse_ratelimit_headers({"x-ratelimit-limit-tokens": "-1", "x-ratelimit-remaining-tokens": "0",
                                     "x-ratelimit-limit-requests": "0", "x-ratelimit-remaining-requests": "-1"})
    assert azure.empty
    assert parse_ratelimit_headers({}).empty
    zero_left = parse_ratelimit_headers({"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "0"})
    assert zero_left.remaining_tokens == 0  # a real zero beside a real limit is news, not a sentinel
    assert parse_ratelimit_headers({"x-ratelimit-limit-tokens": "junk"}).empty


def _resp(status: int, error: dict[str, object] | None = None, **headers: str) -> UpstreamResponse:
    return UpstreamResponse(status, {"error": error} if error else {"ok": True}, headers)


FACTS_BODIES = [
    (429, {"message": "Rate limit reached for gpt-4o in organization org-X on tokens per min (TPM): Limit 30000, "
                      "Used 29000, Requested 1500. Please try again in 1.2s.", "type": "tokens", "param": None,
           "code": "rate_limit_exceeded"}, Verdict.RETRY, "rate_limit_tokens"),
    (429, {"message": "Rate limit reached ... on requests per min (RPM): Limit 500, Used 500, Requested 1. "
                      "Please try again in 120ms.", "type": "requests", "code": "rate_limit_exceeded"},
     Verdict.RETRY, "rate_limit_requests"),
    (429, {"message": "Request too large for gpt-4o ... on tokens per min (TPM): Limit 30000, Requested 31538.",
           "type": "tokens", "code": "rate_limit_exceeded"}, Verdict.FAIL, "request_too_large"),
    (429, {"message": "You exceeded your current quota, please check your plan and billing details.",
           "type": "insufficient_quota", "param": None, "code": "insufficient_quota"},
     Verdict.PARK, "insufficient_quota"),
    (429, {"code": "429", "message": "Requests to the deployment have exceeded the rate limit. Please retry after "
                                      "86400 seconds."}, Verdict.PARK, "long_retry_after"),
    (400, {"message": "This model's maximum context length is 128000 tokens.", "type": "invalid_request_error",
           "code": "context_length_exceeded"}, Verdict.FAIL, "context_length_exceeded"),
    (401, {"message": "Incorrect API key provided: sk-...abcd.", "type": "invalid_request_error",
           "code": "invalid_api_key"}, Verdict.PARK, "invalid_api_key"),
    (403, {"message": "Your request was flagged by our moderation system.", "type": "invalid_request_error",
           "code": "content_filter"}, Verdict.FAIL, "content_filter"),
    (404, {"message": "The model `gpt-9` does not exist", "type": "invalid_request_error",
           "code": "model_not_found"}, Verdict.FAIL, "model_not_found"),
    (500, {"message": "The server had an error while processing your request.", "type": "server_error"},
     Verdict.RETRY, "server_error"),
    (502, {"message": "Bad gateway.", "type": "server_error"}, Verdict.RETRY, "server_error"),
    (503, {"message": "The engine is currently overloaded.", "type": "server_error"}, Verdict.RETRY, "server_error"),
    (408, {"message": "Request timed out."}, Verdict.RETRY, "http_408"),
    (409, {"message": "Conflict."}, Verdict.RETRY, "http_409"),
]


@pytest.mark.parametrize(("status", "error", "verdict", "reason"), FACTS_BODIES)
def test_every_error_body_of_the_facts(status: int, error: dict[str, object], verdict: Verdict, reason: str) -> None:
    got = classify(_resp(status, error), park_after=300)
    assert (got.verdict, got.reason) == (verdict, reason)


def test_transport_failures_retry_and_success_succeeds() -> None:
    assert classify(UpstreamResponse(0, None, {}, 0.0, "timeout: ReadTimeout")).reason == "timeout"
    assert classify(UpstreamResponse(0, None, {}, 0.0, "connection: ConnectError")).reason == "connection"
    assert classify(_resp(200)).verdict is Verdict.SUCCESS


def test_x_should_retry_overrides_and_long_retry_after_parks() -> None:
    assert classify(_resp(500, {"message": "x"}, **{"x-should-retry": "false"})).verdict is Verdict.FAIL
    assert classify(_resp(400, {"message": "x"}, **{"x-should-retry": "true"})).verdict is Verdict.RETRY
    parked = classify(_resp(503, {"message": "busy"}, **{"retry-after": "3600"}), park_after=300)
    assert (parked.verdict, parked.retry_after) == (Verdict.PARK, 3600.0)


def test_backoff_honours_the_server_else_full_jitter_with_a_cap() -> None:
    b = Backoff(base=0.5, cap=8.0)
    assert b.delay(3, Classified(Verdict.RETRY, "server_error", 2.5)) == 2.5
    delays = [b.delay(n, Classified(Verdict.RETRY, "server_error")) for n in range(1, 12) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert max(delays) > 4 and min(delays) < 0.5  # jitter spreads the waits


def test_reason_and_deferral_values_are_the_labels_dashboards_and_alerts_match() -> None:
    """ops/ matches these label values (retries by reason, 429s by type, deferrals by reason): the
    enums replaced strings without changing one."""
    from ratequeue.worker import metrics
    from ratequeue.worker.attempt import Deferral
    from ratequeue.worker.policy import Reason

    assert {r.value for r in Reason} >= set(metrics._RATE_LIMIT_TYPES) | set(metrics._RETRY_REASONS) | {"ok"}
    assert [d.value for d in Deferral] == ["capacity", "backoff", "parked", "budget"]
    assert {r for r in Reason if r.rate_limited} == {Reason.RATE_LIMIT_REQUESTS, Reason.RATE_LIMIT_TOKENS}
    assert [v.value for v in Verdict] == ["success", "retry", "park", "fail"]
    labels = [classify(_resp(429, {"message": "x", "type": "requests"})).reason,
              classify(_resp(408, {"message": "x"})).reason, classify(_resp(400, {"code": "content_filter"})).reason]
    assert labels == ["rate_limit_requests", "http_408", "content_filter"] and all(type(x) is str for x in labels)
