"""Panel builders (grafana-foundation-sdk): time series, stat and table panels on the `$datasource` variable.

Each panel shows one quantity (one unit on its axis); ids are handed out in build order by `next_id`."""

from __future__ import annotations

from collections.abc import Iterator

from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import ThresholdsConfig
from grafana_foundation_sdk.cog.builder import Builder
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
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from rq_dashboard.promql import or_zero

# The data source chosen in the dashboard's `datasource` variable: no uid is hard-coded, so the
# dashboard imports into any Grafana with a Prometheus data source.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

Panel = timeseries.Panel | stat.Panel | table.Panel
_ids: Iterator[int] = iter(range(1, 1000))


def reset_ids() -> None:
    global _ids
    _ids = iter(range(1, 1000))


def next_id() -> int:
    return next(_ids)


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    """One PromQL target."""
    target = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    return target.instant() if instant else target.range()


def _targets(exprs: list[tuple[str, str]], instant: bool = False) -> list[Builder[Dataquery]]:
    return [q(expr, legend, chr(ord("A") + i), instant) for i, (expr, legend) in enumerate(exprs)]


def graph(title: str, unit: str, exprs: list[tuple[str, str]], desc: str, w: int = 12, zero: bool = False,
          ratio: bool = False) -> timeseries.Panel:
    """A time series panel of (expr, legend) targets.

    zero: the first target reads 0 (legend "(no workers)") instead of "No data" when no worker is up.
    ratio: a 0-100% axis (values above 100% are drawn at the top edge)."""
    if zero:
        exprs = [(or_zero(exprs[0][0]), exprs[0][1]), *exprs[1:]]
    panel = (
        timeseries.Panel().id(next_id()).title(title).description(desc).unit(unit).datasource(DATASOURCE)
        .targets(_targets(exprs)).height(8).span(w).fill_opacity(10).line_width(1)
        .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM).calcs([]))
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
    )
    return panel.min(0).max(1) if ratio else panel


def single(title: str, unit: str, exprs: list[tuple[str, str]], desc: str, w: int = 4,
           red_above: float | None = None, orange_above: float | None = None,
           texts: dict[int, tuple[str, str]] | None = None, no_value: str | None = None) -> stat.Panel:
    """A stat panel (last value); orange at or above `orange_above`, red at or above `red_above`;
    `texts` maps values to (text, colour) shown in place of the number."""
    steps = [Threshold(color="green", value=None)]
    steps += [Threshold(color=c, value=v) for c, v in (("orange", orange_above), ("red", red_above)) if v is not None]
    panel = (
        stat.Panel().id(next_id()).title(title).description(desc).unit(unit).datasource(DATASOURCE)
        .targets(_targets(exprs)).height(5).span(w)
        .graph_mode(BigValueGraphMode.NONE if texts else BigValueGraphMode.AREA).color_mode(BigValueColorMode.VALUE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))
    )
    if texts:
        panel = panel.mappings([ValueMap(options={
            str(value): ValueMappingResult(text=text, color=colour, index=i)
            for i, (value, (text, colour)) in enumerate(sorted(texts.items()))
        })])
    return panel.no_value(no_value) if no_value else panel


def listing(title: str, unit: str, expr: str, desc: str, w: int = 12) -> table.Panel:
    """A table of an instant query's series (one row per label set, no time column)."""
    return (
        table.Panel().id(next_id()).title(title).description(desc).unit(unit).datasource(DATASOURCE)
        .with_target(q(expr, instant=True).format(PromQueryFormat.TABLE)).height(8).span(w).show_header(True)
        .with_transformation(DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True}}))
    )


class Section:
    """A titled row of panels (collected here, then laid out after its row by the dashboard builder)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.panels: list[Panel] = []

    def with_panel(self, panel: Panel) -> Section:
        self.panels.append(panel)
        return self
