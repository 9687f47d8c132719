"""ratequeue's Grafana dashboard as code (grafana-foundation-sdk, Grafana's own builders).

    .venv/bin/python ops/grafana/dashboard.py          # rewrite ops/grafana/dashboards/ratequeue.json
    .venv/bin/python ops/grafana/dashboard.py --check  # exit 1 if the committed JSON is stale

Grafana loads the committed JSON (provisioned from ops/grafana/dashboards/); tests/test_ops_rules.py
checks that it equals what this script generates, and tests/test_ops_prometheus.py runs every query
in it against a real Prometheus scraping a real worker and exporter. The rows live in rq_dashboard/.

The data source is the `datasource` variable (no uid in the JSON); `account` and `model` filter every
panel whose metric carries those labels. Schema: Grafana 10.4's (schemaVersion 39), which docker-compose.yml runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, VariableRefresh
from rq_dashboard.panels import DATASOURCE, next_id, reset_ids
from rq_dashboard.promql import PAIR
from rq_dashboard.rows_cost import cost_row
from rq_dashboard.rows_limits import errors_row, limits_row
from rq_dashboard.rows_queue import queue_row
from rq_dashboard.rows_workers import redis_row, workers_row

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "ratequeue.json"
SCHEMA_VERSION = 39  # Grafana 10.4 (the SDK writes 36 and the deprecated `style`: both replaced below)
_SOURCE = {"type": "prometheus", "uid": "${datasource}"}


def variable(name: str) -> QueryVariable:
    return (
        QueryVariable(name).label(name).datasource(DATASOURCE)
        .query(f"label_values(ratequeue_upstream_requests_total, {name})")
        .include_all(True).all_value(".*").multi(True).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )


def _annotation(name: str, colour: str, expr: str, title: str, text: str, tags: str) -> dict[str, Any]:
    """A Prometheus annotation at the time a series' value names (seconds since epoch, times 1000)."""
    return {"datasource": _SOURCE, "enable": True, "hide": False, "iconColor": colour, "name": name,
            "expr": expr, "step": "60s", "useValueForTime": True, "titleFormat": title, "textFormat": text,
            "tagKeys": tags, "target": {"expr": expr, "refId": "Anno", "interval": "60s"}}


def annotations() -> list[dict[str, Any]]:
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
               "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}
    parked = _annotation(
        "Parked pairs", "red",
        f"max by (account, model, reason) (ratequeue_pair_parked_since_timestamp_seconds{{{PAIR}}}) * 1000",
        "parked: {{model}} ({{account}})", "{{reason}}", "model,account,reason")
    deploys = _annotation(
        "Worker starts (deploys)", "blue",
        'max by (instance) (process_start_time_seconds{job="ratequeue-worker"}) * 1000',
        "worker started: {{instance}}", "", "instance")
    return [builtin, parked, deploys]


def build() -> dict[str, Any]:
    """The dashboard as the JSON object Grafana loads."""
    reset_ids()
    dashboard = (
        Dashboard("ratequeue").uid("ratequeue").tags(["ratequeue"]).refresh("30s").time("now-3h", "now")
        .timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR).editable()
        .description("Limits used, refused requests, ETA per model, queues, job durations, cost against the "
                     "budget, parked pairs, workers, Redis.")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(variable("account")).with_variable(variable("model"))
    )
    for section in (limits_row(), errors_row(), queue_row(), workers_row(), cost_row(), redis_row()):
        # An expanded row holds no panels itself: they follow it at the top level, laid out by the SDK.
        dashboard = dashboard.with_row(Row(section.title).id(next_id()))
        for panel in section.panels:
            dashboard = dashboard.with_panel(panel)
    result: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    result["schemaVersion"] = SCHEMA_VERSION
    result.pop("style", None)
    result["annotations"] = {"list": annotations()}
    return result


def render() -> str:
    """The dashboard JSON text, as committed (sorted keys, 2-space indent, final newline)."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
