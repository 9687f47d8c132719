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

from ratequeue.worker import metrics
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
    # We counted 3 more than the server; a histogram with negative buckets has no _sum (OpenMetrics).
    assert value("ratequeue_token_estimate_error_tokens_count", model=model) == 1
    assert value("ratequeue_token_estimate_error_tokens_bucket", model=model, le="2.0") == 0
    assert value("ratequeue_token_estimate_error_tokens_bucket", model=model, le="5.0") == 1
    assert value("ratequeue_limit_requests_per_minute", **both, source="learned") == 5000
    assert value("ratequeue_limit_tokens_per_minute", **both, source="learned") == 800000


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
    assert value("ratequeue_upstream_latency_seconds_count", **both) is None
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
    import multiprocessing, os, sys, urllib.request
    from ratequeue.worker import metrics
    from ratequeue.worker.metrics_server import mark_process_dead, multiprocess_mode, start_metrics_server

    def child(crash):
        metrics.record_response("m", "acc", status=200, outcome="success", reason="ok", latency_s=0.5, charge=10)
        metrics.job_finished("m", ok=True)
        if crash:  # killed mid-call: its in-flight request never finishes
            call = metrics.in_flight("m", "acc")
            call.__enter__()
            os._exit(1)

    assert multiprocess_mode()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=child, args=(i == 1,)) for i in range(3)]
    for p in procs: p.start()
    for p in procs: p.join()
    port = start_metrics_server(0, addr="127.0.0.1")
    scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    print(scrape())
    print("----")
    for p in procs: mark_process_dead(p.pid)
    print(scrape())
    """
)


@pytest.mark.e2e  # a Python subprocess
def test_prefork_children_are_merged_in_multiprocess_mode(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR: values written by forked children are served by the parent,
    and a dead child's in-flight gauge stops counting once it is marked dead."""
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
