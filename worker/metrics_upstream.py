"""Metrics of the upstream calls of a worker process: what the API answered, what it accepted and
charged, what it cost, the limits it announced and what it says is left.

Utilisation is accepted work over the limit gauges (``ratequeue_accepted_requests_total`` and
``ratequeue_charged_tokens_total``): a request refused by a rate limit is not used capacity, and
counting it read 100% for a model whose answers were 54% 429s (issue 12, finding 4). Refused
requests are in ``ratequeue_rate_limited_total``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from ratequeue.config.charge import COMBINES, ChargeRule
from ratequeue.worker.metrics_core import PAIR, bounded, labels, never_raises, on_new_pair, pair, status_class
from ratequeue.worker.usage import Usage

if TYPE_CHECKING:
    from ratequeue.config.models import ModelSpec
    from ratequeue.worker.feedback import RateLimitHeaders

UPSTREAM_REQUESTS = Counter(
    "ratequeue_upstream_requests_total",
    "Upstream answers (transport failures included, status_class none) by outcome: success, retry, park, fail. "
    "A 429 has status_class 4xx.",
    [*PAIR, "outcome", "status_class"],
)
ACCEPTED_REQUESTS = Counter(
    "ratequeue_accepted_requests_total",
    "Answers the server accepted against its limits: a 2xx, or a 4xx other than 401, 403 and 429.",
    PAIR,
)
UPSTREAM_LATENCY = Histogram(
    "ratequeue_upstream_latency_seconds",
    "Time from sending an upstream request to its full answer.",
    PAIR,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600),
)
TOKENS = Counter(
    "ratequeue_tokens_total",
    "Tokens the server reported: kind prompt, completion, or cached (the part of prompt served from cache).",
    [*PAIR, "kind"],
)
CHARGED_TOKENS = Counter(
    "ratequeue_charged_tokens_total",
    "Tokens reserved against the TPM limit by requests the server accepted (prompt estimate + n x max output).",
    PAIR,
)
# An exact count lands in le="0", so every quantile of a run of exact counts reads 0 (the signed
# histogram's (-1, 0] bucket interpolated -0.5); the sign is a counter of its own.
ESTIMATE_ABS_ERROR = Histogram(
    "ratequeue_token_estimate_abs_error_tokens",
    "How far our prompt token count was from the server's, per successful request (absolute tokens).",
    ["model"],
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 500, 2000),
)
ESTIMATES = Counter(
    "ratequeue_token_estimates_total",
    "Prompt token counts compared with the server's: direction over (we counted more), under, or exact.",
    ["model", "direction"],
)
COST = Counter("ratequeue_cost_usd_total", "Spend in USD, priced from the model table.", PAIR)
RATE_LIMITED = Counter(
    "ratequeue_rate_limited_total",
    "429 answers by type: requests, tokens (limits), quota (insufficient_quota), too_large, long_wait.",
    [*PAIR, "type"],
)
IN_FLIGHT = Gauge(
    "ratequeue_in_flight_requests", "Upstream requests sent and not yet answered.", PAIR, multiprocess_mode="livesum"
)
LIMIT_REQUESTS = Gauge(
    "ratequeue_limit_requests_per_minute",
    "RPM limit: source configured (the model table the bucket uses) or learned (x-ratelimit-limit-requests).",
    [*PAIR, "source"],
    multiprocess_mode="mostrecent",
)
LIMIT_TOKENS = Gauge(
    "ratequeue_limit_tokens_per_minute",
    "TPM limit: source configured (the model table the bucket uses) or learned (x-ratelimit-limit-tokens).",
    [*PAIR, "source"],
    multiprocess_mode="mostrecent",
)
CHARGE_RULE = Gauge(
    "ratequeue_charge_rule",
    "1 for the charge rule a pair's jobs are priced by (sum or max; learned from the server unless pinned), 0 else.",
    [*PAIR, "rule"],
    multiprocess_mode="mostrecent",
)
CHARGE_N_COUNTED = Gauge(
    "ratequeue_charge_rule_n_counted",
    "1 when a pair's jobs are charged an output allowance for each of their n choices, 0 for one whatever n "
    "(learned from the server unless pinned).",
    PAIR,
    multiprocess_mode="mostrecent",
)
CHARGE_MISSING_MAX = Gauge(
    "ratequeue_charge_rule_missing_max_tokens",
    "Output tokens per choice a pair's jobs without a max output are charged (learned from the server unless "
    "pinned; else the model's max output; Azure: its context window, less each request's prompt).",
    PAIR,
    multiprocess_mode="mostrecent",
)
# The server's own view of what is left, beside our bucket's: drift between the two is visible.
SERVER_REMAINING_REQUESTS = Gauge(
    "ratequeue_server_remaining_requests", "The last x-ratelimit-remaining-requests the server sent.",
    PAIR, multiprocess_mode="mostrecent",
)
SERVER_REMAINING_TOKENS = Gauge(
    "ratequeue_server_remaining_tokens", "The last x-ratelimit-remaining-tokens the server sent.",
    PAIR, multiprocess_mode="mostrecent",
)
SERVER_RESET_REQUESTS = Gauge(
    "ratequeue_server_reset_requests_seconds", "The last x-ratelimit-reset-requests the server sent, in seconds.",
    PAIR, multiprocess_mode="mostrecent",
)
SERVER_RESET_TOKENS = Gauge(
    "ratequeue_server_reset_tokens_seconds", "The last x-ratelimit-reset-tokens the server sent, in seconds.",
    PAIR, multiprocess_mode="mostrecent",
)
CONCURRENCY_WINDOW = Gauge(
    "ratequeue_concurrency_window",
    "Calls in flight a concurrency-bound pair (a server without rate-limit headers) may have: its adaptive "
    "window (worker.concurrency), summed over the worker processes.",
    PAIR, multiprocess_mode="livesum",
)

RATE_LIMIT_TYPES = {  # the policy's reason for a 429 -> the type label
    "rate_limit_requests": "requests",
    "rate_limit_tokens": "tokens",
    "insufficient_quota": "quota",
    "request_too_large": "too_large",
    "long_retry_after": "long_wait",
}
_REFUSED_4XX = (401, 403, 429)  # refused before the server weighed the request against its limits


@on_new_pair
def _zero_series(model: str, account: str) -> None:
    labels(UPSTREAM_REQUESTS, model, account, "success", "2xx")
    labels(ACCEPTED_REQUESTS, model, account)
    labels(UPSTREAM_LATENCY, model, account)
    for kind in ("prompt", "completion", "cached"):
        labels(TOKENS, model, account, kind)
    labels(CHARGED_TOKENS, model, account)
    labels(COST, model, account)
    for kind in RATE_LIMIT_TYPES.values():
        labels(RATE_LIMITED, model, account, kind)
    labels(ESTIMATE_ABS_ERROR, model)
    for direction in ("over", "under", "exact"):
        labels(ESTIMATES, model, direction)
    labels(IN_FLIGHT, model, account)


def accepted(status: int) -> bool:
    """Did the server accept the request against its limits? A 2xx, or a 4xx it weighed (400,
    404...), not a 429, nor a 401/403 (the key was refused), nor a 5xx or a transport failure."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in _REFUSED_4XX)


def cost_usd(spec: ModelSpec, usage: Usage | None) -> float:
    """USD of a call's `usage` at `spec`'s prices; 0 when there is none or its counts contradict each other."""
    if usage is None:
        return 0.0
    try:
        return spec.cost_usd(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
    except ValueError:
        return 0.0


@never_raises
def record_response(
    model: str,
    account: str,
    *,
    status: int,
    outcome: str,
    reason: str,
    latency_s: float,
    charge: int = 0,
    usage: Usage | None = None,
    cost_usd: float = 0.0,
    estimated_prompt_tokens: int | None = None,
    limit_requests: float | None = None,
    limit_tokens: float | None = None,
) -> None:
    """Count one upstream answer.

    `outcome` is the policy's verdict (``success``, ``retry``, ``park``, ``fail``) and `reason` its label
    (``ok``, ``rate_limit_tokens``, ...); a 429 is also counted in ``ratequeue_rate_limited_total``
    by type. `latency_s` is in seconds. `charge` (tokens reserved for the request) counts as
    charged when the server accepted the request (:func:`accepted`). `usage`, `cost_usd` (USD) and
    `estimated_prompt_tokens` (our count) are given for a success. `limit_requests` and
    `limit_tokens` are the limits per minute the answer announced (``x-ratelimit-limit-*``), shown
    as the learned limits; None or non-positive values are ignored.
    """
    pair(model, account)
    labels(UPSTREAM_REQUESTS, model, account, bounded("outcome", outcome), status_class(status)).inc()
    if status:
        labels(UPSTREAM_LATENCY, model, account).observe(max(latency_s, 0.0))
    if status == 429:
        labels(RATE_LIMITED, model, account, RATE_LIMIT_TYPES.get(reason, "other")).inc()
    if accepted(status):
        labels(ACCEPTED_REQUESTS, model, account).inc()
        if charge > 0:
            labels(CHARGED_TOKENS, model, account).inc(charge)
    if usage is not None:
        labels(TOKENS, model, account, "prompt").inc(usage.prompt_tokens)
        labels(TOKENS, model, account, "completion").inc(usage.completion_tokens)
        labels(TOKENS, model, account, "cached").inc(usage.cached_tokens)
        if estimated_prompt_tokens is not None and usage.prompt_tokens > 0:
            _estimate(model, estimated_prompt_tokens - usage.prompt_tokens)
    if cost_usd > 0:
        labels(COST, model, account).inc(cost_usd)
    if limit_requests is not None and limit_requests > 0:  # Azure sends -1 or 0 for "unknown"
        labels(LIMIT_REQUESTS, model, account, "learned").set(limit_requests)
    if limit_tokens is not None and limit_tokens > 0:
        labels(LIMIT_TOKENS, model, account, "learned").set(limit_tokens)


def _estimate(model: str, error: int) -> None:
    """Our prompt count minus the server's: its size in the histogram, its sign in the counter."""
    labels(ESTIMATE_ABS_ERROR, model).observe(abs(error))
    labels(ESTIMATES, model, "over" if error > 0 else "under" if error < 0 else "exact").inc()


@never_raises
def server_view(model: str, account: str, headers: RateLimitHeaders) -> None:
    """Publish what the server says is left and when it refills (``x-ratelimit-remaining-*`` and
    ``reset-*``, as parsed by ``worker.feedback``); a header it did not send leaves its gauge."""
    for gauge, value in (
        (SERVER_REMAINING_REQUESTS, headers.remaining_requests),
        (SERVER_REMAINING_TOKENS, headers.remaining_tokens),
        (SERVER_RESET_REQUESTS, headers.reset_requests),
        (SERVER_RESET_TOKENS, headers.reset_tokens),
    ):
        if value is not None:
            labels(gauge, model, account).set(value)


@never_raises
def set_limits(model: str, account: str, rpm: float, tpm: float, source: str = "configured") -> None:
    """Publish the limits (per minute) a bucket uses; `source` is ``configured`` or ``learned``."""
    pair(model, account)
    labels(LIMIT_REQUESTS, model, account, source).set(rpm)
    labels(LIMIT_TOKENS, model, account, source).set(tpm)


@never_raises
def set_charge_rule(model: str, account: str, rule: ChargeRule, default_missing: int) -> None:
    """Publish the charge rule in force: 1 on its combine rule's series, 0 on the other's; whether
    n is counted; the allowance without a max output (``default_missing`` unless learned; Azure's
    context window, of which each request's prompt is taken, where the rule fills the context)."""
    for name in COMBINES:
        labels(CHARGE_RULE, model, account, name).set(1 if name == rule.combine else 0)
    labels(CHARGE_N_COUNTED, model, account).set(1 if rule.n_multiplies else 0)
    labels(CHARGE_MISSING_MAX, model, account).set(rule.missing_max_tokens or rule.fills_context or default_missing)


@never_raises
def set_concurrency_window(model: str, account: str, size: int) -> None:
    """Publish a pair's adaptive concurrency window (calls; 0 once its server sends rate-limit headers)."""
    labels(CONCURRENCY_WINDOW, model, account).set(size)


@contextlib.contextmanager
def in_flight(model: str, account: str) -> Iterator[None]:
    """Count the enclosed upstream call as in flight (works around an ``await``)."""
    pair(model, account)
    gauge = labels(IN_FLIGHT, model, account)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()
