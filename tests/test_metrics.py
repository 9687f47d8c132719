"""Unit tests of the worker's metric updates (worker.metrics) and of serving them (worker.metrics_server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY

from ratequeue.config.charge import ChargeRule
from ratequeue.worker import metrics, metrics_redis
from ratequeue.worker.feedback import parse_ratelimit_headers
from ratequeue.worker.metrics_redis import TimedRedis
from ratequeue.worker.metrics_server import (
    Heartbeat,
    multiprocess_mode,
    start_metrics_server,
    stop_metrics_server,
    workers_key,
)
from ratequeue.worker.usage import Usage
from tests.conftest import METRICS_REDIS_URL, ROOT

REDIS_URL = METRICS_REDIS_URL


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.fixture
def pair() -> tuple[str, str]:
    """A (model, account) no other test uses, so counters start from nothing."""
    return f"model-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:12]


def test_a_success_counts_request_latency_tokens_charge_cost_and_estimate_error(pair: tuple[str, str]) -> None:
    model, account = pair
    metrics.record_response(
        model, account, status=200, outcome="success", reason="ok", latency_s=1.5, charge=130,
        usage=Usage(prompt_tokens=100, completion_tokens=40, cached_tokens=64), cost_usd=0.25,
        estimated_prompt_tokens=103, limit_requests=5000, limit_tokens=800000,
    )
    both = {"model": model, "account": account}
    assert value("ratequeue_upstream_requests_total", **both, outcome="success", status_class="2xx") == 1
    assert value("ratequeue_upstream_latency_seconds_count", **both) == 1
    assert value("ratequeue_upstream_latency_seconds_sum", **both) == 1.5
    assert value("ratequeue_upstream_latency_seconds_bucket", **both, le="1.0") == 0
    assert value("ratequeue_upstream_latency_seconds_bucket", **both, le="2.0") == 1
    assert value("ratequeue_tokens_total", **both, kind="prompt") == 100
    assert value("ratequeue_tokens_total", **both, kind="completion") == 40
    assert value("ratequeue_tokens_total", **both, kind="cached") == 64
    assert value("ratequeue_charged_tokens_total", **both) == 130
    assert value("ratequeue_cost_usd_total", **both) == 0.25
    assert value("ratequeue_accepted_requests_total", **both) == 1
    # We counted 3 more than the server: 3 in the size histogram, "over" in the sign counter.
    assert value("ratequeue_token_estimate_abs_error_tokens_count", model=model) == 1
    assert value("ratequeue_token_estimate_abs_error_tokens_sum", model=model) == 3
    assert value("ratequeue_token_estimate_abs_error_tokens_bucket", model=model, le="2.0") == 0
    assert value("ratequeue_token_estimate_abs_error_tokens_bucket", model=model, le="5.0") == 1
    assert value("ratequeue_token_estimates_total", model=model, direction="over") == 1
    assert value("ratequeue_limit_requests_per_minute", **both, source="learned") == 5000
    assert value("ratequeue_limit_tokens_per_minute", **both, source="learned") == 800000


def test_exact_estimates_land_in_le_0_so_every_quantile_reads_0(pair: tuple[str, str]) -> None:
    model, account = pair
    for estimate in (100, 100, 100, 97):
        metrics.record_response(model, account, status=200, outcome="success", reason="ok", latency_s=0.1,
                                usage=Usage(prompt_tokens=100), estimated_prompt_tokens=estimate)
    assert value("ratequeue_token_estimate_abs_error_tokens_bucket", model=model, le="0.0") == 3
    assert value("ratequeue_token_estimate_abs_error_tokens_bucket", model=model, le="5.0") == 4
    assert value("ratequeue_token_estimate_abs_error_tokens_sum", model=model) == 3  # never negative
    assert value("ratequeue_token_estimates_total", model=model, direction="exact") == 3
    assert value("ratequeue_token_estimates_total", model=model, direction="under") == 1
    assert value("ratequeue_token_estimates_total", model=model, direction="over") == 0


@pytest.mark.parametrize(("status", "accepted"), [
    (200, True), (400, True), (404, True), (401, False), (403, False), (429, False), (500, False), (0, False)])
def test_only_answers_the_server_weighed_are_accepted_work(pair: tuple[str, str], status: int, accepted: bool) -> None:
    model, account = pair
    metrics.record_response(model, account, status=status, outcome="fail", reason="x", latency_s=0.1, charge=70)
    both = {"model": model, "account": account}
    assert value("ratequeue_accepted_requests_total", **both) == int(accepted)
    assert value("ratequeue_charged_tokens_total", **both) == (70 if accepted else 0)


def test_the_servers_remaining_and_reset_headers_are_published(pair: tuple[str, str]) -> None:
    model, account = pair
    both = {"model": model, "account": account}
    metrics.server_view(model, account, parse_ratelimit_headers({
        "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "29000",
        "x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "2s"}))
    metrics.server_view(model, account, parse_ratelimit_headers({}))  # a bare answer keeps the last view
    assert value("ratequeue_server_remaining_requests", **both) == 499
    assert value("ratequeue_server_remaining_tokens", **both) == 29000
    assert value("ratequeue_server_reset_requests_seconds", **both) == pytest.approx(0.12)
    assert value("ratequeue_server_reset_tokens_seconds", **both) == 2


def test_the_missing_max_tokens_allowance_reads_the_rule_in_force(pair: tuple[str, str]) -> None:
    """Azure charges a request without max_tokens the rest of the context window: the gauge shows
    that window, not the model's max output (it showed 16,384 for an Azure pair)."""
    model, account = pair
    both = {"model": model, "account": account}
    metrics.set_charge_rule(model, account, ChargeRule("sum", fills_context=128_000), 16_384)
    assert value("ratequeue_charge_rule_missing_max_tokens", **both) == 128_000
    metrics.set_charge_rule(model, account, ChargeRule("max", missing_max_tokens=2_000), 16_384)
    assert value("ratequeue_charge_rule_missing_max_tokens", **both) == 2_000
    metrics.set_charge_rule(model, account, ChargeRule("max"), 16_384)
    assert value("ratequeue_charge_rule_missing_max_tokens", **both) == 16_384


def test_a_job_duration_runs_from_its_batch_submission(pair: tuple[str, str]) -> None:
    model, account = pair
    metrics.job_finished(model, ok=True, account=account, submitted_at=time.time() - 90)
    metrics.job_finished(model, ok=False, code="x", account=account, submitted_at=time.time() + 5)  # clock skew
    both = {"model": model, "account": account}
    assert value("ratequeue_job_duration_seconds_bucket", **both, outcome="completed", le="60.0") == 0
    assert value("ratequeue_job_duration_seconds_bucket", **both, outcome="completed", le="120.0") == 1
    assert value("ratequeue_job_duration_seconds_sum", **both, outcome="failed") == 0


def test_redis_calls_are_timed_by_operation(mredis: redis.Redis) -> None:
    client = TimedRedis.from_url(REDIS_URL)
    before = value("ratequeue_redis_command_seconds_count", operation="heartbeat") or 0
    Heartbeat(client, "ratequeue-timed@host").beat()
    client.get("x")
    with client.pipeline() as pipe:
        pipe.get("x").get("y")
        pipe.execute()
    assert value("ratequeue_redis_command_seconds_count", operation="heartbeat") == before + 1
    errors = value("ratequeue_redis_errors_total", operation="other") or 0
    broken = TimedRedis(port=1, socket_connect_timeout=0.2)
    with pytest.raises(redis.ConnectionError):
        broken.get("x")
    assert value("ratequeue_redis_errors_total", operation="other") == errors + 1
    assert metrics_redis.operation_of(["EVALSHA", "0" * 40, 0]) == "other"
    client.close()


def test_a_first_seen_pair_gets_zero_series_for_rates_and_ratios(pair: tuple[str, str]) -> None:
    model, account = pair
    metrics.set_limits(model, account, rpm=500, tpm=30000)
    both = {"model": model, "account": account}
    assert value("ratequeue_limit_requests_per_minute", **both, source="configured") == 500
    assert value("ratequeue_limit_tokens_per_minute", **both, source="configured") == 30000
    for kind in ("requests", "tokens", "quota", "too_large", "long_wait"):
        assert value("ratequeue_rate_limited_total", **both, type=kind) == 0
    for reason in ("rate_limit_requests", "rate_limit_tokens", "server_error", "timeout", "connection"):
        assert value("ratequeue_retries_total", **both, reason=reason) == 0
    for reason in ("capacity", "backoff", "parked"):
        assert value("ratequeue_deferrals_total", **both, reason=reason) == 0
    assert value("ratequeue_jobs_total", model=model, outcome="failed") == 0
    assert value("ratequeue_in_flight_requests", **both) == 0
    assert value("ratequeue_cost_usd_total", **both) == 0
    assert value("ratequeue_accepted_requests_total", **both) == 0
    assert value("ratequeue_job_duration_seconds_count", **both, outcome="completed") == 0
    assert value("ratequeue_token_estimates_total", model=model, direction="exact") == 0
    assert value("ratequeue_cost_usd_total_created", **both) is None  # no _created series


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("rate_limit_requests", "requests"),
        ("rate_limit_tokens", "tokens"),
        ("insufficient_quota", "quota"),
        ("request_too_large", "too_large"),
        ("long_retry_after", "long_wait"),
        ("something_new", "other"),
    ],
)
def test_a_429_is_counted_by_type_and_charges_no_tokens(pair: tuple[str, str], reason: str, kind: str) -> None:
    model, account = pair
    metrics.record_response(
        model, account, status=429, outcome="retry", reason=reason, latency_s=0.2, charge=500,
        limit_requests=-1, limit_tokens=0,  # Azure's "unknown": ignored
    )
    both = {"model": model, "account": account}
    assert value("ratequeue_rate_limited_total", **both, type=kind) == 1
    assert value("ratequeue_upstream_requests_total", **both, outcome="retry", status_class="4xx") == 1
    assert value("ratequeue_charged_tokens_total", **both) == 0  # a refused request is not charged tokens
    assert value("ratequeue_limit_requests_per_minute", **both, source="learned") is None
    assert value("ratequeue_limit_tokens_per_minute", **both, source="learned") is None


def test_a_transport_failure_has_status_class_none_and_no_latency(pair: tuple[str, str]) -> None:
    model, account = pair
    metrics.record_response(model, account, status=0, outcome="retry", reason="timeout", latency_s=10.0, charge=50)
    both = {"model": model, "account": account}
    assert value("ratequeue_upstream_requests_total", **both, outcome="retry", status_class="none") == 1
    assert value("ratequeue_upstream_latency_seconds_count", **both) == 0  # created at 0, not observed
    assert value("ratequeue_charged_tokens_total", **both) == 0
    metrics.record_response(model, account, status=503, outcome="retry", reason="server_error", latency_s=0.1)
    assert value("ratequeue_upstream_requests_total", **both, outcome="retry", status_class="5xx") == 1


def test_in_flight_counts_calls_while_they_run_even_when_they_raise(pair: tuple[str, str]) -> None:
    model, account = pair
    both = {"model": model, "account": account}
    with metrics.in_flight(model, account), metrics.in_flight(model, account):
        assert value("ratequeue_in_flight_requests", **both) == 2
    assert value("ratequeue_in_flight_requests", **both) == 0
    with pytest.raises(RuntimeError), metrics.in_flight(model, account):
        raise RuntimeError("upstream blew up")
    assert value("ratequeue_in_flight_requests", **both) == 0


def test_retries_deferrals_capacity_waits_and_jobs(pair: tuple[str, str]) -> None:
    model, account = pair
    both = {"model": model, "account": account}
    metrics.retry(model, account, "server_error")
    metrics.retry(model, account, "server_error")
    metrics.deferred(model, account, "capacity")
    metrics.waited_for_capacity(model, account, 0.3)
    metrics.waited_for_capacity(model, account, -0.01)  # clock noise is never a negative wait
    metrics.job_finished(model, ok=True)
    metrics.job_finished(model, ok=False, code="context_length_exceeded")
    metrics.job_finished(model, ok=False, code="Not a Label Value!")
    assert value("ratequeue_retries_total", **both, reason="server_error") == 2
    assert value("ratequeue_deferrals_total", **both, reason="capacity") == 1
    assert value("ratequeue_capacity_wait_seconds_count", **both) == 2
    assert value("ratequeue_capacity_wait_seconds_sum", **both) == pytest.approx(0.3)
    assert value("ratequeue_jobs_total", model=model, outcome="completed") == 1
    assert value("ratequeue_jobs_total", model=model, outcome="failed") == 2
    assert value("ratequeue_job_failures_total", model=model, code="context_length_exceeded") == 1
    assert value("ratequeue_job_failures_total", model=model, code="other") == 1


def test_free_form_label_values_are_bounded() -> None:
    label = f"test_{uuid.uuid4().hex}"
    seen = {metrics._bounded(label, f"code_{i}") for i in range(100)}
    assert len(seen) == metrics._MAX_VALUES + 1 and "other" in seen
    assert metrics._bounded(label, "code_3") == "code_3"  # values already admitted keep their name
    assert metrics._bounded(f"{label}_b", "x" * 49) == "other"


def test_status_class() -> None:
    assert [metrics.status_class(s) for s in (0, 200, 299, 429, 500, 700)] == [
        "none", "2xx", "2xx", "4xx", "5xx", "none"
    ]


@pytest.mark.e2e  # a forked process holds the port
def test_metrics_server_serves_the_registry_and_survives_a_busy_port(pair: tuple[str, str]) -> None:
    model, account = pair
    metrics.retry(model, account, "timeout")
    assert not multiprocess_mode()
    assert start_metrics_server(None) is None
    port = start_metrics_server(0, addr="127.0.0.1")
    assert port
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'ratequeue_retries_total{{account="{account}",model="{model}",reason="timeout"}} 1.0' in body
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            assert start_metrics_server(busy.getsockname()[1], addr="127.0.0.1") is None  # logged, not raised
    finally:
        stop_metrics_server()


_PREFORK = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time, urllib.request
    from ratequeue.worker import metrics
    from ratequeue.worker.metrics_server import multiprocess_mode, start_metrics_server

    def child(hang, ready):
        metrics.record_response("m", "acc", status=200, outcome="success", reason="ok", latency_s=0.5, charge=10)
        metrics.job_finished("m", ok=True)
        if hang:  # mid-call when it is SIGKILLed: no exit hook runs, its in-flight call never finishes
            call = metrics.in_flight("m", "acc")
            call.__enter__()
            ready.set()
            time.sleep(60)
        ready.set()

    assert multiprocess_mode()
    ctx = multiprocessing.get_context("fork")
    events = [ctx.Event() for _ in range(3)]
    procs = [ctx.Process(target=child, args=(i == 1, events[i])) for i in range(3)]
    for p in procs: p.start()
    for e in events: e.wait(20)
    port = start_metrics_server(0, addr="127.0.0.1")
    scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    print(scrape())
    print("----")
    os.kill(procs[1].pid, signal.SIGKILL)
    for p in procs: p.join()
    print(scrape())
    """
)


@pytest.mark.e2e  # a Python subprocess
def test_prefork_children_are_merged_in_multiprocess_mode(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR: values written by forked children are served by the parent,
    and a SIGKILLed child's in-flight gauge stops counting (nobody marks it dead: it is found so)."""
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", _PREFORK], env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    before, after = out.split("----")
    requests = 'ratequeue_upstream_requests_total{account="acc",model="m",outcome="success",status_class="2xx"}'
    assert f"{requests} 3.0" in before
    assert 'ratequeue_jobs_total{model="m",outcome="completed"} 3.0' in before
    assert 'ratequeue_charged_tokens_total{account="acc",model="m"} 30.0' in before
    assert 'ratequeue_in_flight_requests{account="acc",model="m"} 1.0' in before
    assert 'ratequeue_in_flight_requests{account="acc",model="m"} 1.0' not in after
    assert 'ratequeue_jobs_total{model="m",outcome="completed"} 3.0' in after  # counters survive their process




def test_heartbeat_registers_the_worker_and_removes_it_on_stop(mredis: redis.Redis) -> None:
    beat = Heartbeat(mredis, "ratequeue-1@host", interval=0.05).start()
    try:
        first = mredis.zscore(workers_key(), "ratequeue-1@host")
        assert first is not None
        mredis.zadd(workers_key(), {"ratequeue-9@gone": 1.0})  # a worker dead for long: forgotten
        time.sleep(0.3)
        assert (mredis.zscore(workers_key(), "ratequeue-1@host") or 0) > first
        assert mredis.zscore(workers_key(), "ratequeue-9@gone") is None
    finally:
        beat.stop()
    assert mredis.zscore(workers_key(), "ratequeue-1@host") is None
