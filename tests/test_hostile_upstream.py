"""Issue 8, findings 3 and 4: upstream answers without bounds, and answers that lie.

Against a real misbehaving HTTP server (``tests.hostile_server``): the client's memory and bytes
stay under the size limit (gzip bomb, 100 MB bodies), a trickling server is cut off at the total
deadline, broken 2xx bodies are retried and then failed with their first bytes, bad Retry-After
values never loop or pause a model for a day, and SIGTERM stops a worker whose call hangs.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.worker.feedback import MAX_SERVER_WAIT, MIN_SERVER_WAIT, parse_ratelimit_headers, retry_after_seconds
from ratequeue.worker.policy import Backoff, Verdict, classify
from ratequeue.worker.upstream import Timeouts, UpstreamClient, UpstreamResponse
from tests.conftest import base_env, wait_until
from tests.hostile_server import HostileServer

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
MIB = 1 << 20


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    yield server
    server.stop()


def _post(url: str, limit: int = 4 * MIB, total: float = 30.0, **kw: Any) -> UpstreamResponse:
    async def go() -> UpstreamResponse:
        client = UpstreamClient(url, "sk-test", timeouts=Timeouts(read=total, total=total), max_response_bytes=limit)
        try:
            return await client.post(CHAT, BODY, kw.get("cid", "b/c"))
        finally:
            await client.aclose()

    return asyncio.run(go())


def _peak_bytes(fn: Callable[[], UpstreamResponse]) -> tuple[UpstreamResponse, int]:
    """``fn()`` and the most memory Python allocated meanwhile (tracemalloc: every bytes object counts)."""
    tracemalloc.start()
    try:
        resp = fn()
        return resp, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- finding 3: bounds ---------------------------------------------------------------------------

def test_a_gzip_bomb_is_stopped_while_decompressing_in_bounded_memory(hostile: HostileServer) -> None:
    resp, peak = _peak_bytes(lambda: _post(hostile.url + "/bomb:2", limit=4 * MIB))  # 2 MB inflating to 2 GiB
    assert resp.status == 200 and resp.too_large and "decompressed" in (resp.body_problem or "")
    assert peak < 20 * MIB, f"peak {peak / MIB:.0f} MiB for a 4 MiB limit"
    assert classify(resp).verdict is Verdict.FAIL and classify(resp).reason == "response_too_large"


@pytest.mark.parametrize("mode", ["huge:100", "huge_chunked:100"])
def test_a_100_mb_answer_is_refused_at_the_limit(hostile: HostileServer, mode: str) -> None:
    resp, peak = _peak_bytes(lambda: _post(f"{hostile.url}/{mode}", limit=4 * MIB))
    assert resp.too_large and resp.body is None
    assert peak < 20 * MIB, f"peak {peak / MIB:.0f} MiB for a 4 MiB limit"
    if mode.startswith("huge:"):  # the Content-Length said so: nothing was read
        assert "Content-Length" in (resp.body_problem or "")


def test_an_answer_under_the_limit_is_read_whole(hostile: HostileServer) -> None:
    resp = _post(hostile.url + "/huge_chunked:3", limit=4 * MIB)
    assert resp.body_problem is None and len(resp.body["x"]) > 2_900_000


def test_a_trickling_server_is_cut_off_at_the_total_deadline(hostile: HostileServer) -> None:
    started = time.monotonic()
    resp = _post(hostile.url + "/trickle:0.2", total=2.0, cid="trickle/unit")  # each read well within 2 s
    took = time.monotonic() - started
    assert resp.status == 0 and (resp.transport_error or "").startswith("timeout")
    assert 1.5 < took < 10
    assert classify(resp).verdict is Verdict.RETRY and classify(resp).reason == "timeout"
    deadline = time.monotonic() + 10
    while hostile.stats()["open"]:  # the connection was closed, not left trickling
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --- finding 4: answers that lie -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["broken", "html", "empty", "array"])
def test_a_2xx_that_is_not_a_json_object_is_a_transient_error(hostile: HostileServer, mode: str) -> None:
    resp = _post(f"{hostile.url}/{mode}")
    verdict = classify(resp)
    assert resp.status == 200 and (verdict.verdict, verdict.reason) == (Verdict.RETRY, "invalid_response")
    if mode in ("broken", "html"):
        assert resp.describe_problem().startswith("HTTP 200 not valid JSON: ")
        assert resp.head[:10].decode() in resp.describe_problem()


BAD_WAITS = ["inf", "-inf", "nan", "0", "-5", "soon", "", "1e308", "100000"]


@pytest.mark.parametrize("value", BAD_WAITS)
def test_bad_retry_after_values_are_ignored_or_bounded(value: str) -> None:
    for header in ("retry-after", "retry-after-ms"):
        wait = retry_after_seconds({header: value})
        assert wait is None or (math.isfinite(wait) and MIN_SERVER_WAIT <= wait <= MAX_SERVER_WAIT)
    assert retry_after_seconds({"retry-after": value}) == (
        {"1e308": MAX_SERVER_WAIT, "100000": MAX_SERVER_WAIT}.get(value)  # a day at most
    )
    parse_ratelimit_headers({"x-ratelimit-limit-tokens": value, "x-ratelimit-remaining-tokens": value,
                             "x-ratelimit-reset-tokens": value})  # never raises (int("inf") did)


@pytest.mark.parametrize("value", ["inf", "0", "-5", "soon", "nan"])
def test_a_429_with_a_useless_retry_after_backs_off_with_jitter(hostile: HostileServer, value: str) -> None:
    resp = _post(f"{hostile.url}/ra429:{value}")
    verdict = classify(resp, park_after=300)
    assert (resp.status, verdict.verdict, verdict.retry_after) == (429, Verdict.RETRY, None)
    waits = [Backoff().delay(n, verdict) for n in range(1, 7)]
    assert all(math.isfinite(w) and w >= 0 for w in waits)


def test_a_tiny_server_wait_is_raised_to_the_floor() -> None:
    assert retry_after_seconds({"retry-after-ms": "1"}) == MIN_SERVER_WAIT


@pytest.mark.parametrize("value", ["1e308", "100000"])
def test_a_huge_retry_after_parks_with_a_finite_wait(hostile: HostileServer, value: str) -> None:
    verdict = classify(_post(f"{hostile.url}/ra429:{value}"), park_after=300)
    assert verdict.verdict is Verdict.PARK and verdict.reason == "long_retry_after"
    assert verdict.retry_after is not None and math.isfinite(verdict.retry_after)
    assert int(verdict.retry_after * 1000) <= MAX_SERVER_WAIT * 1000  # a valid Redis PX argument


# --- end to end: real workers --------------------------------------------------------------------

def _job(i: int) -> dict[str, Any]:
    return {"custom_id": f"h-{i}", "method": "POST", "url": CHAT, "body": BODY}


def test_a_broken_json_200_fails_after_retries_with_its_first_bytes(
    redis_url: str, tmp_path: Path, start_worker: StartWorker, hostile: HostileServer
) -> None:
    env = base_env(redis_url, hostile.url + "/broken", tmp_path, RATEQUEUE_MAX_ATTEMPTS="3")
    start_worker(env)
    client = Client(load_settings(env))
    report = client.submit_batch([_job(1)])
    batch = client.wait(report.batch_id, timeout=40, poll=0.2)
    assert batch["request_counts"]["completed"] == 0 and batch["request_counts"]["failed"] == 1
    [err] = list(client.iter_results(report.batch_id, errors=True))
    assert err["error"]["code"] == "max_attempts_exceeded" and err["error"]["history"]["attempts"] == 3
    assert '{"id": "chatcmpl-1", "choices": [{"mess' in err["error"]["message"]
    assert "not valid JSON" in err["error"]["message"]
    assert hostile.stats()["calls_per_job"][f"{report.batch_id}/h-1"] == 3


def test_a_trickle_job_has_one_call_open_at_a_time_and_each_is_cut_off(
    redis_url: str, tmp_path: Path, start_worker: StartWorker, hostile: HostileServer
) -> None:
    # Each call is cut at 2 s; three of them and their backoff outlast the 3 s visibility timeout,
    # so the broker hands the chunk's message out again while the first run is still calling.
    env = base_env(redis_url, hostile.url + "/trickle:0.3", tmp_path, RATEQUEUE_READ_TIMEOUT="2",
                   RATEQUEUE_VISIBILITY_TIMEOUT="3", RATEQUEUE_DEFER_AFTER="2", RATEQUEUE_MAX_ATTEMPTS="3")
    start_worker(env)
    start_worker(env)
    client = Client(load_settings(env))
    report = client.submit_batch([_job(1)])
    batch = client.wait(report.batch_id, timeout=45, poll=0.2)
    [err] = list(client.iter_results(report.batch_id, errors=True))
    stats = hostile.stats()
    assert batch["request_counts"]["failed"] == 1 and err["error"]["code"] == "max_attempts_exceeded"
    assert "timeout" in err["error"]["history"]["last_message"]
    assert stats["max_open_per_job"] == 1, stats
    assert stats["calls_per_job"][f"{report.batch_id}/h-1"] == 3, stats


def test_sigterm_stops_a_worker_with_a_hanging_call_and_another_finishes_the_job(
    redis_url: str, tmp_path: Path, start_worker: StartWorker, hostile: HostileServer
) -> None:
    hanging_env = base_env(redis_url, hostile.url + "/hang:3600", tmp_path, RATEQUEUE_SHUTDOWN_GRACE="2")
    hanging = start_worker(hanging_env)
    client = Client(load_settings(hanging_env))
    report = client.submit_batch([_job(i) for i in range(3)])
    wait_until(lambda: hostile.stats()["calls"].get("hang", 0) >= 3, 30, "the calls never started")
    stopped = time.monotonic()
    hanging.send_signal(signal.SIGTERM)
    hanging.wait(timeout=30)
    assert time.monotonic() - stopped < 2 + 10, "the worker did not stop within the grace period"
    start_worker(base_env(redis_url, hostile.url + "/ok", tmp_path))
    batch = client.wait(report.batch_id, timeout=30, poll=0.2)
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
