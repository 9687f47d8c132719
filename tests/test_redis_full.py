"""Redis at its memory limit (maxmemory, noeviction) loses nothing: a submit stores a whole batch
or none of it and says Redis is full with the figures; busy workers keep the answers they paid
for until Redis has room, stay up, and every job completes exactly once."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.errors import RedisFullError
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env, private_redis, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def _jobs(prefix: str, n: int, pad: int = 0) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "max_tokens": 20,
                      "messages": [{"role": "user", "content": f"item {i} " + "lorem " * pad}]}}
            for i in range(n)]


def test_a_batch_that_does_not_fit_is_refused_whole_with_the_figures(tmp_path: Path) -> None:
    with private_redis("--maxmemory", "20mb", "--maxmemory-policy", "noeviction") as url:
        env = base_env(url, "http://127.0.0.1:9", tmp_path)  # no worker: nothing is called
        client = Client(load_settings(env))
        first = client.submit_batch(_jobs("a", 500, pad=1500))  # ~10 MB of jobs: fits
        queued = client.redis.llen("ratequeue")
        assert client.status(first.batch_id)["request_counts"]["total"] == 500
        with pytest.raises(RedisFullError) as refused:
            client.submit_batch(_jobs("b", 1500, pad=1500))  # ~30 MB more: does not
        message = str(refused.value)
        assert "Redis is full" in message and "used of maxmemory 21.0 MB" in message and "Nothing" in message
        # None of it was kept or enqueued; the first batch is whole and untouched.
        ids = [k.decode() for k in client.redis.zrange(keys.batches_index(), 0, -1)]
        assert ids == [first.batch_id]
        assert not [k for k in client.redis.scan_iter("rq:batch:*") if first.batch_id.encode() not in k]
        assert client.redis.llen("ratequeue") == queued
        assert client.status(first.batch_id)["request_counts"] == {"total": 500, "completed": 0, "failed": 0}


def test_busy_workers_keep_paid_answers_while_redis_is_full_and_finish_exactly_once(
    tmp_path: Path, start_worker: StartWorker
) -> None:
    jobs = 400
    with private_redis("--maxmemory-policy", "noeviction") as url, \
            start_sim(["--rpm", "2400", "--tpm", "10000000", "--latency-ms", "500", "--burst-seconds", "5"]) as sim:
        env = base_env(url, sim.url, tmp_path, RATEQUEUE_LOG_LEVEL="INFO")
        workers = [start_worker(env), start_worker(env)]
        client = Client(load_settings(env))
        batch_id = client.submit_batch(_jobs("f", jobs)).batch_id

        def calls_made() -> int:
            return sum(sim.stats()["calls_by_client_id"].values())

        # Full once the workers are busy (not after a fixed time: they start late on a loaded machine).
        wait_until(lambda: calls_made() >= 20, 60, "the workers' first calls")
        admin = redis.Redis.from_url(url)
        admin.config_set("maxmemory", 1)  # full: every write that needs memory is refused
        full_at = client.status(batch_id)["request_counts"]["completed"]
        # Answers come back and are paid for while nothing can be stored: they are held.
        wait_until(lambda: calls_made() > full_at, 30, "calls answered while Redis is full")
        time.sleep(1.0)  # a flush or two of the held answers, refused
        assert client.status(batch_id)["request_counts"]["completed"] == full_at  # nothing could be stored
        admin.config_set("maxmemory", 0)
        done = client.wait(batch_id, timeout=90, poll=0.5)
        calls = sim.stats()["calls_by_client_id"]
        assert [w.poll() for w in workers] == [None, None], "a worker exited"
        logs = "".join(p.read_text() for p in tmp_path.glob("worker-*.log"))
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": jobs, "completed": jobs, "failed": 0}
    per_job = Counter({cid.split("/", 1)[1]: n for cid, n in calls.items()})
    assert len(per_job) == jobs and max(per_job.values()) == 1, per_job.most_common(3)  # none paid twice
    assert "holding" in logs and "Unrecoverable" not in logs
