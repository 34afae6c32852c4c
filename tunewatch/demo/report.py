"""The demo's report as one static HTML page (plotly inlined: it opens offline): the live
answers' exact match over the run with every decision marked, and the held-out exam before
and after. Every string from the store is escaped."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

HEADINGS = ("since start", "since the shift", "event", "subject", "reason")
ROLLING = 20  # answers per point of the live exact-match line
_e = html.escape


def _rolling(answers: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    judged = [a for a in answers if a["exact_match"] is not None]
    xs, ys = [], []
    for i in range(ROLLING, len(judged) + 1):
        window = judged[i - ROLLING : i]
        xs.append(window[-1]["at_s"])
        ys.append(sum(a["exact_match"] for a in window) / ROLLING)
    return xs, ys


def _row(milestone: dict[str, Any]) -> str:
    shift = milestone["since_shift_s"]
    cells = (
        f"{milestone['since_start_s']:.0f} s",
        "" if shift is None else f"{shift:+.0f} s",
        milestone["kind"],
        milestone["subject"] or "",
        milestone["reason"],
    )
    return "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in cells) + "</tr>"


def write_report(data: dict[str, Any], path: Path) -> Path:
    figure = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.75, 0.25],
        subplot_titles=(
            f"live answers: exact match of the last {ROLLING}",
            "held-out task B",
        ),
    )
    xs, ys = _rolling(data["answers"])
    figure.add_trace(go.Scatter(x=xs, y=ys, name="exact match", mode="lines"), row=1, col=1)
    for milestone in data["milestones"]:
        if milestone["kind"].startswith(("rollout.", "retrain.", "drift.verdict")):
            figure.add_vline(
                x=milestone["since_start_s"], line_dash="dot", line_width=1, row=1, col=1
            )
            figure.add_annotation(
                x=milestone["since_start_s"],
                y=1.02,
                text=_e(milestone["kind"]),
                textangle=-60,
                showarrow=False,
                font={"size": 9},
                row=1,
                col=1,
            )
    exams = [s for s in (data["before"], data["after"]) if s]
    for metric in ("exact_match", "chrf"):
        figure.add_trace(
            go.Bar(x=[s["adapter"] for s in exams], y=[s[metric] for s in exams], name=metric),
            row=1,
            col=2,
        )
    figure.update_xaxes(title_text="seconds since the demo started", row=1, col=1)
    figure.update_yaxes(range=[0, 1.1])
    rows = "".join(_row(m) for m in data["milestones"])
    after = data["after"]
    summary = (
        f"outcome: <b>{_e(data['outcome'])}</b>; held-out task B exact match "
        f"{data['before']['exact_match']:.0%} before"
        + (f", {after['exact_match']:.0%} after" if after else "")
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tunewatch demo</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 8px;vertical-align:top}}</style>
</head><body>
<h1>tunewatch demo</h1><p>{summary}</p>
{figure.to_html(full_html=False, include_plotlyjs=True)}
<h2>every decision, in order</h2>
<table><tr>{"".join(f"<th>{h}</th>" for h in HEADINGS)}</tr>
{rows}</table></body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
