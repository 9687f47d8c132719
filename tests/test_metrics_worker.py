"""A real worker (threads pool) against the simulator, its /metrics scraped over HTTP (issue 12):
series at zero from the start, no ``_created`` series, the bind address, accepted work under a
429 storm, job durations, exact estimates reading 0, and a parked pair's ``since`` kept across
failed probes (in Redis, hence on the exporter and in ``ratequeue status``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import METRICS_REDIS_URL, ROOT, base_env, wait_until

pytestmark = pytest.mark.e2e  # worker processes
StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
MODEL = "gpt-4o-mini"
RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int, host: str = "127.0.0.1") -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()


def serving(port: int) -> str:
    """The first body the worker serves (it starts serving once it is ready)."""
    bodies: list[str] = []

    def up() -> bool:
        try:
            bodies.append(scrape(port))
        except OSError:
            return False
        return True

    wait_until(up, timeout=30, what="the worker's /metrics")
    return bodies[-1]


def sample(body: str, name: str, **labels: str) -> float | None:
    """The sum of the samples `name` whose labels include `labels`; None when there is none."""
    found = [
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    return sum(found) if found else None


def jobs(count: int) -> list[dict[str, object]]:
    return [{"custom_id": f"c-{n}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": f"item {n}"}]}}
            for n in range(count)]


@pytest.mark.timeout(120)
def test_series_at_zero_from_start_then_a_run_counts_durations_and_exact_estimates(
    mredis: redis.Redis, tmp_path: Path, start_worker: StartWorker
) -> None:
    port = free_port()
    with start_sim(["--rpm", "6000", "--tpm", "2000000", "--latency-ms", "20"]) as sim:
        env = base_env(METRICS_REDIS_URL, sim.url, tmp_path, RATEQUEUE_METRICS_PORT=str(port),
                       RATEQUEUE_WORKER_SLOTS="4", RATEQUEUE_CHUNK_SIZE="5")
        start_worker(env)
        body = serving(port)
        account = load_settings(env).account_id
        pair = {"model": MODEL, "account": account}
        # Before any job: every series a panel rates or divides exists, at 0 (not "no data").
        for name, labels in [
            ("ratequeue_accepted_requests_total", pair),
            ("ratequeue_charged_tokens_total", pair),
            ("ratequeue_upstream_requests_total", {**pair, "outcome": "success", "status_class": "2xx"}),
            ("ratequeue_rate_limited_total", {**pair, "type": "tokens"}),
            ("ratequeue_cost_usd_total", pair),
            ("ratequeue_job_duration_seconds_count", {**pair, "outcome": "completed"}),
            ("ratequeue_job_duration_seconds_count", {**pair, "outcome": "failed"}),
            ("ratequeue_capacity_wait_seconds_count", pair),
            ("ratequeue_jobs_total", {"model": MODEL, "outcome": "failed"}),
            ("ratequeue_token_estimates_total", {"model": MODEL, "direction": "under"}),
            ("ratequeue_redis_errors_total", {"operation": "store_outcome"}),
            ("ratequeue_chunks_redelivered_total", {}),
            ("ratequeue_worker_busy_slots", {}),
        ]:
            assert sample(body, name, **labels) == 0, (name, labels)
        assert sample(body, "ratequeue_worker_slots") == 4
        names = {s.name for family in text_string_to_metric_families(body) for s in family.samples}
        assert not [n for n in names if n.endswith("_created")]
        # RATEQUEUE_METRICS_HOST unset: loopback 127.0.0.1 only (127.0.0.2 is loopback too, not bound).
        with pytest.raises(urllib.error.URLError):
            scrape(port, "127.0.0.2")

        client = Client(load_settings(env), publish=None)
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"\n".join(orjson.dumps(j) for j in jobs(20)) + b"\n")
        batch = client.wait(client.submit_batch(source).batch_id, timeout=60)
        assert batch["request_counts"]["completed"] == 20
        wait_until(lambda: sample(scrape(port), "ratequeue_jobs_total", model=MODEL, outcome="completed") == 20,
                   timeout=10, what="the last job counted")
        body = scrape(port)
        assert sample(body, "ratequeue_job_duration_seconds_count", **pair, outcome="completed") == 20
        assert sample(body, "ratequeue_accepted_requests_total", **pair) == 20
        # The simulator counts prompts as we do: every estimate exact, all in le="0" (quantiles read 0).
        assert sample(body, "ratequeue_token_estimate_abs_error_tokens_bucket", model=MODEL, le="0.0") == 20
        assert sample(body, "ratequeue_token_estimate_abs_error_tokens_count", model=MODEL) == 20
        assert sample(body, "ratequeue_token_estimates_total", model=MODEL, direction="exact") == 20
        remaining = sample(body, "ratequeue_server_remaining_requests", **pair)
        assert remaining is not None and 0 < remaining <= 6000
        assert sample(body, "ratequeue_server_reset_tokens_seconds", **pair) is not None
        for operation in ("reserve", "fetch", "store_outcome", "heartbeat"):
            assert (sample(body, "ratequeue_redis_command_seconds_count", operation=operation) or 0) > 0, operation
        assert sample(body, "ratequeue_worker_busy_slots") == 0
        assert sim.stats(timeline=False)["requests_total"] == 20


@pytest.mark.timeout(120)
def test_a_429_storm_is_not_counted_as_accepted_work(
    mredis: redis.Redis, tmp_path: Path, start_worker: StartWorker
) -> None:
    port = free_port()
    # The server allows 120 RPM in bursts of 2 s; the worker believes 6,000 and learns nothing.
    args = ["--rpm", "120", "--tpm", "2000000", "--burst-seconds", "2", "--no-ratelimit-headers", "--latency-ms", "10"]
    with start_sim(args) as sim:
        env = base_env(METRICS_REDIS_URL, sim.url, tmp_path, RATEQUEUE_METRICS_PORT=str(port),
                       RATEQUEUE_MODEL_GPT_4O_MINI_RPM="6000", RATEQUEUE_LEARN_LIMITS="false",
                       RATEQUEUE_CHUNK_SIZE="5", RATEQUEUE_MAX_ATTEMPTS="50", RATEQUEUE_METRICS_HOST="0.0.0.0")
        start_worker(env)
        serving(port)
        scrape(port, "127.0.0.2")  # bound to every address, as asked
        client = Client(load_settings(env), publish=None)
        batch = client.wait(client.submit_batch(jobs(20)).batch_id, timeout=90)
        assert batch["request_counts"]["completed"] == 20
        stats = sim.stats(timeline=False)
        wait_until(lambda: sample(scrape(port), "ratequeue_upstream_requests_total") == stats["requests_total"],
                   timeout=10, what="every answer counted")
        body = scrape(port)
        pair = {"model": MODEL, "account": load_settings(env).account_id}
        refused = sample(body, "ratequeue_rate_limited_total", **pair) or 0
        assert refused > 0 and stats["by_status"].get("429") == refused, stats
        assert sample(body, "ratequeue_accepted_requests_total", **pair) == stats["by_status"]["200"] == 20
        assert sample(body, "ratequeue_upstream_requests_total", **pair) == 20 + refused


@pytest.mark.timeout(90)
def test_parked_since_stays_at_the_first_park_across_failed_probes(
    mredis: redis.Redis, tmp_path: Path, start_worker: StartWorker
) -> None:
    with start_sim(["--api-key", "sk-the-right-key-123456"]) as sim:
        env = base_env(METRICS_REDIS_URL, sim.url, tmp_path, OPENAI_API_KEY="sk-a-wrong-key-0000000",
                       RATEQUEUE_PARK_COOLDOWN="1")
        start_worker(env)
        client = Client(load_settings(env), publish=None)
        client.submit_batch(jobs(3))
        wait_until(lambda: mredis.hlen(keys.parked_pairs()) == 1, timeout=30, what="the pair parked")
        [(field, raw)] = mredis.hgetall(keys.parked_pairs()).items()
        first = orjson.loads(raw)
        # A probe goes each second and is refused: the pair is parked again, several times (the
        # first park may follow up to 3 refusals of jobs sent together).
        wait_until(lambda: sim.stats(timeline=False)["by_status"].get("401", 0) >= 6, timeout=30,
                   what="failed probes")
        time.sleep(0.2)  # the last refusal's park written
        entry = orjson.loads(mredis.hget(keys.parked_pairs(), field) or b"{}")
        assert entry["since"] == first["since"] and entry["reason"] == "invalid_api_key"
        assert entry["last_probe"] > first["since"] + 2.5
        status = subprocess.run([*RATEQUEUE, "status"], env=env, cwd=ROOT, capture_output=True, timeout=30,
                                check=True)
        [shown] = json.loads(status.stdout)["parked"].values()
        assert shown["since"] == first["since"] and shown["last_probe"] > first["since"] + 2.5
