"""What every tunewatch board shares: its variables and annotations, the panel kinds, PromQL idioms.

The boards are built with grafana-foundation-sdk; a board module only says which panels it
has. Every query goes to the `$datasource` variable's Prometheus, rates run over
`$__rate_interval` (Grafana sizes it to the scrape interval and the zoom), and every ratio is
`x / (y > 0)`, so a period without traffic is a gap ("no traffic") rather than NaN.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE_INTERVAL = "$__rate_interval"
ADAPTER = 'adapter=~"$adapter"'
# Grafana evaluates annotation queries every 60 s: a 2 m window sees each event at least once.
EVENT_RANGE = "2m"
TAGS = ["tunewatch"]
# Why a rollout's panels can be empty: its series appear with the first rollout.
AFTER_ROLLOUT = "a rollout has started: its series appear with the first one"


def rate(selector: str, window: str = RATE_INTERVAL) -> str:
    return f"rate({selector}[{window}])"


def increase(selector: str, window: str = RATE_INTERVAL) -> str:
    return f"increase({selector}[{window}])"


def ratio(numerator: str, denominator: str) -> str:
    """`numerator / denominator`, empty (not NaN) while the denominator is 0."""
    return f"{numerator} / ({denominator} > 0)"


def quantile(q: float, histogram: str, by: str = "") -> str:
    """The q-quantile of a histogram's rate over the interval, per `by` labels; a series with
    no observations in the interval (NaN) is dropped: a gap, not NaN."""
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram)})) >= 0"


def selector(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def requests(by: str, *matchers: str) -> str:
    """Requests per second the gateway answered for the chosen adapters, per `by` labels."""
    return f"sum by ({by}) ({rate(selector('tunewatch_requests_total', ADAPTER, *matchers))})"


def error_ratio(by: str) -> str:
    """The share of requests answered 5xx; 0 (not empty) while traffic flows without errors."""
    errors = requests(by, 'code=~"5.."')
    return ratio(f"({errors} or {requests(by)} * 0)", requests(by))


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel, and for one that only shows events, the event it waits for (why it can be empty)."""

    builder: Builder[model.Panel]
    only_after: str | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: Sequence[Panel]


@dataclass(frozen=True)
class Board:
    """A built dashboard, with its event-only panels by title."""

    name: str
    dashboard: model.Dashboard
    only_after: dict[str, str]


def _targets(queries: Sequence[Query], instant: bool, table_format: bool = False) -> list:
    targets = []
    for ref_id, query in zip("ABCDEFGH", queries, strict=False):
        target = (
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend or "__auto")
            .ref_id(ref_id)
            .datasource(DATASOURCE)
        )
        target = target.instant() if instant else target.range()
        if table_format:
            target = target.format(PromQueryFormat.TABLE)
        targets.append(target)
    return targets


def _mappings(values: dict[float, tuple[str, str]]) -> list[model.ValueMap]:
    """Value -> (text, colour), e.g. {0: ("no drift", "green"), 1: ("drift", "red")}."""
    options = {
        f"{value:g}": model.ValueMappingResult(text=text, color=colour, index=i)
        for i, (value, (text, colour)) in enumerate(values.items())
    }
    return [model.ValueMap(options=options)]


def _steps(steps: Sequence[tuple[float | None, str]]) -> dashboard_builders.ThresholdsConfig:
    """Colour thresholds, from the base (None) up."""
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=colour) for value, colour in steps])
    )


def _common(builder, title: str, description: str, unit: str, span: int, height: int):
    return (
        builder.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(height)
    )


def timeseries_panel(
    title: str,
    description: str,
    *queries: Query,
    unit: str = "short",
    bars: bool = False,
    only_after: str | None = None,
) -> Panel:
    """A time series; `bars` for counts of events per interval."""
    builder = _common(timeseries.Panel(), title, description, unit, 12, 8)
    builder = builder.targets(_targets(queries, instant=False)).legend(
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )
    if bars:
        builder = (
            builder.draw_style(common.GraphDrawStyle.BARS)
            .fill_opacity(80)
            .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        )
    return Panel(builder, only_after)


def stat_panel(
    title: str,
    description: str,
    *queries: Query,
    unit: str = "short",
    values: dict[float, tuple[str, str]] | None = None,
    steps: Sequence[tuple[float | None, str]] = ((None, "blue"),),
    names: bool = False,
    only_after: str | None = None,
) -> Panel:
    """The latest value of each series; `names` shows the legend instead (e.g. which adapter)."""
    builder = _common(stat.Panel(), title, description, unit, 6, 5)
    builder = (
        builder.targets(_targets(queries, instant=True))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.NAME if names else common.BigValueTextMode.AUTO)
        .thresholds(_steps(steps))
    )
    if values:
        builder = builder.mappings(_mappings(values))
    return Panel(builder, only_after)


def state_panel(
    title: str,
    description: str,
    *queries: Query,
    values: dict[float, tuple[str, str]],
    only_after: str | None = None,
) -> Panel:
    """A state timeline: one row per series, coloured by its mapped value."""
    builder = _common(statetimeline.Panel(), title, description, "short", 12, 8)
    builder = (
        builder.targets(_targets(queries, instant=False))
        .mappings(_mappings(values))
        .merge_values(True)
        .show_value(common.VisibilityMode.AUTO)
        .fill_opacity(80)
    )
    return Panel(builder, only_after)


def table_panel(title: str, description: str, *queries: Query) -> Panel:
    """The latest series as rows, their labels as columns."""
    builder = _common(table.Panel(), title, description, "short", 12, 8)
    return Panel(builder.targets(_targets(queries, instant=True, table_format=True)))


# Each annotation marks an event of the loop: (name, colour, counter selector, label shown).
_EVENTS = (
    ("Retrains", "blue", 'tunewatch_retrain_trigger_decisions_total{action="retrain"}', "action"),
    ("Promotions", "green", 'tunewatch_rollouts_total{outcome="promoted"}', "outcome"),
    ("Rollbacks", "red", 'tunewatch_rollouts_total{outcome="rolled_back"}', "outcome"),
)


def annotations() -> list[dashboard_builders.AnnotationQuery]:
    return [
        dashboard_builders.AnnotationQuery()
        .name(name)
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color(colour)
        .expr(f"sum by ({label}) ({increase(counter, EVENT_RANGE)}) > 0")
        for name, colour, counter, label in _EVENTS
    ]


def board(
    name: str, title: str, description: str, adapter_series: str, rows: Sequence[Row]
) -> Board:
    """A tunewatch board: `adapter` lists the adapters that `adapter_series` has seen."""
    builder = (
        dashboard_builders.Dashboard(title)
        .uid(f"tunewatch-{name}")
        .description(description)
        .tags(TAGS)
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-3h", "now")
        .refresh("30s")
        .link(
            dashboard_builders.DashboardLink("tunewatch")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
        )
        .with_variable(
            dashboard_builders.QueryVariable("adapter")
            .label("Adapter")
            .datasource(DATASOURCE)
            .query(f"label_values({adapter_series}, adapter)")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".+")
        )
        .annotations(annotations())
    )
    only_after = {}
    ids = itertools.count(1)
    for row in rows:
        builder = builder.with_row(dashboard_builders.Row(row.title).id(next(ids)))
        for panel in row.panels:
            builder = builder.with_panel(panel.builder.id(next(ids)))
            if panel.only_after:
                only_after[panel.builder.build().title] = panel.only_after
    return Board(name, builder.build(), only_after)
