"""Azure's rate-limit headers read as what they are (issue 13): limits per enforcement window, not per minute;
-1 / 0 remaining as "unknown"; and the window told apart from the configured RPM when the models file
does not say it. Units: no server involved (the end-to-end runs are tests/test_azure_batch.py)."""

from __future__ import annotations

import pytest

from ratequeue.config.charge import ChargeRule
from ratequeue.worker.feedback import header_window, parse_ratelimit_headers
from ratequeue.worker.window import WindowLearner

pytestmark = pytest.mark.unit

# 20,000 TPM -> 120 RPM at a 10 s window: what the simulator and Azure report after one call.
WINDOW10 = {"x-ratelimit-limit-requests": "20", "x-ratelimit-limit-tokens": "3333",
            "x-ratelimit-remaining-requests": "19", "x-ratelimit-remaining-tokens": "3300"}


def test_per_window_limits_become_per_minute_and_remaining_stays_what_the_window_holds() -> None:
    h = parse_ratelimit_headers(WINDOW10).per_minute(10.0)
    assert (h.limit_requests, h.limit_tokens) == (120, 19998)
    assert (h.remaining_requests, h.remaining_tokens) == (19, 3300)
    assert parse_ratelimit_headers(WINDOW10).per_minute(60.0) == parse_ratelimit_headers(WINDOW10)


@pytest.mark.parametrize(("limit", "configured", "rpm", "window"), [
    (20, 10.0, 120, 10.0),   # as configured
    (2, 1.0, 120, 1.0),
    (20, 1.0, 120, 10.0),    # the file left the default 1 s; Azure enforces 10 s: 1,200 RPM would be a 429 storm
    (2, 10.0, 120, 1.0),     # and the other way round: 12 RPM would be a tenth of the deployment
    (40, 10.0, 120, 10.0),   # the deployment was given twice the configured quota: still read per 10 s
    (None, 10.0, 120, 10.0),
])
def test_the_headers_window_is_the_one_nearest_the_configured_rpm(
        limit: int | None, configured: float, rpm: int, window: float) -> None:
    assert header_window(limit, configured, rpm) == window


def test_a_token_limit_with_a_window_of_its_own_is_read_by_it() -> None:
    # Requests over 1 s, tokens over 10 s (the simulator's --azure-token-window): 2 requests, 3,333 tokens.
    headers = parse_ratelimit_headers({**WINDOW10, "x-ratelimit-limit-requests": "2"})
    windows = header_window(2, 1.0, 120), header_window(3333, 1.0, 20_000)
    assert windows == (1.0, 10.0)
    assert (headers.per_minute(*windows).limit_requests, headers.per_minute(*windows).limit_tokens) == (120, 19998)


def test_azures_minus_one_beside_zero_is_no_reading() -> None:
    odd = parse_ratelimit_headers({**WINDOW10, "x-ratelimit-remaining-requests": "-1",
                                   "x-ratelimit-remaining-tokens": "0"})
    assert odd.remaining_requests is None and odd.remaining_tokens is None
    assert (odd.limit_requests, odd.limit_tokens) == (20, 3333)  # the limits are still news


def test_a_deployments_window_bounds_the_bucket_and_its_learning() -> None:
    learner = WindowLearner(default_window=5.0)
    learner.bound("a:chat", 10.0)
    assert learner.window("a:chat") == pytest.approx(9.7)  # the window, less the headroom
    headers = parse_ratelimit_headers(WINDOW10).per_minute(10.0)
    assert learner.observe("a:chat", headers, refused=False) is None  # 9.5 s held: nothing to widen
    learner.bound("b:chat", 1.0)
    assert learner.window("b:chat") == pytest.approx(0.97)
    learner.adopt("b:chat", 56.0)  # a window an older worker stored: never more than the deployment's
    assert learner.window("b:chat") == pytest.approx(0.97)
    assert learner.window("c:other") == 5.0


def test_a_missing_max_output_fills_the_context_under_azures_rule() -> None:
    rule = ChargeRule("sum", fills_context=128_000)
    assert rule.price(1_000, 16_384, 1, defaulted=True) == 128_000
    assert rule.price(1_000, 16_384, 2, defaulted=True) == 1_000 + 2 * 127_000
    assert rule.price(1_000, 20, 1, defaulted=False) == 1_020
    assert "context" in rule.describe()
