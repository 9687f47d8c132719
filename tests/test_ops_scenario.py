"""Issue 12's end-to-end monitoring test: the dashboard's and the alerts' expressions, evaluated by a real
Prometheus, read right in the situations they exist for.

Two real workers and the exporter run against the simulator (two models); Prometheus (Debian's binary)
scrapes every second and finds the workers through the exporter's ``/sd/workers``, as
ops/prometheus/prometheus-local.yml does. The scenario, one phase after the other:

1. a 429 storm: another client of the same key takes most of one model's RPM. The dashboard's utilisation
   for that model (accepted work over the limit) reads under 60% and above 0 while it lasts; the refused
   panel shows our 429s;
2. the key is refused: the pair parks. The ETA panel reads "stalled (parked)", the parked-since panel
   stays at the first park across failed probes; the key is accepted again, the pair unparked, work goes on;
3. a worker is SIGKILLed mid-batch: ``up == 0`` for its target (RatequeueWorkerDown's expression), live
   workers drop;
4. the other worker stopped with jobs pending: the ETA panel reads "stalled (no_workers)".
At the end the dashboard's stored jobs, tokens and cost, its rates summed over the run, equal Redis' within
one job (the killed worker's last outcomes included).
The alert rules run with their ``for:`` at 0 s: ALERTS shows RatequeuePairParked and RatequeueQueueStalled
(parked), RatequeueWorkerDown for the killed worker, RatequeueQueueStalled (no_workers) and RatequeueNoWorkerUp.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import redis
import yaml

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.producer.model_progress import read_model_counts
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import METRICS_REDIS_URL, ROOT, base_env, wait_until
from tests.prometheus_server import (
    PROM,
    Prometheus,
    free_ports,
    panel_exprs,
    rule_expr,
    rules_without_waits,
    stall_code,
)

STORM, OTHER = "gpt-4o-mini", "gpt-4.1-mini"
RPM = 600  # both models, simulator and workers alike; tokens never bind
STORM_SHARE = 0.8  # of STORM's RPM, taken by the other client
WINDOW = 5  # $__rate_interval, seconds
KEY = "sk-test-0123456789abcdef"  # base_env's
StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


class ForeignClient:
    """Another client of the account: plain httpx against the simulator, one model, `per_second` accepted
    requests a second (a refused one is sent again at once: it takes its share whatever ratequeue does)."""

    def __init__(self, url: str, key: str, model: str, per_second: float) -> None:
        self.accepted = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, key, model, per_second), daemon=True)

    def _run(self, url: str, key: str, model: str, per_second: float) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            due = time.monotonic()
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                if http.post("/v1/chat/completions", json=body).status_code == 200:
                    self.accepted += 1
                    due = max(due + 1 / per_second, time.monotonic() - 1)  # late: catch up, by 1 s at most
                else:
                    self.refused += 1
                    due = time.monotonic() + 0.02

    def __enter__(self) -> ForeignClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(15)

    def __repr__(self) -> str:
        return f"ForeignClient(accepted={self.accepted}, refused={self.refused})"


def chat_rows(prefix: str, per_model: dict[str, int]) -> list[dict[str, Any]]:
    """Batch rows: `per_model[model]` short chat jobs of each model."""
    return [{"custom_id": f"{prefix}-{model}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                      "max_tokens": 10}}
            for model, n in per_model.items() for i in range(n)]


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    # A bucket of 1 s: what the other client takes is gone at once, not spread over a minute's burst.
    limits = f"rpm={RPM}:tpm=10000000"
    with start_sim(["--latency-ms", "20", "--burst-seconds", "1", "--seed", "12",
                    "--model", f"{STORM}:{limits}", "--model", f"{OTHER}:{limits}"]) as handle:
        yield handle


def _prometheus_config(exporter: int, prometheus: int) -> dict[str, Any]:
    """prometheus-local.yml with this test's ports, 1 s intervals and no Alertmanager."""
    config: dict[str, Any] = yaml.safe_load((PROM / "prometheus-local.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config.pop("alerting")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [sd] = jobs["ratequeue-worker"]["http_sd_configs"]
    sd.update(url=f"http://127.0.0.1:{exporter}/sd/workers", refresh_interval="1s")
    jobs["ratequeue-exporter"]["static_configs"] = [{"targets": [f"127.0.0.1:{exporter}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus}"]}]
    return config


@pytest.mark.timeout(300)  # ~60 s, loaded or not: 30 s of it the killed worker's heartbeat going stale
def test_dashboard_and_alerts_through_storm_park_kill_and_stall(
    mredis: redis.Redis, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    *worker_ports, exporter_port, prom_port = free_ports(4)
    envs = [base_env(METRICS_REDIS_URL, sim.url, tmp_path, RATEQUEUE_WORKER_SLOTS="4", RATEQUEUE_CHUNK_SIZE="5",
                     RATEQUEUE_PARK_COOLDOWN="1", RATEQUEUE_METRICS_PORT=str(port),
                     RATEQUEUE_METRICS_ADVERTISE=f"127.0.0.1:{port}",
                     RATEQUEUE_MODEL_GPT_4O_MINI_RPM=str(RPM), RATEQUEUE_MODEL_GPT_4O_MINI_TPM="10000000",
                     RATEQUEUE_MODEL_GPT_4_1_MINI_RPM=str(RPM), RATEQUEUE_MODEL_GPT_4_1_MINI_TPM="10000000")
            for port in worker_ports]
    workers = [start_worker(env) for env in envs]
    exporter = subprocess.Popen(
        [sys.executable, "-m", "ratequeue.producer.exporter", "--port", str(exporter_port), "--host", "127.0.0.1"],
        env=envs[0], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    prom = Prometheus(_prometheus_config(exporter_port, prom_port), tmp_path, prom_port, rules=rules_without_waits())
    try:
        def health() -> dict[str, str]:
            return {t["scrapeUrl"]: t["health"] for t in prom.api("targets")["activeTargets"]}

        wait_until(lambda: list(health().values()) == ["up"] * 4, 60, "both workers, the exporter and Prometheus "
                   "to be scraped", poll=0.2, explain=health)
        client = Client(load_settings(envs[0]), publish=None)
        started = time.time()
        batches = [_storm(prom, sim, client), _refused_key(prom, sim, client, mredis)]
        batches.append(_killed_worker(prom, client, mredis, workers[0], worker_ports[0]))
        batches.append(_stalled(prom, client, workers[1]))
        _totals(prom, client, mredis, batches, started)
    finally:
        prom.stop()
        exporter.terminate()
        exporter.wait(10)


def _storm(prom: Prometheus, sim: SimHandle, client: Client) -> str:
    """Phase 1: the other client takes STORM_SHARE of STORM's RPM while our jobs of it wait."""
    with ForeignClient(sim.url, KEY, STORM, STORM_SHARE * RPM / 60) as foreign:
        batch_id = client.submit_batch(chat_rows("storm", {STORM: 60, OTHER: 20})).batch_id
        started = time.time()
        # The storm lasts until Prometheus holds 5 s of full windows of it (late scrapes: longer).
        wait_until(lambda: (prom.value(f'max(timestamp(ratequeue_accepted_requests_total{{model="{STORM}"}}))')
                            or 0) > started + WINDOW + 5, 60, "Prometheus to scrape the storm")
        ended = time.time()
        left = read_model_counts(client.redis, batch_id, client.settings.account_id)[STORM]
        assert left.remaining > 0, "the storm must end before our jobs of its model do"
        [eta] = panel_exprs("ETA per model", model=STORM)
        assert (prom.value(eta) or 0) > 0  # slowed, not stalled: a time
    assert foreign.accepted > 0.5 * STORM_SHARE * RPM / 60 * (ended - started), foreign
    utilisation, _tokens = panel_exprs("Limit utilisation (accepted work)", model=STORM)
    points = prom.over(utilisation, started + WINDOW + 1, ended)
    assert points and all(0 < v < 0.6 for v in points), points
    [refused] = panel_exprs("Refused requests (429) per minute by type", model=STORM)
    assert max(prom.over(refused, started, ended, type="requests")) > 0
    batch = client.wait(batch_id, timeout=120)
    assert batch["request_counts"]["completed"] == 80, batch
    return batch_id


def _refused_key(prom: Prometheus, sim: SimHandle, client: Client, mredis: redis.Redis) -> str:
    """Phase 2: the server refuses the key; STORM's pair parks, then is unparked once the key works."""
    sim.configure(api_key="sk-another-key-00000000")
    batch_id = client.submit_batch(chat_rows("refused", {STORM: 10})).batch_id
    pair = f"{client.settings.account_id}:{STORM}"
    wait_until(lambda: mredis.hexists(keys.parked_pairs(), pair), 30, "the pair to park")
    since = float(client.parked()[pair]["since"])
    [eta] = panel_exprs("ETA per model", model=STORM)
    wait_until(lambda: prom.value(eta) == stall_code("parked"), 30, "the ETA to read stalled (parked)",
               explain=lambda: prom.value(eta))
    [parked_since] = panel_exprs("Parked pairs (since the first park)", model=STORM)
    for _ in range(2):  # a check, then another some failed probes later
        _after_probes(prom, sim, 2)
        assert prom.value(parked_since) == since * 1000
        assert prom.value(eta) == stall_code("parked")
    assert float(client.parked()[pair]["last_probe"]) > since  # the probes did park it again
    _wait_firing(prom, f'alertname="RatequeuePairParked", model="{STORM}", reason="invalid_api_key"')
    _wait_firing(prom, f'alertname="RatequeueQueueStalled", model="{STORM}", reason="parked"')

    sim.configure(api_key=KEY)
    client.unpark(STORM)
    batch = client.wait(batch_id, timeout=60)
    assert batch["request_counts"]["completed"] == 10 and not client.parked(), batch
    return batch_id


def _after_probes(prom: Prometheus, sim: SimHandle, probes: int) -> None:
    """Wait for `probes` more refusals of the key, then for the exporter's next scrape."""
    def refusals() -> int:
        return int(sim.stats(timeline=False)["by_status"].get("401", 0))

    before = refusals()
    wait_until(lambda: refusals() >= before + probes, 30, f"{probes} failed probes")
    probed = time.time()
    wait_until(lambda: (prom.value("max(timestamp(ratequeue_parked_pairs))") or 0) > probed, 30,
               "a scrape after the probes")


def _killed_worker(
    prom: Prometheus, client: Client, mredis: redis.Redis, victim: subprocess.Popen[bytes], port: int
) -> str:
    """Phase 3: a worker SIGKILLed mid-batch is down for Prometheus at once, and for heartbeats within 30 s.
    Its jobs wait for their leases to end (60 s) and the reaper: still pending when phase 4 stops the other."""
    batch_id = client.submit_batch(chat_rows("killed", {STORM: 40, OTHER: 40})).batch_id
    wait_until(lambda: int(mredis.hget(keys.batch_meta(batch_id), "completed") or 0) >= 10, 60, "10 jobs done")
    heartbeat, scraped = panel_exprs("Workers alive")
    assert prom.value(heartbeat) == prom.value(scraped) == 2
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    down = rule_expr("RatequeueWorkerDown")
    instance = f"127.0.0.1:{port}"
    wait_until(lambda: [r["metric"]["instance"] for r in prom.api("query", query=down)["result"]] == [instance],
               30, f"{down} for {instance}")
    assert prom.value(scraped) == 1
    _wait_firing(prom, f'alertname="RatequeueWorkerDown", instance="{instance}"')
    wait_until(lambda: prom.value(heartbeat) == 1, 60, "the heartbeat count to drop",
               explain=lambda: prom.value(heartbeat))
    return batch_id


def _totals(prom: Prometheus, client: Client, mredis: redis.Redis, batch_ids: list[str], started: float) -> None:
    """The stored jobs, tokens and cost panels' rates, summed over the run, equal Redis' counts within one job:
    jobs per (model, outcome), tokens per kind and cost of all models against the batches' sums."""
    jobs: dict[tuple[str, ...], int] = {}
    for batch_id in batch_ids:
        for model, counts in read_model_counts(mredis, batch_id, client.settings.account_id, running=False).items():
            for outcome, n in (("completed", counts.completed), ("failed", counts.failed)):
                jobs[(model, outcome)] = jobs.get((model, outcome), 0) + n
    sums = ("prompt_tokens", "completion_tokens", "cost_usd")
    metas = [dict(zip(sums, mredis.hmget(keys.batch_meta(b), sums), strict=True)) for b in batch_ids]
    done = sum(jobs.values())
    wait_until(lambda: prom.value("sum(ratequeue_stored_jobs_total)") == done, 30, "a scrape of every outcome")
    # At the time of that scrape: increase() then extrapolates nothing past the last sample (nor before
    # the first, a 0: the exporter's counters start at 0 before any outcome).
    scraped = prom.value("max(timestamp(ratequeue_stored_jobs_total))")
    assert scraped is not None
    run = f"{math.ceil(scraped - started) + 10}s"
    seen = prom.panel_over_run("Jobs stored per minute", run, scraped, ("model", "outcome"))
    assert {k for k in seen if k[0] in (STORM, OTHER)} == jobs.keys()
    for key, count in jobs.items():
        assert abs(seen[key] - count) <= 1, (key, seen[key], count)
    tokens = prom.panel_over_run("Tokens per minute by kind", run, scraped, ("kind",))
    cost = prom.panel_over_run("Cost per hour", run, scraped, ())
    for seen_sum, field in ((tokens[("prompt",)], "prompt_tokens"), (tokens[("completion",)], "completion_tokens"),
                            (cost[()], "cost_usd")):
        truth = sum(float(meta[field] or 0) for meta in metas)
        assert truth > 0 and abs(seen_sum - truth) <= truth / done, (field, seen_sum, truth)


def _stalled(prom: Prometheus, client: Client, last: subprocess.Popen[bytes]) -> str:
    """Phase 4: no worker left and jobs pending: the ETA reads stalled (no_workers), and the alert fires."""
    last.terminate()
    last.wait(30)
    batch_id = client.submit_batch(chat_rows("stalled", {STORM: 5})).batch_id
    [eta] = panel_exprs("ETA per model", model=STORM)
    wait_until(lambda: prom.value(eta) == stall_code("no_workers"), 30, "the ETA to read stalled (no_workers)",
               explain=lambda: prom.value(eta))
    _wait_firing(prom, f'alertname="RatequeueQueueStalled", model="{STORM}", reason="no_workers"')
    _wait_firing(prom, 'alertname="RatequeueNoWorkerUp"')
    return batch_id


def _wait_firing(prom: Prometheus, labels: str) -> None:
    """Wait for the alert with `labels` to fire (the rules' `for:` are 0 s here)."""
    firing = f'ALERTS{{{labels}, alertstate="firing"}}'
    wait_until(lambda: prom.value(firing) == 1, 30, firing)
