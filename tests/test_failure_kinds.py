"""The three kinds of failure end to end, and the timeouts: a refused key parks (jobs stay
queued), a bad request fails at once with the upstream answer, 429s without any header do not
storm, a job past its deadline fails with its history, a batch past its window expires."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def _job(i: int, content: str = "hello", max_tokens: int = 10, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"custom_id": f"k-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}}


def test_a_refused_key_parks_and_a_bad_request_fails_at_once(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim(["--api-key", "sk-the-right-key-123456", "--context", "2000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, OPENAI_API_KEY="sk-a-wrong-key-0000000",
                       RATEQUEUE_PARK_COOLDOWN="30")
        refused = start_worker(env)
        client = Client(load_settings(env))
        report = client.submit_batch([_job(i) for i in range(10)])
        deadline = time.monotonic() + 20
        while not client.parked():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        [why] = client.parked().values()
        assert why["reason"] == "invalid_api_key" and "sk-a-wrong-key-0000000" not in why["message"]
        time.sleep(1.0)
        batch = client.status(report.batch_id)
        assert batch["request_counts"]["failed"] == 0 and batch["status"] == "in_progress"  # queued, not failed
        assert sim.stats()["by_status"].get("401", 0) <= 10  # each job tried at most once, then it waits
    refused.terminate()
    refused.wait(timeout=20)

    # Our model table says 128k context, the server says 2,000: it answers 400, and the job fails
    # at once with the server's answer in the errors output (no retry).
    with start_sim(["--context", "2000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path)
        start_worker(env)
        client = Client(load_settings(env))
        report = client.submit_batch([_job(1, "word " * 3000, 10)])
        batch = client.wait(report.batch_id, timeout=20)
        [err] = list(client.iter_results(report.batch_id, errors=True))
        assert err["response"]["status_code"] == 400
        assert err["response"]["body"]["error"]["code"] == "context_length_exceeded"
        assert sim.stats()["requests_total"] == 1


def test_429s_without_any_header_do_not_storm(redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    # Limits configured twice too high and no header to learn from: the server's refusals alone
    # must slow the workers (shared not-before + backoff), not set off a retry storm.
    args = ["--rpm", "600", "--tpm", "1000000", "--burst-seconds", "5", "--no-retry-after", "--no-ratelimit-headers",
            "--latency-ms", "20"]
    with start_sim(args) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1200",
                       RATEQUEUE_MAX_ATTEMPTS="20", RATEQUEUE_BURST_SECONDS="4")
        start_worker(env)
        client = Client(load_settings(env))
        report = client.submit_batch([_job(i) for i in range(200)])
        batch = client.wait(report.batch_id, timeout=60, poll=0.2)
        stats = sim.stats()
    assert batch["request_counts"]["completed"] == 200
    r429 = stats["r429"]["requests"]
    assert r429 < 0.75 * 200, f"{r429} 429s for 200 jobs"  # a storm would be many per job


def test_a_job_past_its_deadline_fails_with_its_history(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim(["--slow-rate", "1.0", "--slow-ms", "3000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_READ_TIMEOUT="0.5", RATEQUEUE_JOB_DEADLINE="2",
                       RATEQUEUE_MAX_ATTEMPTS="50")
        start_worker(env)
        client = Client(load_settings(env))
        report = client.submit_batch([_job(1)])
        started = time.monotonic()
        client.wait(report.batch_id, timeout=30)
        [err] = list(client.iter_results(report.batch_id, errors=True))
    assert err["error"]["code"] == "deadline_exceeded"
    assert err["error"]["history"]["attempts"] >= 1 and "timeout" in err["error"]["history"]["last_message"]
    assert time.monotonic() - started < 15


def test_a_batch_past_its_completion_window_expires(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim([]) as sim:
        env = base_env(redis_url, sim.url, tmp_path)
        client = Client(load_settings(env))
        report = client.submit_batch([_job(i) for i in range(5)], completion_window="1s")
        time.sleep(1.5)  # no worker ran it in time
        start_worker(env)
        batch = client.wait(report.batch_id, timeout=30)
        errors = list(client.iter_results(report.batch_id, errors=True))
    assert batch["status"] == "expired" and batch["request_counts"]["failed"] == 5
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
