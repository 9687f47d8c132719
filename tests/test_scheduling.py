"""Scheduling across models and batches: no head-of-line blocking, cancel, deferral."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    # A 5 s window (1 request of gpt-4o at once): the workers use the server's window.
    args = ["--rpm", "100000", "--tpm", "100000000", "--latency-ms", "100", "--model", "gpt-4o:rpm=12",
            "--burst-seconds", "5"]
    with start_sim(args) as handle:
        yield handle


def _job(n: int, model: str) -> dict[str, object]:
    return {"custom_id": f"{model}-{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}


def test_a_throttled_model_does_not_hold_up_another(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    # gpt-4o is allowed 12 requests a minute (configured, and announced by the server's headers);
    # two worker slots would be stuck on it for minutes if waiting jobs held them. They are
    # deferred instead, and gpt-4o-mini runs at once.
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_WORKER_SLOTS="2", RATEQUEUE_CHUNK_SIZE="5",
                   RATEQUEUE_DEFER_AFTER="1", RATEQUEUE_MODEL_GPT_4O_RPM="12")
    start_worker(env)
    client = Client(load_settings(env))
    slow = client.submit_batch([_job(n, "gpt-4o") for n in range(30)])
    # gpt-4o chunks reach the worker first: its burst is answered
    wait_until(lambda: client.status(slow.batch_id)["request_counts"]["completed"] > 0, 30, "gpt-4o's first answer")
    fast = client.submit_batch([_job(n, "gpt-4o-mini") for n in range(40)])
    started = time.monotonic()
    done = client.wait(fast.batch_id, timeout=30, poll=0.1)
    assert done["request_counts"]["completed"] == 40
    # Seconds, however busy the machine; held up behind gpt-4o's 12 a minute it would be minutes.
    assert time.monotonic() - started < 25
    slow_counts = client.status(slow.batch_id)["request_counts"]
    assert slow_counts["completed"] <= 4  # ~1 burst + 12/min: the limit held meanwhile
    assert client.redis.zcard("rq:deferred") > 0


def test_cancel_stops_dispatch_and_reports_the_rest_as_cancelled(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="120", RATEQUEUE_DEFER_AFTER="1",
                   RATEQUEUE_LEARN_LIMITS="0")
    start_worker(env)
    client = Client(load_settings(env))
    report = client.submit_batch([_job(n, "gpt-4o-mini") for n in range(100)])
    wait_until(lambda: client.status(report.batch_id)["request_counts"]["completed"] > 0, 30, "the first answers")
    assert client.cancel(report.batch_id)["status"] == "cancelling"
    batch = client.wait(report.batch_id, timeout=45, poll=0.2)
    counts = batch["request_counts"]
    assert batch["status"] == "cancelled"
    assert counts["completed"] + counts["failed"] == 100
    assert 0 < counts["completed"] < 30
    errors = list(client.iter_results(report.batch_id, errors=True))
    assert len(errors) == counts["failed"]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    ids = [r["custom_id"] for r in client.iter_results(report.batch_id)] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(f"gpt-4o-mini-{n}" for n in range(100))  # each exactly once
