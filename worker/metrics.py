"""Prometheus metrics of a worker process: what the upstream API answered, what it cost, how long
jobs waited for capacity, what is in flight.

Every function here is cheap (a label lookup and an add) and never raises: a metric must never
fail a job. Names follow ``ratequeue_<thing>_<unit>`` (counters end in ``_total``, times are
seconds). Labels are few and closed: ``model``, ``account`` (the 12-hex fingerprint of
``ratequeue.config.values.account_fingerprint``, never a key), and small fixed vocabularies (``outcome``,
``status_class``, ``kind``, ``reason``, ``type``, ``source``). Free-form values (an upstream error
code, a retry reason) pass through :func:`_bounded`, which folds anything unexpected into
``other``.

When a (model, account) pair is first seen, the series the dashboard and the alerts divide or
``rate()`` over are created at zero, so "no 429s yet" reads 0 rather than "no data".

What Redis knows (queue depth, batches, bucket levels, parked pairs, live workers) is not here:
``producer.exporter`` publishes it once for the whole deployment. Serving these metrics, and the
prefork pool's multi-process mode, are in ``worker.metrics_server``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from ratequeue.config.charge import COMBINES, ChargeRule
from ratequeue.worker.usage import Usage

if TYPE_CHECKING:
    from ratequeue.config.models import ModelSpec

log = logging.getLogger(__name__)

__all__ = [
    "chunk_dead_lettered",
    "chunks_reclaimed",
    "cost_usd",
    "deferred",
    "in_flight",
    "job_finished",
    "outcomes_held",
    "record_response",
    "retry",
    "set_limits",
    "waited_for_capacity",
]

_PAIR = ("model", "account")

UPSTREAM_REQUESTS = Counter(
    "ratequeue_upstream_requests_total",
    "Upstream answers (transport failures included, status_class none) by outcome: success, retry, fail.",
    [*_PAIR, "outcome", "status_class"],
)
UPSTREAM_LATENCY = Histogram(
    "ratequeue_upstream_latency_seconds",
    "Time from sending an upstream request to its full answer.",
    _PAIR,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600),
)
TOKENS = Counter(
    "ratequeue_tokens_total",
    "Tokens the server reported: kind prompt, completion, or cached (the part of prompt served from cache).",
    [*_PAIR, "kind"],
)
CHARGED_TOKENS = Counter(
    "ratequeue_charged_tokens_total",
    "Tokens reserved against the TPM limit by requests the server accepted (prompt estimate + n x max output).",
    _PAIR,
)
ESTIMATE_ERROR = Histogram(
    "ratequeue_token_estimate_error_tokens",
    "Our prompt token count minus the server's, per successful request (positive: we over-counted).",
    ["model"],
    buckets=(-500, -100, -50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 500),
)
COST = Counter("ratequeue_cost_usd_total", "Spend in USD, priced from the model table.", _PAIR)
CAPACITY_WAIT = Histogram(
    "ratequeue_capacity_wait_seconds",
    "Time a request waited for the shared bucket before it was sent.",
    _PAIR,
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
RETRIES = Counter("ratequeue_retries_total", "Upstream attempts that will be retried, by reason.", [*_PAIR, "reason"])
RATE_LIMITED = Counter(
    "ratequeue_rate_limited_total",
    "429 answers by type: requests, tokens (limits), quota (insufficient_quota), too_large.",
    [*_PAIR, "type"],
)
DEFERRALS = Counter(
    "ratequeue_deferrals_total",
    "Jobs moved to the deferred set: reason capacity (none soon), backoff (long retry wait) or parked (pair paused).",
    [*_PAIR, "reason"],
)
JOBS = Counter("ratequeue_jobs_total", "Jobs whose outcome was stored: completed or failed.", ["model", "outcome"])
JOB_FAILURES = Counter("ratequeue_job_failures_total", "Failed jobs by error code.", ["model", "code"])
IN_FLIGHT = Gauge(
    "ratequeue_in_flight_requests", "Upstream requests sent and not yet answered.", _PAIR, multiprocess_mode="livesum"
)
OUTCOMES_HELD = Gauge(
    "ratequeue_outcomes_held",
    "Paid answers held in worker memory because Redis cannot take them now (down, loading or full).",
    multiprocess_mode="livesum",
)
LIMIT_REQUESTS = Gauge(
    "ratequeue_limit_requests_per_minute",
    "RPM limit: source configured (the model table the bucket uses) or learned (x-ratelimit-limit-requests).",
    [*_PAIR, "source"],
    multiprocess_mode="mostrecent",
)
LIMIT_TOKENS = Gauge(
    "ratequeue_limit_tokens_per_minute",
    "TPM limit: source configured (the model table the bucket uses) or learned (x-ratelimit-limit-tokens).",
    [*_PAIR, "source"],
    multiprocess_mode="mostrecent",
)
CHARGE_RULE = Gauge(
    "ratequeue_charge_rule",
    "1 for the charge rule a pair's jobs are priced by (sum or max; learned from the server unless pinned), 0 else.",
    [*_PAIR, "rule"],
    multiprocess_mode="mostrecent",
)
CHARGE_N_COUNTED = Gauge(
    "ratequeue_charge_rule_n_counted",
    "1 when a pair's jobs are charged an output allowance for each of their n choices, 0 for one whatever n "
    "(learned from the server unless pinned).",
    list(_PAIR),
    multiprocess_mode="mostrecent",
)
CHARGE_MISSING_MAX = Gauge(
    "ratequeue_charge_rule_missing_max_tokens",
    "Output tokens per choice a pair's jobs without a max output are charged (learned from the server unless "
    "pinned; else the model's max output).",
    list(_PAIR),
    multiprocess_mode="mostrecent",
)

_RATE_LIMIT_TYPES = {  # the policy's reason for a 429 -> the type label
    "rate_limit_requests": "requests",
    "rate_limit_tokens": "tokens",
    "insufficient_quota": "quota",
    "request_too_large": "too_large",
    "long_retry_after": "long_wait",
}
_RETRY_REASONS = ("rate_limit_requests", "rate_limit_tokens", "server_error", "timeout", "connection")
_LABEL_VALUE = re.compile(r"^[a-z0-9_]{1,48}$")
_MAX_VALUES = 40  # distinct free-form values per label before the rest become "other"

_lock = threading.Lock()
_seen_pairs: set[tuple[str, str]] = set()
_free_values: dict[str, set[str]] = {}


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _labels(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: labels() validates and locks on every call, which
    cost ~5% of a worker's CPU at 1,000 jobs/s (a dict lookup is atomic under the GIL)."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def _bounded(label: str, value: str) -> str:
    """`value` if it is a short snake_case word and the label has room for it, else ``other``."""
    value = value.lower()
    if not _LABEL_VALUE.match(value):
        return "other"
    with _lock:
        seen = _free_values.setdefault(label, set())
        if value in seen:
            return value
        if len(seen) >= _MAX_VALUES:
            return "other"
        seen.add(value)
        return value


def _pair(model: str, account: str) -> None:
    """Create at zero the series a first-seen (model, account) needs for ratios and rates."""
    with _lock:
        if (model, account) in _seen_pairs:
            return
        _seen_pairs.add((model, account))
    _labels(UPSTREAM_REQUESTS, model, account, "success", "2xx")
    for kind in ("prompt", "completion", "cached"):
        _labels(TOKENS, model, account, kind)
    _labels(CHARGED_TOKENS, model, account)
    _labels(COST, model, account)
    for kind in _RATE_LIMIT_TYPES.values():
        _labels(RATE_LIMITED, model, account, kind)
    for reason in _RETRY_REASONS:
        _labels(RETRIES, model, account, reason)
    for reason in ("capacity", "backoff", "parked"):
        _labels(DEFERRALS, model, account, reason)
    for outcome in ("completed", "failed"):
        _labels(JOBS, model, outcome)
    _labels(IN_FLIGHT, model, account)


def status_class(status: int) -> str:
    """``2xx``, ``4xx``, ``5xx``... for an HTTP status; ``none`` for a transport failure (status 0)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "none"


def cost_usd(spec: ModelSpec, usage: Usage | None) -> float:
    """USD of a call's `usage` at `spec`'s prices; 0 when there is none or its counts contradict each other."""
    if usage is None:
        return 0.0
    try:
        return spec.cost_usd(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
    except ValueError:
        return 0.0


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
    charged unless the server refused it with a 429. `usage`, `cost_usd` (USD) and
    `estimated_prompt_tokens` (our count) are given for a success. `limit_requests` and
    `limit_tokens` are the limits per minute the answer announced (``x-ratelimit-limit-*``), shown
    as the learned limits; None or non-positive values are ignored.
    """
    try:
        _pair(model, account)
        _labels(UPSTREAM_REQUESTS, model, account, _bounded("outcome", outcome), status_class(status)).inc()
        if status:
            _labels(UPSTREAM_LATENCY, model, account).observe(max(latency_s, 0.0))
        if status == 429:
            _labels(RATE_LIMITED, model, account, _RATE_LIMIT_TYPES.get(reason, "other")).inc()
        elif status and charge > 0:
            _labels(CHARGED_TOKENS, model, account).inc(charge)
        if usage is not None:
            _labels(TOKENS, model, account, "prompt").inc(usage.prompt_tokens)
            _labels(TOKENS, model, account, "completion").inc(usage.completion_tokens)
            _labels(TOKENS, model, account, "cached").inc(usage.cached_tokens)
            if estimated_prompt_tokens is not None and usage.prompt_tokens > 0:
                _labels(ESTIMATE_ERROR, model).observe(estimated_prompt_tokens - usage.prompt_tokens)
        if cost_usd > 0:
            _labels(COST, model, account).inc(cost_usd)
        if limit_requests is not None and limit_requests > 0:  # Azure sends -1 or 0 for "unknown"
            _labels(LIMIT_REQUESTS, model, account, "learned").set(limit_requests)
        if limit_tokens is not None and limit_tokens > 0:
            _labels(LIMIT_TOKENS, model, account, "learned").set(limit_tokens)
    except Exception:  # pragma: no cover - a metric must never fail a job
        log.exception("metrics: record_response failed")


def set_limits(model: str, account: str, rpm: float, tpm: float, source: str = "configured") -> None:
    """Publish the limits (per minute) a bucket uses; `source` is ``configured`` or ``learned``."""
    try:
        _pair(model, account)
        _labels(LIMIT_REQUESTS, model, account, source).set(rpm)
        _labels(LIMIT_TOKENS, model, account, source).set(tpm)
    except Exception:  # pragma: no cover
        log.exception("metrics: set_limits failed")


def set_charge_rule(model: str, account: str, rule: ChargeRule, default_missing: int) -> None:
    """Publish the charge rule in force: 1 on its combine rule's series, 0 on the other's; whether
    n is counted; the allowance without a max output (`default_missing` unless learned)."""
    try:
        for name in COMBINES:
            _labels(CHARGE_RULE, model, account, name).set(1 if name == rule.combine else 0)
        _labels(CHARGE_N_COUNTED, model, account).set(1 if rule.n_multiplies else 0)
        _labels(CHARGE_MISSING_MAX, model, account).set(rule.missing_max_tokens or default_missing)
    except Exception:  # pragma: no cover
        log.exception("metrics: set_charge_rule failed")


def waited_for_capacity(model: str, account: str, seconds: float) -> None:
    """A request was granted capacity after waiting `seconds` at its bucket's gate."""
    _labels(CAPACITY_WAIT, model, account).observe(max(seconds, 0.0))


def retry(model: str, account: str, reason: str) -> None:
    """An attempt failed and will be retried; `reason` is the policy's (``server_error``, ...)."""
    _labels(RETRIES, model, account, _bounded("reason", reason)).inc()


def deferred(model: str, account: str, reason: str) -> None:
    """A job was moved to the deferred set: `reason` ``capacity``, ``backoff`` or ``parked``."""
    _labels(DEFERRALS, model, account, _bounded("deferral", reason)).inc()


def job_finished(model: str, ok: bool, code: str = "") -> None:
    """A job's outcome was stored (count it once: only when the store said it was new): a result
    (`ok`) or an error line with error `code`. No account label: the store does not know it."""
    try:
        _labels(JOBS, model, "completed" if ok else "failed").inc()
        if not ok:
            _labels(JOB_FAILURES, model, _bounded("code", code or "unknown")).inc()
    except Exception:  # pragma: no cover
        log.exception("metrics: job_finished failed")


@contextlib.contextmanager
def in_flight(model: str, account: str) -> Iterator[None]:
    """Count the enclosed upstream call as in flight (works around an ``await``)."""
    _pair(model, account)
    gauge = _labels(IN_FLIGHT, model, account)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def outcomes_held(change: int) -> None:
    """Count ``change`` more (or fewer) paid answers waiting in memory for Redis to take them."""
    OUTCOMES_HELD.inc(change)


DEAD_LETTERED = Counter(
    "ratequeue_dead_lettered_chunks_total",
    "Chunk messages that failed RATEQUEUE_MAX_CHUNK_FAILURES times: their jobs failed as chunk_failed.",
)


def chunk_dead_lettered() -> None:
    """Count one dead-lettered chunk."""
    DEAD_LETTERED.inc()


CHUNKS_RECLAIMED = Counter(
    "ratequeue_chunks_reclaimed_total",
    "Chunk messages of workers that missed their heartbeats, given back to the queue by a reaper.",
)


def chunks_reclaimed(count: int) -> None:
    """Count ``count`` chunks taken back from a dead worker."""
    CHUNKS_RECLAIMED.inc(count)
