"""Static checks of ops/: promtool on the configs and rules (and the rules' unit tests), the dashboard
JSON equal to its generator's output, and every metric the dashboard and the rules name really exists."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import REGISTRY, generate_latest

from ratequeue.config.models import load_model_table_from
from ratequeue.producer.exporter import RedisCollector
from ratequeue.worker import metrics
from ratequeue.worker.usage import Usage
from tests.conftest import METRICS_REDIS_URL, ROOT

OPS = ROOT / "ops"
PROM = OPS / "prometheus"
DASHBOARD = OPS / "grafana" / "dashboards" / "ratequeue.json"
PROMTOOL = shutil.which("promtool")


def _promtool(*args: str) -> str:
    if PROMTOOL is None:
        pytest.fail("promtool missing: scripts/setup installs the Debian package prometheus")
    done = subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-local.yml"])
@pytest.mark.e2e
def test_promtool_checks_the_configs(config: str) -> None:
    _promtool("check", "config", config)


@pytest.mark.e2e
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ratequeue_dashboard", OPS / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == load_generator().render(), (
        "ops/grafana/dashboards/ratequeue.json is stale: run .venv/bin/python ops/grafana/dashboard.py"
    )


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.fixture
def rclient() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(METRICS_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def known_series(client: redis.Redis) -> set[str]:
    """Every series name the worker and the exporter can expose, plus Prometheus's own ``up``."""
    metrics.record_response("m", "a", status=200, outcome="success", reason="ok", latency_s=1, charge=1,
                            usage=Usage(1, 1, 0), cost_usd=0.1, estimated_prompt_tokens=1,
                            limit_requests=1, limit_tokens=1)
    metrics.set_limits("m", "a", 1, 1)
    metrics.waited_for_capacity("m", "a", 0.1)
    metrics.job_finished("m", ok=False, code="x")
    names = {line.split("{")[0].split(" ")[0] for line in generate_latest(REGISTRY).decode().splitlines()
             if line and not line.startswith("#")}
    collector = RedisCollector(client, load_model_table_from(), 5.0)
    names |= {family.name for family in collector.collect()}
    return names | {"up"}


def test_dashboard_and_rules_use_only_metrics_that_exist(rclient: redis.Redis) -> None:
    known = known_series(rclient)
    used = set()
    for expr in dashboard_exprs() + rule_exprs():
        used |= set(re.findall(r"\b(ratequeue_[a-z0-9_]+)\b", expr))
    assert used, "no metric found in the expressions"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"
    variables = [v["query"] for v in dashboard()["templating"]["list"]]
    for query in variables:
        metric = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
        assert metric and metric.group(1) in known, query


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    panels = data["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(ids)
    source = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert not panel["panels"], "an expanded row keeps its panels at the top level"
            continue
        assert panel["title"] and panel["description"] and panel["datasource"]["uid"] == uid
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(refs)
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("limit", "utilisation", "429", "retries", "latency", "queue depth", "drain", "in-flight",
                  "bucket level", "cost per hour", "cost per batch", "parked", "failed", "redis memory",
                  "held"):
        assert topic in titles, topic


def test_every_alert_has_severity_and_summary() -> None:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    assert {"RatequeueRateLimited", "RatequeueLimitUnderused", "RatequeuePairParked", "RatequeueNoWorkerUp",
            "RatequeueJobFailureRate", "RatequeueBudgetNearlySpent", "RatequeueRedisMemoryNearlyFull",
            "RatequeueRedisMemoryFull", "RatequeueOutcomesHeld"} <= names
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    tested = (PROM / "alerts_test.yml").read_text()
    untested = [name for name in names if f"alertname: {name}\n" not in tested]
    assert not untested, f"alerts without a promtool unit test: {untested}"


def test_local_config_has_the_compose_jobs_with_local_targets() -> None:
    compose = yaml.safe_load((PROM / "prometheus.yml").read_text())
    local = yaml.safe_load((PROM / "prometheus-local.yml").read_text())
    assert compose["global"] == local["global"]
    assert compose["rule_files"] == local["rule_files"] == ["alerts.yml"]
    assert [j["job_name"] for j in compose["scrape_configs"]] == [j["job_name"] for j in local["scrape_configs"]]
    for job in local["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.startswith("127.0.0.1:"), target


def test_grafana_provisioning_reads_its_paths_from_the_environment() -> None:
    source = (OPS / "grafana/provisioning/datasources/prometheus.yml").read_text()
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/ratequeue.yml").read_text())
    assert "${RATEQUEUE_PROMETHEUS_URL}" in source
    assert provider["providers"][0]["options"]["path"] == "${RATEQUEUE_DASHBOARDS_DIR}"
    assert [p.name for p in DASHBOARD.parent.iterdir()] == ["ratequeue.json"]
    assert Path(provider["providers"][0]["type"]).name == "file"
