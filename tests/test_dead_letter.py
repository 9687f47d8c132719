"""A chunk that keeps failing (not because of Redis) is dead-lettered after
RATEQUEUE_MAX_CHUNK_FAILURES runs: its jobs fail as chunk_failed with the reason, the batch ends,
a record is kept, and nothing is requeued for ever or lost."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import redis

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.queue import publisher
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def test_a_chunk_that_always_fails_is_dead_lettered_and_its_jobs_fail_with_the_reason(
    redis_url: str, rclient: redis.Redis, tmp_path: Path, start_worker: StartWorker
) -> None:
    jobs = [{"custom_id": f"d-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": f"{i}"}]}}
            for i in range(4)]
    with start_sim(["--rpm", "100000", "--tpm", "10000000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MAX_CHUNK_FAILURES="3")
        stored_only = Client(load_settings(env), publish=lambda *_: None)
        batch_id = stored_only.submit_batch(jobs).batch_id
        rclient.hset(keys.batch_jobs(batch_id), "d-2", b"{not json")  # a stored job no run can read
        start_worker(env)
        client = Client(load_settings(env))
        publisher(load_settings(env))(batch_id, [f"d-{i}" for i in range(4)])  # one chunk of all four
        done = client.wait(batch_id, timeout=60, poll=0.2)
        calls = sim.stats()["calls_by_client_id"]
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
    errors = {line["custom_id"]: line["error"] for line in client.iter_results(batch_id, errors=True)}
    assert set(errors) == {f"d-{i}" for i in range(4)}
    assert all(e["code"] == "chunk_failed" and "failed 3 times" in e["message"] for e in errors.values())
    [record] = client.overview()["dead_lettered_chunks"]  # what `ratequeue status` shows
    assert record["batch_id"] == batch_id and record["jobs"] == 4 and "JSON" in record["error"]
    assert calls == {}  # the chunk never got as far as an upstream call
    assert rclient.llen("ratequeue") == 0  # not requeued again
