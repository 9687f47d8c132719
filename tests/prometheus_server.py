"""What the monitoring tests share: a real Prometheus process (the Debian package's binary) and its
HTTP API, free ports to run it and its targets on, the project's rule file without its `for:` waits,
and the generated dashboard's queries with Grafana's variables filled in."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, wait_until

__all__ = ["DASHBOARD", "GRAFANA_VARS", "PROM", "Prometheus", "dashboard", "free_ports", "panel_exprs",
           "rule_expr", "rules_without_waits", "stall_code", "substitute"]

PROM = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "ratequeue.json"
# What Grafana puts in place of its variables: every account and model, a window that spans several
# 1 s scrapes.
GRAFANA_VARS = {"$__rate_interval": "5s", "$__range": "1m", "$account": ".*", "$model": ".*"}


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def rules_without_waits() -> str:
    """ops/prometheus/alerts.yml with every `for:` at 0 s: an alert fires at its first true evaluation
    (the waits' timing is promtool's job, alerts_test.yml)."""
    return re.sub(r"(?m)^(\s+)for: \d+m$", r"\1for: 0s", (PROM / "alerts.yml").read_text())


def rule_expr(alert: str) -> str:
    """The expression of the alert named `alert` in ops/prometheus/alerts.yml."""
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    [expr] = [rule["expr"] for group in groups for rule in group["rules"] if rule.get("alert") == alert]
    return str(expr)


def dashboard() -> dict[str, Any]:
    """The generated dashboard JSON (ops/grafana/dashboards/ratequeue.json)."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def substitute(expr: str, **values: str) -> str:
    """`expr` with Grafana's variables replaced: GRAFANA_VARS, overridden by `values` (keyed without
    the `$`, e.g. ``model="gpt-4o-mini"``, ``__rate_interval="5s"``)."""
    for var, value in {**GRAFANA_VARS, **{f"${k}": v for k, v in values.items()}}.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def panel_exprs(title: str, **values: str) -> list[str]:
    """The queries of the dashboard panel titled `title`, in refId order, variables substituted."""
    [panel] = [p for p in dashboard()["panels"] if p.get("title") == title]
    return [substitute(t["expr"], **values) for t in sorted(panel["targets"], key=lambda t: t["refId"])]


def stall_code(reason: str) -> float:
    """The number the "ETA per model" panel maps to the text "stalled (<reason>)"."""
    [panel] = [p for p in dashboard()["panels"] if p.get("title") == "ETA per model"]
    [codes] = [m["options"] for m in panel["fieldConfig"]["defaults"]["mappings"] if m["type"] == "value"]
    [code] = [value for value, shown in codes.items() if shown["text"] == f"stalled ({reason})"]
    return float(code)


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, port: int, rules: str | None = None, args: tuple[str, ...] = ()
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus missing: scripts/setup installs the Debian package prometheus")
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        (workdir / "alerts.yml").write_text(rules if rules is not None else (PROM / "alerts.yml").read_text())
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
        )
        wait_until(self.ready, 20, "Prometheus to be ready", poll=0.2)

    def ready(self) -> bool:
        assert self.process.poll() is None, "prometheus exited; see prometheus.log"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def over(self, expr: str, start: float, end: float, **labels: str) -> list[float]:
        """The values of `expr` from `start` to `end` (s since epoch), one a second, of the one series it
        returns with `labels` (never a worker-fed panel's "(no workers)" 0)."""
        result = self.api("query_range", query=expr, start=str(start), end=str(end), step="1")["result"]
        series = [s for s in result if s["metric"].get("model") != "(no workers)"
                  and labels.items() <= s["metric"].items()]
        assert len(series) == 1, (expr, labels, result)
        return [float(v) for _, v in series[0]["values"]]

    def panel_over_run(self, title: str, run: str, at: float, by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
        """What the dashboard panel's per-minute (or per-hour) rates add up to over `run` (e.g. "90s")
        before `at` (s since epoch): its query with increase() for rate(), summed by the labels `by`."""
        [rate] = panel_exprs(title, __rate_interval=run)
        over = re.sub(r" \* (60|3600)$", "", rate).replace("rate(", "increase(")
        assert over != rate and "rate(" not in over, rate
        seen: dict[tuple[str, ...], float] = {}
        for result in self.api("query", query=over, time=str(at))["result"]:
            key = tuple(result["metric"][label] for label in by)
            seen[key] = seen.get(key, 0.0) + float(result["value"][1])
        return seen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
