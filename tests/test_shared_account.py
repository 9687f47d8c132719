"""Shared accounts (issue 11): a 429 never fails a job, and another client's spending slows
ratequeue down instead of drawing a 429 storm. Simulator + real Redis + real worker processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def _job(n: int) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"item {n}"}], "max_tokens": 5}


def _submit(client: Client, jobs: int) -> str:
    batch_id = client.open_batch()
    for n in range(jobs):
        client.submit_job(_job(n), custom_id=f"j-{n}", batch_id=batch_id)
    client.close_batch(batch_id)
    return batch_id


@pytest.mark.e2e
def test_rate_limit_refusals_are_not_attempts(redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    """With one attempt allowed, jobs the server refuses with 429s still complete: waiting for
    capacity is not a failed attempt (a 5xx would have failed them)."""
    # 60 RPM in 1 s slices: the server holds one request at a time, so a first burst draws 429s.
    with start_sim(["--rpm", "60", "--burst-seconds", "1", "--latency-ms", "20"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MAX_ATTEMPTS="1", RATEQUEUE_JOB_DEADLINE="120")
        start_worker(env)
        client = Client(load_settings(env), publish=None)
        batch_id = _submit(client, 8)
        batch = client.wait(batch_id, timeout=90)
        refused = sim.stats()["r429"]["requests"]
    assert refused > 0, "the server never refused: the test proves nothing"
    assert batch["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
