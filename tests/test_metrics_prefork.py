"""A real Celery worker on the prefork pool: jobs run in child processes, and the main process's
/metrics (PROMETHEUS_MULTIPROC_DIR, multi-process mode) still counts every one of them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import METRICS_REDIS_URL, ROOT, base_env

REDIS_URL = METRICS_REDIS_URL
pytestmark = pytest.mark.e2e  # prefork worker processes
JOBS = 30
# A previous run of the worker (another process) left its values in the directory: 7 completed
# jobs, and an in-flight call of a child that was killed.
_STALE = """
import os
from ratequeue.worker import metrics
for _ in range(7):
    metrics.job_finished("gpt-4o-mini", ok=True)
call = metrics.in_flight("gpt-4o-mini", "stale")
call.__enter__()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _sample(body: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.mark.timeout(90)
def test_prefork_worker_exports_what_its_children_did(mredis: redis.Redis, tmp_path: Path) -> None:
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with start_sim(["--rpm", "6000", "--tpm", "2000000", "--latency-ms", "20"]) as sim:
        env = base_env(REDIS_URL, sim.url, tmp_path, RATEQUEUE_METRICS_PORT=str(port), RATEQUEUE_CHUNK_SIZE="5",
                       PROMETHEUS_MULTIPROC_DIR=str(multiproc))
        log = (tmp_path / "ratequeue.worker.log").open("wb")
        # `ratequeue worker --pool=prefork` (python -m ratequeue.worker) must really start the prefork pool,
        # although the app configures threads (see worker/__main__.py).
        command = [sys.executable, "-m", "ratequeue.worker", "--pool=prefork", "--concurrency=2"]
        worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = Client(load_settings(env), publish=None)
            source = tmp_path / "in.jsonl"
            source.write_bytes(b"\n".join(orjson.dumps({
                "custom_id": f"c-{n}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 10,
                         "messages": [{"role": "user", "content": f"item {n}"}]},
            }) for n in range(JOBS)) + b"\n")
            batch = client.wait(client.submit_batch(source).batch_id, timeout=60)
            assert batch["request_counts"]["completed"] == JOBS
            deadline = time.monotonic() + 10
            while True:  # the last child may record its metrics a moment after the batch completes
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                if _sample(body, "ratequeue_jobs_total", model="gpt-4o-mini", outcome="completed") == JOBS:
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
            assert _sample(body, "ratequeue_upstream_requests_total") == sim.stats(timeline=False)["requests_total"]
            assert _sample(body, "ratequeue_in_flight_requests") == 0
            assert _sample(body, "ratequeue_worker_slots") == 2  # the pool's concurrency, once
            assert _sample(body, "ratequeue_worker_busy_slots") == 0
            assert _sample(body, "process_cpu_seconds_total") > 0  # the serving process's own
            assert _sample(body, "process_resident_memory_bytes") > 0
            assert not [s for f in text_string_to_metric_families(body) for s in f.samples
                        if s.name.endswith("_created")]
            assert _sample(body, "ratequeue_cost_usd_total") == pytest.approx(batch["cost_usd"], rel=1e-9)
            children = {int(m.group(1)) for f in multiproc.iterdir() if (m := re.search(r"_(\d+)\.db$", f.name))}
            assert "(prefork)" in (tmp_path / "ratequeue.worker.log").read_text()
            assert children - {worker.pid}, "the values were written by the pool's child processes"
        finally:
            _stop(worker)
            log.close()


@pytest.mark.timeout(120)
def test_a_restarted_worker_starts_from_zero_and_a_killed_childs_calls_stop_counting(
    mredis: redis.Redis, tmp_path: Path
) -> None:
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    subprocess.run([sys.executable, "-c", _STALE], env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc),
                   "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True, timeout=30)
    assert list(multiproc.iterdir())
    port = _free_port()
    # Calls that take 30 s: the child is killed while they are in flight.
    with start_sim(["--rpm", "6000", "--tpm", "2000000", "--latency-ms", "30000"]) as sim:
        env = base_env(REDIS_URL, sim.url, tmp_path, RATEQUEUE_METRICS_PORT=str(port), RATEQUEUE_CHUNK_SIZE="2",
                       PROMETHEUS_MULTIPROC_DIR=str(multiproc), RATEQUEUE_SHUTDOWN_GRACE="1")
        log = (tmp_path / "ratequeue.worker.log").open("wb")
        command = [sys.executable, "-m", "ratequeue.worker", "--pool=prefork", "--concurrency=1"]
        worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: E731
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    body = scrape()
                    break
                except OSError:
                    assert time.monotonic() < deadline and worker.poll() is None
                    time.sleep(0.2)
            assert _sample(body, "ratequeue_jobs_total", model="gpt-4o-mini", outcome="completed") == 0
            assert 'account="stale"' not in body  # the old run's in-flight call is gone with its files
            client = Client(load_settings(env), publish=None)
            source = tmp_path / "in.jsonl"
            source.write_bytes(b"\n".join(orjson.dumps({
                "custom_id": f"c-{n}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
            }) for n in range(2)) + b"\n")
            client.submit_batch(source)
            deadline = time.monotonic() + 30
            # Slow start sends one call until the server has answered (30 s): one in flight.
            while _sample(body := scrape(), "ratequeue_in_flight_requests") < 1:
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
            assert _sample(body, "ratequeue_worker_busy_slots") == 1
            [child] = _children(worker.pid)
            os.kill(child, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while _sample(body := scrape(), "ratequeue_in_flight_requests") != 0:
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
            assert _sample(body, "ratequeue_worker_busy_slots") in (0, 1)  # the new child may hold the chunk again
            assert _sample(body, "ratequeue_worker_slots") == 1
            # The killed child's chunk comes back to the new child flagged as redelivered.
            deadline = time.monotonic() + 15
            while _sample(body := scrape(), "ratequeue_chunks_redelivered_total") < 1:
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
        finally:
            _stop(worker)
            log.close()


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    worker.terminate()
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
