"""Static checks of ops/: promtool on the configs and rules (and the rules' unit tests), the dashboard
JSON equal to its generator's output, every metric the dashboard and the rules name really exists, the
filters on every selector that can take them, and the dashboard's expressions evaluated by promtool."""

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
from ratequeue.worker.feedback import RateLimitHeaders
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
    metrics.start_pairs([("m", "a")])  # the Redis operations' series, created at worker start
    metrics.server_view("m", "a", RateLimitHeaders(remaining_requests=1, remaining_tokens=1,
                                                   reset_requests=1.0, reset_tokens=1.0))
    names = {line.split("{")[0].split(" ")[0] for line in generate_latest(REGISTRY).decode().splitlines()
             if line and not line.startswith("#")}
    collector = RedisCollector(client, load_model_table_from(), 5.0, daily_budget_usd=10.0)
    for family in collector.collect():  # a family with no sample yet (nothing pending) still counts
        names |= {family.name + ("_total" if family.type == "counter" else "")}
        names |= {sample.name for sample in family.samples}
    return names | {"up"}


def test_dashboard_and_rules_use_only_metrics_that_exist(rclient: redis.Redis) -> None:
    known = known_series(rclient)
    used = set()
    for expr in dashboard_exprs() + rule_exprs():
        used |= set(re.findall(r"\b(ratequeue_[a-z0-9_]+)\b", expr))
    assert used, "no metric found in the expressions"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"
    variables = [v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    for query in variables:
        metric = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
        assert metric and metric.group(1) in known, query


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    panels = data["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(ids)
    # Grafana 10.4's schema (the compose file's image), without the deprecated `style`; the data source is a
    # variable so the dashboard imports into any Grafana (no hard-coded uid anywhere).
    assert data["schemaVersion"] == 39 and "style" not in data
    assert re.search(r"grafana/grafana-oss:10\.4\.", (ROOT / "docker-compose.yml").read_text())
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    uid = "${datasource}"
    provisioned = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioned["datasources"][0]["uid"] not in DASHBOARD.read_text()
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
        assert "style" not in json.dumps(panel.get("fieldConfig", {})), panel["title"]
    assert all(v["datasource"]["uid"] == uid for v in variables.values() if v["type"] == "query")
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("limit", "utilisation", "429", "retries", "latency", "eta", "jobs waiting", "oldest waiting",
                  "job duration", "deferrals", "server vs our bucket", "in-flight", "busy slots", "redelivered",
                  "bucket level", "cost per hour", "budget", "cost per batch", "parked", "failed", "redis command",
                  "redis errors", "redis memory", "held", "estimate"):
        assert topic in titles, topic
    annotations = {a["name"]: a for a in data["annotations"]["list"]}
    for name in ("Parked pairs", "Worker starts (deploys)"):
        assert annotations[name]["useValueForTime"] and annotations[name]["datasource"]["uid"] == uid, name


def test_every_alert_has_severity_and_summary() -> None:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    assert {"RatequeueRateLimited", "RatequeueLimitUnderused", "RatequeuePairParked", "RatequeueNoWorkerUp",
            "RatequeueJobFailureRate", "RatequeueBudgetNearlySpent", "RatequeueRedisMemoryNearlyFull",
            "RatequeueRedisMemoryFull", "RatequeueOutcomesHeld", "RatequeueQueueStalled", "RatequeueQueueNotDraining",
            "RatequeueWorkerDown", "RatequeueQuotaExhausted", "RatequeueBudgetSpent", "RatequeueRedisErrors",
            "RatequeueChunksDeadLettered"} <= names
    # No budget constant in the rule file: the exporter publishes it (RATEQUEUE_DAILY_BUDGET_USD).
    assert "vector(" not in (PROM / "alerts.yml").read_text()
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
    assert local["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    for job in local["scrape_configs"]:
        if job["job_name"] == "ratequeue-worker":  # listed by the exporter, from the workers' heartbeats
            assert job["http_sd_configs"][0]["url"] == "http://127.0.0.1:9809/sd/workers"
            continue
        for target in job["static_configs"][0]["targets"]:
            assert target.startswith("127.0.0.1:"), target


def test_grafana_provisioning_reads_its_paths_from_the_environment() -> None:
    source = (OPS / "grafana/provisioning/datasources/prometheus.yml").read_text()
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/ratequeue.yml").read_text())
    assert "${RATEQUEUE_PROMETHEUS_URL}" in source
    assert provider["providers"][0]["options"]["path"] == "${RATEQUEUE_DASHBOARDS_DIR}"
    assert [p.name for p in DASHBOARD.parent.iterdir()] == ["ratequeue.json"]
    assert Path(provider["providers"][0]["type"]).name == "file"


# Metrics that carry `model` and `account` labels, and those that carry `model` only (worker/metrics.py,
# producer/exporter.py and the issue 12 metric contract): the dashboard's filters must reach each selector.
PAIR_METRICS = {
    "ratequeue_upstream_requests_total", "ratequeue_upstream_latency_seconds", "ratequeue_tokens_total",
    "ratequeue_charged_tokens_total", "ratequeue_accepted_requests_total", "ratequeue_cost_usd_total",
    "ratequeue_capacity_wait_seconds", "ratequeue_retries_total", "ratequeue_rate_limited_total",
    "ratequeue_deferrals_total", "ratequeue_in_flight_requests", "ratequeue_limit_requests_per_minute",
    "ratequeue_limit_tokens_per_minute", "ratequeue_job_duration_seconds", "ratequeue_server_remaining_requests",
    "ratequeue_server_remaining_tokens", "ratequeue_server_reset_requests_seconds",
    "ratequeue_server_reset_tokens_seconds", "ratequeue_bucket_level_requests", "ratequeue_bucket_level_tokens",
    "ratequeue_bucket_capacity_requests", "ratequeue_bucket_capacity_tokens", "ratequeue_bucket_pause_seconds",
    "ratequeue_pair_parked_since_timestamp_seconds",
}
MODEL_METRICS = {
    "ratequeue_jobs_total", "ratequeue_job_failures_total", "ratequeue_token_estimate_abs_error_tokens",
    "ratequeue_token_estimates_total", "ratequeue_stored_jobs_total", "ratequeue_stored_cost_usd_total",
    "ratequeue_stored_tokens_total", "ratequeue_pending_jobs", "ratequeue_deferred_jobs",
    "ratequeue_oldest_pending_job_age_seconds", "ratequeue_eta_seconds", "ratequeue_stalled",
}
# What Grafana puts in place of its variables.
GRAFANA_VARS = {"$__rate_interval": "5m", "$account": ".*", "$model": ".*"}


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric base name, label matchers) of each metric selector in `expr`."""
    found = []
    for name, matchers in re.findall(r"\b(ratequeue_[a-z0-9_]+)(\{[^}]*\})?", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        found.append((base if base in PAIR_METRICS | MODEL_METRICS else name, matchers))
    return found


def test_the_filters_reach_every_panel_that_can_be_filtered() -> None:
    """Each selector of a metric with a model (account) label takes $model ($account); a panel whose
    metrics have neither says it is deployment-wide; per-model series keep the model in their legend."""
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        filtered = False
        for target in panel["targets"]:
            for metric, matchers in _selectors(target["expr"]):
                if metric in PAIR_METRICS | MODEL_METRICS:
                    filtered = True
                    assert 'model=~"$model"' in matchers, (panel["title"], metric)
                    if metric in PAIR_METRICS:
                        assert 'account=~"$account"' in matchers, (panel["title"], metric)
                    if panel["type"] == "timeseries":
                        assert "{{model}}" in target.get("legendFormat", ""), (panel["title"], target["expr"])
        assert filtered or "deployment-wide" in panel["description"].lower(), panel["title"]
        for target in panel["targets"]:
            assert "sum by (le)" not in target["expr"], f"{panel['title']}: quantiles of all models under one legend"


def _substituted(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    data = dashboard()
    targets = [(p["title"], t) for p in data["panels"] for t in p.get("targets", [])]
    return targets + [(a["name"], a) for a in data["annotations"]["list"] if "expr" in a]


def _promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    (tmp_path / "none.yml").write_text("groups: []\n")
    (tmp_path / "test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["none.yml"], "evaluation_interval": "1m", "tests": tests}))
    assert "SUCCESS" in _promtool("test", "rules", str(tmp_path / "test.yml"))


@pytest.mark.e2e
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:expr_{i}", "expr": _substituted(target["expr"])}
             for i, (_title, target) in enumerate(_dashboard_targets())]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    _promtool("check", "rules", str(tmp_path / "dashboard_rules.yml"))


@pytest.mark.e2e
def test_worker_fed_panels_read_zero_without_workers(tmp_path: Path) -> None:
    """With no worker series at all (only the exporter's), each worker-fed graph shows one 0, not "No data"."""
    zero = [(title, target["expr"]) for title, target in _dashboard_targets() if "(no workers)" in target["expr"]]
    assert len(zero) >= 8, zero
    _promtool_test(tmp_path, [{
        "interval": "1m",
        "input_series": [{"series": 'ratequeue_workers_alive{instance="exporter"}', "values": "0x10"}],
        "promql_expr_test": [
            {"expr": _substituted(expr), "eval_time": "10m",
             "exp_samples": [{"labels": '{model="(no workers)"}', "value": 0}]}
            for _title, expr in zero
        ],
    }])


@pytest.mark.e2e
def test_the_eta_panel_says_stalled_and_why(tmp_path: Path) -> None:
    """gpt-4o proceeds (its ETA); gpt-4o-mini is stalled (no workers wins over parked); gpt-4.1 has no
    pending job (no series): the stat shows a number, "stalled (no_workers)", and nothing."""
    panel = next(p for p in dashboard()["panels"] if p["title"] == "ETA per model")
    expr = panel["targets"][0]["expr"]
    series = [
        ('ratequeue_eta_seconds{model="gpt-4o",instance="exporter"}', "120x10"),
        ('ratequeue_stalled{model="gpt-4o",reason="parked",instance="exporter"}', "0x10"),
        ('ratequeue_stalled{model="gpt-4o-mini",reason="parked",instance="exporter"}', "1x10"),
        ('ratequeue_stalled{model="gpt-4o-mini",reason="no_workers",instance="exporter"}', "1x10"),
        ('ratequeue_stalled{model="gpt-4o-mini",reason="paused",instance="exporter"}', "0x10"),
    ]
    _promtool_test(tmp_path, [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [{"expr": _substituted(expr), "eval_time": "5m", "exp_samples": [
            {"labels": '{model="gpt-4o"}', "value": 120},
            {"labels": '{model="gpt-4o-mini"}', "value": -3},
        ]}],
    }])
    mappings = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert mappings["-3"]["text"] == "stalled (no_workers)"
    assert {m["text"] for m in mappings.values()} == {f"stalled ({r})" for r in
                                                      ("parked", "paused", "no_workers", "redis_full")}


def test_readme_describes_every_panel_and_has_a_runbook_line_per_alert() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    panels = section.split("### The dashboard, panel by panel", 1)[1].split("\n### ", 1)[0]
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["title"] in panels, f"README does not say what panel {panel['title']!r} shows"
    runbook = section.split("### Alerts and what to do", 1)[1]
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"] if "alert" in rule):
        line = next((row for row in runbook.splitlines() if row.startswith(f"| {rule['alert']} |")), None)
        assert line, f"no runbook line for {rule['alert']}"
        assert f"| {rule['labels']['severity']} |" in line, line
