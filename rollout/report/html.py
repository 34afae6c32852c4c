"""The rollout report as one static HTML page: plots (plotly, inlined: it opens offline) of
quality, agreement, latency and errors over the rollout, primary against candidate, every
decision marked where it was taken and the stages shaded; every string from the store is
escaped with `html.escape`, in the page and in the plot's labels."""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rollout.report.build import (
    METRIC_LABELS,
    GuardVerdict,
    RecordedDecision,
    RolloutReport,
    stage_label,
)
from rollout.report.table import guard_summary, header_rows, side_rows

_PRIMARY_COLOUR = "#4c78a8"
_CANDIDATE_COLOUR = "#f58518"
_STAGE_COLOUR = {
    "shadow": "#9ecae9",
    "canary": "#f2cf5b",
    "paused": "#bab0ac",
    "promoted": "#88d27a",
    "rolled_back": "#ff9d98",
}
_DECISION_COLOUR = {"rollout.rolled_back": "#d62728", "rollout.promoted": "#2ca02c"}
_e = html.escape


def _x(at: datetime) -> str:
    """A time for plotly.js, which has no time zones: UTC wall-clock text."""
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def _wrap(text: str, width: int = 90) -> str:
    """Escaped, wrapped for a hover label (plotly reads <br> and HTML entities)."""
    return "<br>".join(_e(line) for line in textwrap.wrap(text, width) or [""])


def _plotted(metric: str) -> tuple[tuple[int, str, str, str, str], ...]:
    """(row, figure, line dash, hover label, the count behind it), per side; row 1: the
    timeline."""
    return (
        (2, "quality", "solid", metric, "n_labelled"),
        (2, "exact_match", "dot", "exact match", "n_labelled"),
        (3, "agreement", "solid", "agreement", "n_agreement"),
        (4, "latency_p95_s", "solid", "p95 s", "n_served"),
        (4, "latency_p50_s", "dash", "p50 s", "n_served"),
        (5, "error_rate", "solid", "error rate", "n_served"),
    )


def _plot_titles(metric: str) -> tuple[str, ...]:
    return (
        "",  # the timeline: stages, and a marker per decision (its details on hover)
        f"Quality against references: {metric} (solid), exact match (dotted)",
        "Agreement of the candidate's shadow answers with the primary's (chrF/100)",
        "Latency of live answers, seconds: p95 (solid), p50 (dashed)",
        "Error rate of live traffic",
    )


def _figure(report: RolloutReport) -> go.Figure:
    """A timeline of stages and decisions over four panels of both sides' figures; the stages
    shaded and a dotted line per decision across all of them. Times are UTC."""
    r = report.rollout
    metric = METRIC_LABELS[r.metric]
    fig = make_subplots(
        rows=5,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.045,
        row_heights=[0.05, 0.27, 0.2, 0.26, 0.22],
        subplot_titles=_plot_titles(metric),
    )
    mids = [_x(b.start + (b.end - b.start) / 2) for b in report.buckets]
    spans = [f"{_x(b.start)[:19]} - {_x(b.end)[11:19]}" for b in report.buckets]
    sides = (
        ("primary", f"primary {_e(r.baseline_label)}", _PRIMARY_COLOUR),
        ("candidate", f"candidate {_e(r.candidate)}", _CANDIDATE_COLOUR),
    )
    for side, name, colour in sides:
        figures = [getattr(b, side) for b in report.buckets]
        for row, attr, dash, what, count in _plotted(metric):
            if attr == "agreement" and side == "primary":
                continue
            counts = [getattr(f, count) for f in figures]
            trace = go.Scatter(
                x=mids,
                y=[getattr(f, attr) for f in figures],  # None: a gap
                name=name,
                legendgroup=side,
                showlegend=row == 2 and dash == "solid",
                mode="lines+markers",
                line={"color": colour, "dash": dash},
                marker={"size": 5},
                customdata=list(zip(spans, counts, strict=True)),
                hovertemplate=f"{name}<br>{what}: %{{y:.3f}}<br>%{{customdata[0]}}"
                "<br>n=%{customdata[1]}<extra></extra>",
            )
            fig.add_trace(trace, row=row, col=1)

    steps = len(r.steps)
    for span in report.stages:  # shaded across every panel, named on the timeline
        colour = _STAGE_COLOUR.get(span.stage, "#dddddd")
        label = _e(stage_label(span.stage, span.step, span.weight, steps))
        x0, x1 = _x(span.start), _x(span.end)
        band = {"type": "rect", "xref": "x", "x0": x0, "x1": x1, "y0": 0, "y1": 1}
        band |= {"fillcolor": colour, "line_width": 0, "layer": "below"}
        fig.add_shape(**band, yref="paper", opacity=0.15)  # across every panel
        fig.add_shape(**band, yref="y", opacity=0.7)  # on the timeline
        fig.add_annotation(
            x=x0,
            y=0.5,
            xref="x",
            yref="y",
            xanchor="left",
            xshift=8,
            showarrow=False,
            font={"size": 11},
            text=label,
        )
    for d in report.decisions:  # a dotted line each, named above the timeline
        colour = _DECISION_COLOUR.get(d.kind, "#333333")
        fig.add_shape(
            type="line",
            xref="x",
            yref="paper",
            x0=_x(d.at),
            x1=_x(d.at),
            y0=0,
            y1=1,
            line={"color": colour, "width": 1.5, "dash": "dot"},
        )
        fig.add_annotation(
            x=_x(d.at),
            y=1,
            xref="x",
            yref="paper",
            yanchor="bottom",
            xanchor="left",
            textangle=-25,
            showarrow=False,
            font={"size": 10, "color": colour},
            text=_e(d.action),
        )
    if report.decisions:
        fig.add_trace(
            go.Scatter(
                x=[_x(d.at) for d in report.decisions],
                y=[0.5] * len(report.decisions),
                mode="markers",
                name="decisions",
                showlegend=False,
                hovertext=[_decision_hover(d) for d in report.decisions],
                hoverinfo="text",
                hoverlabel={"align": "left"},
                marker={
                    "symbol": "diamond",
                    "size": 11,
                    "color": [_DECISION_COLOUR.get(d.kind, "#333333") for d in report.decisions],
                    "line": {"color": "white", "width": 1},
                },
            ),
            row=1,
            col=1,
        )
    fig.update_yaxes(range=[0, 1], visible=False, fixedrange=True, row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=2, col=1)
    fig.update_yaxes(range=[0, 1.05], row=3, col=1)
    fig.update_yaxes(rangemode="tozero", row=4, col=1)
    fig.update_yaxes(rangemode="tozero", tickformat=".0%", row=5, col=1)
    fig.update_xaxes(type="date")
    if report.end > report.start:
        fig.update_xaxes(range=[_x(report.start), _x(report.end)])
    fig.update_layout(
        height=1150,
        margin={"t": 70, "b": 60, "l": 60, "r": 20},
        hovermode="closest",
        template="plotly_white",
        legend={"orientation": "h", "y": -0.04, "yanchor": "top", "x": 0},
    )
    return fig


def _decision_hover(d: RecordedDecision) -> str:
    lines = [f"<b>{_e(d.kind)}</b> {_x(d.at)[:19]} UTC", _e(d.transition)]
    lines += [_e(guard_summary(g)) for g in d.guards]
    return "<br>".join(lines) + "<br>" + _wrap(d.reason)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
code { background: #f3f3f3; padding: 0 .25em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #2a7d2a; } .fail { color: #c62828; font-weight: bold; }
.inconclusive { color: #a66f00; }
.guards { white-space: nowrap; font-family: ui-monospace, monospace; font-size: .9em; }
.nodata { color: #777; font-style: italic; }
"""


def _table(
    headers: Sequence[str] | None, rows: Sequence[Sequence[str]], numeric_from: int | None = None
) -> str:
    """An HTML table; the cells are HTML already (escaped where they came from the store).
    Columns from `numeric_from` on are figures, aligned right."""

    def cell(i: int, c: str) -> str:
        numeric = numeric_from is not None and i >= numeric_from
        return f'<td class="num">{c}</td>' if numeric else f"<td>{c}</td>"

    head = "".join(f"<th>{h}</th>" for h in headers or ())
    body = "".join(
        "<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _guards_html(guards: Sequence[GuardVerdict]) -> str:
    lines = []
    for g in guards:
        rest = _e(guard_summary(g)[len(g.guard) + 1 + len(g.verdict) :])
        verdict = f'<span class="{_e(g.verdict)}">{_e(g.verdict)}</span>'
        lines.append(f'<span title="{_e(g.reason)}">{_e(g.guard)} {verdict}{rest}</span>')
    return f'<div class="guards">{"<br>".join(lines)}</div>' if lines else "-"


def render_html(report: RolloutReport, path: Path) -> Path:
    """Write the report as one self-contained HTML page (plotly.js inlined: opens offline)."""
    r = report.rollout
    fig = _figure(report)
    plot = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
    )
    title = f"Rollout {r.id}: {_e(r.candidate)} vs {_e(r.baseline_label)}"
    no_data = (
        ""
        if report.has_data
        else '<p class="nodata">no data: neither side has recorded an exchange yet</p>'
    )
    summary = _table(None, [(_e(k), _e(v)) for k, v in header_rows(report)])
    decisions = (
        _table(
            ("time (UTC)", "decision", "stage", "guards", "reason"),
            [
                (
                    _e(d.at.isoformat(timespec="seconds")),
                    _e(d.action),
                    _e(d.transition),
                    _guards_html(d.guards),
                    _e(d.reason),
                )
                for d in report.decisions
            ],
        )
        if report.decisions
        else '<p class="nodata">no decision recorded yet</p>'
    )
    figures = _table(
        ("figure", f"primary: {_e(r.baseline_label)}", f"candidate: {_e(r.candidate)}"),
        [
            (
                _e(name),
                *(
                    f'<span class="nodata">{v}</span>' if v.startswith("no data") else _e(v)
                    for v in (p, c)
                ),
            )
            for name, p, c in side_rows(report)
        ],
        numeric_from=1,
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{title} <small>({_e(r.stage_label)})</small></h1>
{no_data}
{plot}
<h2>Summary</h2>
{summary}
<h2>Decisions</h2>
{decisions}
<h2>Over the rollout</h2>
{figures}
<p class="nodata">generated {_e(report.generated_at.isoformat(timespec="seconds"))} by tunewatch
from the store; quality is {_e(METRIC_LABELS[r.metric])} (what the rollout judged) and exact
match against the newest reference (a shadow answer: its parent's); agreement is chrF/100
against the mirrored primary answer.</p>
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
