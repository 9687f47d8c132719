"""ratequeue's Grafana dashboard as code (grafana-foundation-sdk, Grafana's own builders).

    .venv/bin/python ops/grafana/dashboard.py          # rewrite ops/grafana/dashboards/ratequeue.json
    .venv/bin/python ops/grafana/dashboard.py --check  # exit 1 if the committed JSON is stale

Grafana loads the committed JSON (provisioned from ops/grafana/dashboards/); tests/test_ops_rules.py
checks that it equals what this script generates, and tests/test_ops_prometheus.py runs every query
in it against a real Prometheus scraping a real worker and exporter.

Gauges that the exporter publishes (queue depth, batches, parked pairs, bucket levels, live workers)
are read with ``max``: two exporters for availability publish the same values, never a sum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "ratequeue.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="ratequeue-prometheus")
PAIR = 'account=~"$account", model=~"$model"'
RI = "$__rate_interval"

_ids = iter(range(1, 1000))


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    """One PromQL target."""
    target = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    return target.instant() if instant else target.range()


def _targets(exprs: list[tuple[str, str]], instant: bool = False) -> list[Builder[Dataquery]]:
    return [q(expr, legend, chr(ord("A") + i), instant) for i, (expr, legend) in enumerate(exprs)]


def graph(title: str, unit: str, exprs: list[tuple[str, str]], desc: str, w: int = 12) -> timeseries.Panel:
    """A time series panel of (expr, legend) targets."""
    return (
        timeseries.Panel().id(next(_ids)).title(title).description(desc).unit(unit).datasource(DATASOURCE)
        .targets(_targets(exprs)).height(8).span(w).fill_opacity(10).line_width(1)
        .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM).calcs([]))
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
    )


def single(title: str, unit: str, exprs: list[tuple[str, str]], desc: str, w: int = 4,
           red_above: float | None = None, orange_above: float | None = None) -> stat.Panel:
    """A stat panel (last value); orange at or above `orange_above`, red at or above `red_above`."""
    steps = [Threshold(color="green", value=None)]
    steps += [Threshold(color=c, value=v) for c, v in (("orange", orange_above), ("red", red_above)) if v is not None]
    return (
        stat.Panel().id(next(_ids)).title(title).description(desc).unit(unit).datasource(DATASOURCE)
        .targets(_targets(exprs)).height(5).span(w)
        .graph_mode(BigValueGraphMode.AREA).color_mode(BigValueColorMode.VALUE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
    )


def listing(title: str, unit: str, expr: str, desc: str, w: int = 12) -> table.Panel:
    """A table of an instant query's series (one row per label set, no time column)."""
    return (
        table.Panel().id(next(_ids)).title(title).description(desc).unit(unit).datasource(DATASOURCE)
        .with_target(q(expr, instant=True).format(PromQueryFormat.TABLE)).height(8).span(w).show_header(True)
        .with_transformation(DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True}}))
    )


def limit(what: str) -> str:
    """The limit in force per (account, model): the server's (learned) where known, else configured."""
    metric = f"ratequeue_limit_{what}_per_minute"
    return (f'(max by (account, model) ({metric}{{source="learned", {PAIR}}})'
            f' or max by (account, model) ({metric}{{source="configured", {PAIR}}}))')


def bucket_share(what: str) -> str:
    """Bucket level over capacity per (account, model)."""
    return (f"max by (account, model) (ratequeue_bucket_level_{what}{{{PAIR}}}) / on (account, model) "
            f"max by (account, model) (ratequeue_bucket_capacity_{what}{{{PAIR}}})")


def quantiles(
    metric: str, labels: str, levels: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{{{labels}}}[{RI}])))", f"p{round(p * 100)}")
        for p in levels
    ]


class Section:
    """A titled row of panels (collected here, then laid out after its row by the dashboard builder)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.panels: list[timeseries.Panel | stat.Panel | table.Panel] = []

    def with_panel(self, panel: timeseries.Panel | stat.Panel | table.Panel) -> Section:
        self.panels.append(panel)
        return self


SENT = f"sum by (account, model) (rate(ratequeue_upstream_requests_total{{{PAIR}}}[{RI}])) * 60"
CHARGED = f"sum by (account, model) (rate(ratequeue_charged_tokens_total{{{PAIR}}}[{RI}])) * 60"


def limits_row() -> Section:
    return (
        Section("Limits: are we using what we pay for?")
        .with_panel(graph("Requests per minute vs RPM limit", "reqpm", [
            (SENT, "{{model}} {{account}} sent"),
            (f"max by (account, model, source) (ratequeue_limit_requests_per_minute{{{PAIR}}})",
             "{{model}} {{account}} limit ({{source}})"),
        ], "Upstream requests sent per minute against the limit: configured (model table) and learned "
           "(what the server announces in x-ratelimit-limit-requests)."))
        .with_panel(graph("Tokens per minute vs TPM limit", "short", [
            (CHARGED, "{{model}} {{account}} charged"),
            (f"sum by (account, model) (rate(ratequeue_tokens_total{{kind=~\"prompt|completion\", {PAIR}}}[{RI}]))"
             " * 60", "{{model}} {{account}} used"),
            (f"max by (account, model, source) (ratequeue_limit_tokens_per_minute{{{PAIR}}})",
             "{{model}} {{account}} limit ({{source}})"),
        ], "Charged: what the limit counts (prompt + max output, reserved at send). Used: prompt + "
           "completion tokens the server reported."))
        .with_panel(graph("Limit utilisation", "percentunit", [
            (f"{SENT} / on (account, model) {limit('requests')}", "{{model}} {{account}} requests"),
            (f"{CHARGED} / on (account, model) {limit('tokens')}", "{{model}} {{account}} tokens"),
        ], "Share of the limit in force (learned, else configured) used. The higher of the two is the "
           "binding limit; well below 100% while the queue is deep means workers are the bottleneck.", w=12))
        .with_panel(graph("Bucket level (share of capacity)", "percentunit", [
            (bucket_share("requests"), "{{model}} {{account}} requests"),
            (bucket_share("tokens"), "{{model}} {{account}} tokens"),
        ], "Level of the shared buckets (1 = full, idle; below 0 = reservations booked ahead)."))
    )


def errors_row() -> Section:
    return (
        Section("429s, retries, failures")
        .with_panel(graph("429 answers by type", "short", [
            (f"sum by (model, type) (rate(ratequeue_rate_limited_total{{{PAIR}}}[{RI}])) * 60", "{{model}} {{type}}"),
        ], "Per minute. requests/tokens: a limit was hit (should stay near 0); quota: "
           "insufficient_quota (the pair is parked); too_large: never fits the TPM.", w=8))
        .with_panel(graph("Retries by reason", "short", [
            (f"sum by (model, reason) (rate(ratequeue_retries_total{{{PAIR}}}[{RI}])) * 60", "{{model}} {{reason}}"),
        ], "Upstream attempts that will be retried, per minute.", w=8))
        .with_panel(graph("Failed jobs by code", "short", [
            (f"sum by (model, code) (rate(ratequeue_job_failures_total{{model=~\"$model\"}}[{RI}])) * 60",
             "{{model}} {{code}}"),
            (f"sum by (status_class) (rate(ratequeue_upstream_requests_total{{status_class=~\"5xx|none\", {PAIR}}}"
             f"[{RI}])) * 60", "upstream {{status_class}}"),
        ], "Jobs stored as errors per minute, by error code; and upstream 5xx / transport failures.", w=8))
    )


def latency_row() -> Section:
    return (
        Section("Latency and concurrency")
        .with_panel(graph("Upstream latency", "s", quantiles("ratequeue_upstream_latency_seconds", PAIR),
                          "Time from sending a request to its full answer.", w=8))
        .with_panel(graph("Wait for capacity", "s", quantiles("ratequeue_capacity_wait_seconds", PAIR),
                          "Time a request waited at the shared bucket before it was sent.", w=8))
        .with_panel(graph("In-flight requests", "short", [
            (f"sum by (model) (ratequeue_in_flight_requests{{{PAIR}}})", "{{model}}"),
        ], "Upstream calls sent and not yet answered, over all workers.", w=8))
    )


def queue_row() -> Section:
    return (
        Section("Queues: how deep, when will they drain?")
        .with_panel(graph("Queue depth", "short", [
            ("max by (queue) (ratequeue_queue_depth_messages)", "{{queue}} messages (chunks)"),
            ("max(ratequeue_unacked_messages)", "unacked messages"),
            ("max(ratequeue_pending_jobs)", "pending jobs"),
            ("max(ratequeue_deferred_jobs)", "deferred jobs"),
        ], "Chunks waiting for a worker slot, delivered and unacked; jobs of unfinished batches still to "
           "do; jobs deferred until capacity, a retry or a parked pair's probe."))
        .with_panel(graph("Jobs finished per minute", "short", [
            (f"sum by (outcome) (rate(ratequeue_jobs_total{{model=~\"$model\"}}[{RI}])) * 60", "{{outcome}}"),
        ], "Jobs whose outcome was stored.", w=6))
        .with_panel(single("Estimated drain time", "s", [
            ("max(ratequeue_pending_jobs) / sum(rate(ratequeue_jobs_total[5m]))", "drain"),
        ], "Pending jobs divided by the job completion rate of the last 5 minutes (∞: nothing finishing).",
            w=6))
        .with_panel(listing("Batches by status", "short", "max by (status) (ratequeue_batches)",
                            "Batches in Redis by status.", w=6))
        .with_panel(single("Workers alive", "short", [
            ("max(ratequeue_workers_alive)", "heartbeat"),
            ('sum(up{job="ratequeue-worker"})', "scraped"),
        ], "Workers with a recent heartbeat in Redis, and worker targets Prometheus scrapes.", w=3))
        .with_panel(single("Parked pairs", "short", [("max(ratequeue_parked_pairs)", "parked")],
                           "(account, model) pairs paused (quota spent, key refused, long Retry-After).",
                           w=3, red_above=1))
        .with_panel(single("Redis reachable", "short", [("max(ratequeue_redis_up)", "redis")],
                           "1 when the exporter could read Redis at its last scrape.", w=3))
        .with_panel(listing("Parked pairs (since)", "dateTimeAsIso",
                            "max by (account, model, reason) (ratequeue_pair_parked_since_timestamp_seconds) * 1000",
                            "Which pairs are parked, why, and since when. `ratequeue resume` unparks.", w=9))
    )


def cost_row() -> Section:
    return (
        Section("Cost and tokens")
        .with_panel(graph("Cost per hour", "currencyUSD", [
            (f"sum by (model) (rate(ratequeue_cost_usd_total{{{PAIR}}}[{RI}])) * 3600", "{{model}}"),
        ], "Spend rate in USD per hour, priced from the model table.", w=8))
        .with_panel(single("Spend, last 24 h", "currencyUSD", [
            (f"sum(increase(ratequeue_cost_usd_total{{{PAIR}}}[24h]))", "24h"),
        ], "USD over the last 24 hours (the budget alert compares this to ratequeue:daily_budget_usd).", w=4))
        .with_panel(listing("Cost per batch (newest 20)", "currencyUSD",
                            "max by (batch_id) (ratequeue_recent_batch_cost_usd)",
                            "Spend of each of the 20 newest batches; older ones: `ratequeue status BATCH_ID`.",
                            w=12))
        .with_panel(graph("Tokens per minute by kind", "short", [
            (f"sum by (kind) (rate(ratequeue_tokens_total{{{PAIR}}}[{RI}])) * 60", "{{kind}}"),
        ], "Prompt, completion and cached (prompt served from cache) tokens the server reported.", w=12))
        .with_panel(graph("Prompt token estimate error", "short",
                          quantiles("ratequeue_token_estimate_error_tokens", 'model=~"$model"', (0.05, 0.5, 0.95)),
                          "Our prompt token count minus the server's, per request (positive: over-reserved).",
                          w=12))
    )


def redis_row() -> Section:
    # Last, so that the panels above keep their ids (links with viewPanel=N point to them).
    used, limit = "max(ratequeue_redis_memory_used_bytes)", "max(ratequeue_redis_memory_max_bytes > 0)"
    return (
        Section("Redis: memory and held answers")
        .with_panel(graph("Redis memory used vs maxmemory", "bytes", [(used, "used"), (limit, "maxmemory")],
                          "At maxmemory (policy noeviction) Redis refuses every write: submits fail, workers hold "
                          "answers. No maxmemory line: none is set."))
        .with_panel(single("Redis memory (share of maxmemory)", "percentunit", [(f"{used} / {limit}", "used")],
                           "Alerts: 85% for 5 min (warning), 95% for 1 min (critical). Free memory with "
                           "`ratequeue delete` or RATEQUEUE_RETENTION_SECONDS, or raise maxmemory.",
                           w=6, red_above=0.95, orange_above=0.85))
        .with_panel(single("Paid answers held by workers", "short", [("sum(ratequeue_outcomes_held)", "held")],
                           "Answers paid for that workers keep in memory because Redis cannot take them (down, "
                           "loading or full); lost if a worker stops meanwhile.", w=6, red_above=1))
    )


def variable(name: str) -> QueryVariable:
    return (
        QueryVariable(name).label(name).datasource(DATASOURCE)
        .query(f"label_values(ratequeue_upstream_requests_total, {name})")
        .include_all(True).all_value(".*").multi(True).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )


def build() -> dict[str, object]:
    """The dashboard as the JSON object Grafana loads."""
    global _ids
    _ids = iter(range(1, 1000))
    dashboard = (
        Dashboard("ratequeue").uid("ratequeue").tags(["ratequeue"]).refresh("30s").time("now-3h", "now")
        .timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR).editable()
        .description("Limits used, 429s, queues and drain time, cost, parked pairs, failures, workers, Redis memory.")
        .with_variable(variable("account")).with_variable(variable("model"))
    )
    for section in (limits_row(), errors_row(), latency_row(), queue_row(), cost_row(), redis_row()):
        # An expanded row holds no panels itself: they follow it at the top level, laid out by the SDK.
        dashboard = dashboard.with_row(Row(section.title).id(next(_ids)))
        for panel in section.panels:
            dashboard = dashboard.with_panel(panel)
    result: dict[str, object] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
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
