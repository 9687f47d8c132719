"""A real Prometheus, run with the project's own ops/prometheus/prometheus.yml (targets and intervals
substituted) and alerts.yml, scrapes a real worker and the exporter while batches run against the
simulator. Then what Prometheus saw is checked against the simulator's own counts, and every PromQL
expression of the dashboard and of the rules is evaluated: each must parse, the dashboard's must
return data. Redis is a private one with a maxmemory, as production's should be (the memory panels
show nothing without one), which the shared test Redis cannot be given."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import ROOT, base_env, private_redis, wait_until
from tests.prometheus_server import PROM, Prometheus, dashboard, free_ports, substitute

JOBS = 40
MAXMEMORY = 256 * 1024 * 1024


def project_config(worker: int, exporter: int, prometheus: int) -> dict[str, Any]:
    """ops/prometheus/prometheus.yml with local targets for its jobs and 1 s intervals."""
    config: dict[str, Any] = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config.pop("alerting")  # no Alertmanager here: the rules are evaluated, nothing is sent
    targets = {"ratequeue-worker": worker, "ratequeue-exporter": exporter, "prometheus": prometheus}
    assert [job["job_name"] for job in config["scrape_configs"]] == list(targets)
    for job in config["scrape_configs"]:
        job.pop("http_sd_configs", None)  # the exporter's /sd/workers at a compose address: one local worker here
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    return config


@pytest.fixture
def limited_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A private Redis with a maxmemory and the production policy: its URL and a client."""
    with private_redis("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction") as url:
        client = redis.Redis.from_url(url)
        yield url, client
        client.close()


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    # A 1 s burst at 600 RPM against a worker that starts out believing 6000 RPM and keeps a 5 s
    # burst (RATEQUEUE_LEARN_WINDOW=0) drew 429s before slow start and the opening claim; a
    # context of 1500 tokens makes the one long prompt fail upstream; 10% of accepted calls get a 5xx.
    args = ["--rpm", "600", "--tpm", "400000", "--burst-seconds", "1", "--latency-ms", "30",
            "--context", "1500", "--fail-rate", "0.1", "--seed", "5"]
    with start_sim(args) as handle:
        yield handle


def _chat(n: int, words: int = 5) -> bytes:
    body = {"model": "gpt-4o-mini", "max_tokens": 20,
            "messages": [{"role": "user", "content": " ".join(["summarise"] * words) + f" {n}"}]}
    return orjson.dumps({"custom_id": f"c-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body})


@pytest.mark.timeout(90)
def test_dashboard_and_rules_against_a_real_prometheus(
    limited_redis: tuple[str, redis.Redis],
    sim: SimHandle,
    tmp_path: Path,
    start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    redis_url, mredis = limited_redis
    worker_port, exporter_port, prom_port = free_ports(3)
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_METRICS_PORT=str(worker_port),
                   RATEQUEUE_MODEL_GPT_4O_MINI_RPM="6000", RATEQUEUE_CHUNK_SIZE="10",
                   RATEQUEUE_PARK_COOLDOWN="300", RATEQUEUE_LEARN_WINDOW="0",
                   RATEQUEUE_DAILY_BUDGET_USD="100")  # the budget panel's figure (absent when unset)
    start_worker(env)
    exporter = subprocess.Popen(
        [sys.executable, "-m", "ratequeue.producer.exporter", "--port", str(exporter_port), "--host", "127.0.0.1"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    prom = Prometheus(project_config(worker_port, exporter_port, prom_port), tmp_path, prom_port)
    try:
        # Prometheus hands new targets to its scrapers about 5 s after start: wait for every one.
        wait_until(lambda: _targets_health(prom) == {"up"}, 30, "every target to be scraped", poll=0.2,
                   explain=lambda: [(t["scrapeUrl"], t["lastError"]) for t in prom.api("targets")["activeTargets"]])
        _run(prom, mredis, sim, env, time.time())
    finally:
        prom.stop()
        exporter.terminate()
        exporter.wait(10)


def _run(prom: Prometheus, mredis: redis.Redis, sim: SimHandle, env: dict[str, str], started: float) -> None:
    client = Client(load_settings(env), publish=None)
    source = Path(env["RATEQUEUE_DATA_DIR"]).parent / "in.jsonl"
    source.write_bytes(b"\n".join([_chat(n) for n in range(JOBS)] + [_chat(JOBS, words=2000)]) + b"\n")
    batch = client.wait(client.submit_batch(source).batch_id, timeout=45)
    assert batch["request_counts"] == {"total": JOBS + 1, "completed": JOBS, "failed": 1}

    # The provider says the quota is spent: the next job parks its (account, model) and waits.
    sim.configure(quota_usd=0.0)
    client.submit_job({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    wait_until(lambda: mredis.hlen(keys.parked_pairs()) == 1, 30, "the pair to be parked", poll=0.2)
    wait_until(lambda: prom.value("max(ratequeue_parked_pairs)") == 1, 30, "Prometheus to see the parked pair",
               poll=0.2)
    wait_until(lambda: _rules_health(prom) == {"ok"}, 30, "every rule to be evaluated", poll=0.2)
    # Scrapes of the final state: Prometheus has every call the simulator answered (not a fixed
    # sleep, which a busy machine's late scrape would outlast).
    def scraped_final_counts() -> bool:
        return bool(prom.value("sum(ratequeue_upstream_requests_total)") == sim.stats(timeline=False)["requests_total"])

    wait_until(scraped_final_counts, 30, "Prometheus to scrape the final counts", poll=0.2)

    # What Prometheus saw agrees with the simulator's own counts and the batch's.
    stats = sim.stats(timeline=False)
    assert prom.value("sum(ratequeue_upstream_requests_total)") == stats["requests_total"]
    # Rate-limit 429s: as many as the simulator sent (since slow start and the opening claim,
    # usually none here; tests/test_ops_scenario.py draws a storm of them on purpose).
    assert prom.value('sum(ratequeue_rate_limited_total{type=~"requests|tokens"})') == (
        stats["r429"].get("requests", 0) + stats["r429"].get("tokens", 0))
    assert prom.value('sum(ratequeue_rate_limited_total{type="quota"})') == stats["r429"]["insufficient_quota"] > 0
    faults = sum(n for kind, n in stats["faults"].items() if kind.isdigit())
    assert prom.value('sum(ratequeue_upstream_requests_total{status_class="5xx"})') == faults > 0
    assert prom.value('sum(ratequeue_tokens_total{kind="prompt"})') == stats["usage"]["prompt_tokens"]
    assert prom.value('sum(ratequeue_tokens_total{kind="completion"})') == stats["usage"]["completion_tokens"]
    assert prom.value("sum(ratequeue_cost_usd_total)") == pytest.approx(batch["cost_usd"], rel=1e-9)
    assert prom.value('sum(ratequeue_jobs_total{outcome="completed"})') == JOBS
    assert prom.value('sum(ratequeue_job_failures_total{code="context_length_exceeded"})') == 1
    assert prom.value('sum(ratequeue_retries_total{reason=~"rate_limit_.*"})') == (
        stats["r429"]["requests"] + stats["r429"]["tokens"])
    assert prom.value('max(ratequeue_limit_requests_per_minute{source="configured"})') == 6000
    assert prom.value('max(ratequeue_limit_requests_per_minute{source="learned"})') == 600
    assert prom.value('max(ratequeue_batches{status="completed"})') == 1
    assert prom.value('max(ratequeue_batches{status="in_progress"})') == 1
    assert prom.value("max(ratequeue_pending_jobs)") == 1
    assert prom.value("max(ratequeue_deferred_jobs)") == 1
    assert prom.value("max(ratequeue_workers_alive)") == 1
    assert prom.value('count(ratequeue_pair_parked_since_timestamp_seconds{reason="insufficient_quota"})') == 1
    assert prom.value("max(ratequeue_redis_memory_max_bytes)") == MAXMEMORY
    assert 0 < (prom.value("max(ratequeue_redis_memory_used_bytes)") or 0) < MAXMEMORY / 10
    assert prom.value("sum(ratequeue_outcomes_held)") == 0
    assert _targets_health(prom) == {"up"}

    # Every rule expression parses and evaluates; every dashboard query returns data.
    for expr in _rule_exprs():
        prom.api("query", query=expr)
    # The one failure's series is born with the last outcomes: a rate needs two of its samples at a
    # step of the range query, and the last step may fall up to 1 s before `end`: wait for three.
    wait_until(lambda: (prom.value("min(count_over_time(ratequeue_job_failures_total[15s]))") or 0) >= 3, 30,
               "three scrapes of the failure's series")
    end = time.time()
    empty = []
    data = dashboard()
    # Annotations, as instant queries: the parked pair may be newer than the last step of a range.
    annotations = [{"title": a["name"], "targets": [{**a["target"], "instant": True}]}
                   for a in data["annotations"]["list"] if "expr" in a]
    for panel in data["panels"] + annotations:
        for target in panel.get("targets", []):
            # A rate window of 15 s (Grafana's is 4 scrape intervals, at least 15 s by default):
            # a series born late in the run (the one failure) still has two samples in it when a
            # loaded machine's scrapes come late.
            expr = substitute(target["expr"], __rate_interval="15s")
            if target.get("instant"):
                result = prom.api("query", query=expr)["result"]
            else:
                result = prom.api("query_range", query=expr, start=str(started), end=str(end), step="1")["result"]
            # A worker is up: its own series, not the "(no workers)" 0 a worker-fed graph falls back to.
            result = [series for series in result if series["metric"].get("model") != "(no workers)"]
            if not result:
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    for variable in (v for v in data["templating"]["list"] if v["type"] == "query"):
        metric, label = variable["query"][len("label_values("):-1].split(", ")
        values = prom.api(f"label/{label}/values", **{"match[]": metric})
        assert values, variable["query"]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def _targets_health(prom: Prometheus) -> set[str]:
    targets = prom.api("targets")["activeTargets"]
    if {t["labels"]["job"] for t in targets} != {"ratequeue-worker", "ratequeue-exporter", "prometheus"}:
        return set()
    return {t["health"] for t in targets}


def _rules_health(prom: Prometheus) -> set[str]:
    groups = prom.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(_rule_exprs())
    return {rule["health"] for rule in rules}


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]
