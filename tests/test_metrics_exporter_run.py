"""The exporter against a real run (issue 12, findings 6 and 8): two worker processes and the
simulator, one worker SIGKILLed mid-batch. The exporter's counters of stored outcomes equal what
Redis holds once the batch is done (the killed worker's last outcomes included), and its
``/sd/workers`` keeps listing the killed worker, which a real Prometheus discovering workers
through it reads as ``up == 0`` (what ``RatequeueWorkerDown`` needs), while a worker stopped
cleanly leaves the list."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.heartbeats import live_workers
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import ROOT, base_env, wait_until
from tests.prometheus_server import Prometheus, free_ports

MODEL = "gpt-4o-mini"
JOBS = 300


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    with start_sim(["--latency-ms", "300", "--seed", "3", "--model", f"{MODEL}:rpm=1200:tpm=10000000"]) as handle:
        yield handle


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(_get(url).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
def exporter(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """`python -m ratequeue.producer.exporter` on a free port; yields its base URL."""
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "ratequeue.producer.exporter", "--port", "0", "--host", "127.0.0.1"],
                            env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening on http://127.0.0.1:" in line, line
    yield line.strip().rsplit(" ", 1)[-1].removesuffix("/metrics")
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.timeout(400)  # two workers, a 30 s reaper wait, a batch, Prometheus: ~70 s unloaded
def test_stored_totals_equal_redis_and_a_killed_worker_stays_a_target(
    redis_url: str, rclient: redis.Redis, sim: SimHandle, exporter: str, tmp_path: Path,
    start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    *ports, prom_port = free_ports(3)
    workers = []
    for port in ports:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_WORKER_SLOTS="4", RATEQUEUE_CHUNK_SIZE="10",
                       RATEQUEUE_METRICS_PORT=str(port), RATEQUEUE_METRICS_ADVERTISE=f"127.0.0.1:{port}",
                       RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1200", RATEQUEUE_MODEL_GPT_4O_MINI_TPM="10000000")
        workers.append(start_worker(env))
    wait_until(lambda: live_workers(rclient) == 2, 60, "two workers' heartbeats")

    def targets() -> list[str]:
        return sorted(t for group in orjson.loads(_get(f"{exporter}/sd/workers")) for t in group["targets"])

    wait_until(lambda: targets() == sorted(f"127.0.0.1:{p}" for p in ports), 30, "both workers listed",
               explain=targets)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "ratequeue-worker",
                                  "http_sd_configs": [{"url": f"{exporter}/sd/workers", "refresh_interval": "1s"}]}]}
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = Prometheus(config, prom_dir, prom_port)

    def up() -> dict[str, float]:
        result = prom.api("query", query='up{job="ratequeue-worker"}')["result"]
        return {r["metric"]["instance"]: float(r["value"][1]) for r in result}

    client = Client(load_settings(env), publish=None)
    rows = [{"custom_id": f"j-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                      "max_tokens": 20}} for i in range(JOBS)]
    batch_id = client.submit_batch(rows).batch_id

    def done() -> int:
        return int(rclient.hget(keys.batch_meta(batch_id), "completed") or 0)

    wait_until(lambda: done() >= JOBS // 4, 120, "a quarter of the jobs done")
    workers[0].send_signal(signal.SIGKILL)  # its chunks go back when its heartbeat is stale (30 s)
    workers[0].wait()
    assert targets() == sorted(f"127.0.0.1:{p}" for p in ports)  # dead, still scraped: up == 0
    wait_until(lambda: up() == {f"127.0.0.1:{ports[0]}": 0.0, f"127.0.0.1:{ports[1]}": 1.0}, 30,
               "Prometheus to read the killed worker as down", explain=up)
    batch = client.wait(batch_id, timeout=240)
    assert batch["request_counts"] == {"total": JOBS, "completed": JOBS, "failed": 0}

    metrics = _samples(f"{exporter}/metrics")
    meta = {k.decode(): v.decode() for k, v in rclient.hgetall(keys.batch_meta(batch_id)).items()}

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted({"model": MODEL, **labels}.items())))]

    assert value("ratequeue_stored_jobs_total", outcome="completed") == int(meta["completed"]) == JOBS
    assert value("ratequeue_stored_jobs_total", outcome="failed") == int(meta.get("failed", 0)) == 0
    assert value("ratequeue_stored_tokens_total", kind="prompt") == int(meta["prompt_tokens"])
    assert value("ratequeue_stored_tokens_total", kind="completion") == int(meta["completion_tokens"])
    assert value("ratequeue_stored_cost_usd_total") == pytest.approx(float(meta["cost_usd"]), rel=1e-9)
    assert value("ratequeue_stored_cost_usd_total") > 0

    workers[1].terminate()  # stopped cleanly: not down, no longer a target
    workers[1].wait(timeout=30)
    assert targets() == [f"127.0.0.1:{ports[0]}"]
    prom.stop()
