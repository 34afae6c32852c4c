"""The rollout report in the terminal (rich): the summary, the decisions, both sides' figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

from rollout.report.build import METRIC_LABELS, GuardVerdict, RolloutReport, SideFigures
from serving.exchange import BASE_LABEL

_VERDICT_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "yellow"}


def _f(value: float | None, spec: str = ".3f", none: str = "no data") -> str:
    return none if value is None else format(value, spec)


def _s(value: float | None) -> str:
    """Seconds, as a person reads them."""
    if value is None:
        return "no data"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _clock(report: RolloutReport, at: datetime) -> str:
    if report.start.date() == report.end.date():
        return at.strftime("%H:%M:%S")
    return at.strftime("%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def guard_summary(g: GuardVerdict, *, digits: int = 3, counts: bool = True) -> str:
    """One guard in one line: "quality pass -0.010 [-0.050, +0.030] n=40/60"; latency's
    figures are ratios: "latency inconclusive 1.080x [0.900, 1.300]"."""
    figures = ""
    ratio = g.guard.startswith("latency")
    spec = f".{digits}f" if ratio else f"+.{digits}f"
    if g.estimate is not None:
        figures = f" {g.estimate:{spec}}" + ("x" if ratio else "")
        if g.lower is not None or g.upper is not None:
            figures += (
                f" [{_f(g.lower, spec, '0' if ratio else '-inf')}, {_f(g.upper, spec, 'inf')}]"
            )
    if counts and (g.n_candidate is not None or g.n_primary is not None):
        figures += f" n={g.n_candidate if g.n_candidate is not None else '?'}"
        figures += f"/{g.n_primary if g.n_primary is not None else '?'}"
    return f"{g.guard} {g.verdict}{figures}"


def _guards_text(guards: Sequence[GuardVerdict]) -> Text:
    text = Text()
    for i, g in enumerate(guards):
        if i:
            text.append("\n")
        line = guard_summary(g, digits=2, counts=False)
        text.append(line[: len(g.guard) + 1])
        text.append(g.verdict, style=_VERDICT_STYLE.get(g.verdict, ""))
        text.append(line[len(g.guard) + 1 + len(g.verdict) :], style="dim")
    return text


def _with_n(value: float | None, n: int, spec: str = ".3f") -> str:
    return "no data" if value is None else f"{value:{spec}} (n={n})"


def side_rows(report: RolloutReport) -> list[tuple[str, str, str]]:
    """(figure, primary, candidate) rows of the overall figures, "no data" where none."""
    p, c = report.primary, report.candidate
    quality = f"quality ({METRIC_LABELS[report.rollout.metric]})"
    rows: list[tuple[str, Callable[[SideFigures], str]]] = [
        ("exchanges", lambda s: f"{s.n} ({s.n_served} live)"),
        (quality, lambda s: _with_n(s.quality, s.n_labelled)),
        ("exact match", lambda s: _with_n(s.exact_match, s.n_labelled)),
        ("agreement with primary", lambda s: _with_n(s.agreement, s.n_agreement)),
        ("latency p50", lambda s: _s(s.latency_p50_s)),
        ("latency p95", lambda s: _s(s.latency_p95_s)),
        ("error rate", lambda s: _with_n(s.error_rate, s.n_served, ".1%")),
        ("mean token logprob", lambda s: _f(s.mean_logprob)),
    ]
    table = [(name, render(p), render(c)) for name, render in rows]
    table[3] = (table[3][0], "-", table[3][2])  # the primary is what agreement compares with
    return table


def header_rows(report: RolloutReport) -> list[tuple[str, str]]:
    r = report.rollout
    finished = r.finished_at.isoformat(timespec="seconds") if r.finished_at else "under way"
    steps = ", ".join(f"{w:.0%}" for w in r.steps) or "-"
    return [
        ("candidate", r.candidate),
        ("baseline", r.baseline or f"{BASE_LABEL} (the base model)"),
        ("stage", r.stage_label),
        ("steps", steps),
        ("started", r.created_at.isoformat(timespec="seconds")),
        ("finished", finished),
        ("duration", _duration((report.end - report.start).total_seconds())),
        ("reason", r.reason),
        ("buckets", f"{len(report.buckets)} of {report.bucket_s:g} s"),
        ("quality judged", _paired_text(report)),
    ]


def _paired_text(report: RolloutReport) -> str:
    """The pairs the quality guard judged, in one line."""
    p, metric = report.paired, METRIC_LABELS[report.rollout.metric]
    if p.candidate is None or p.primary is None or p.difference is None:
        return f"{metric} on the same prompts: no pairs yet"
    return (
        f"{metric} on the same {p.n} prompts: candidate {p.candidate:.3f} vs primary "
        f"{p.primary:.3f}, mean difference {p.difference:+.3f}; {p.test}"
    )


def render_table(report: RolloutReport) -> Group:
    """The report for the terminal: the summary, the decisions, the figures of both sides.
    Every string from the store goes in as `Text`, never parsed as rich markup."""
    r = report.rollout
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    for key, value in header_rows(report):
        header.add_row(key, Text(value))

    tz = "UTC" if report.start.date() == report.end.date() else "UTC, month-day"
    decisions = Table(title=f"Rollout {r.id}: decisions", title_justify="left", expand=True)
    decisions.add_column(f"time ({tz})", no_wrap=True)
    decisions.add_column("decision", no_wrap=True)
    decisions.add_column("stage", overflow="fold", ratio=2)
    decisions.add_column("guards", overflow="fold", ratio=4)
    decisions.add_column("reason", overflow="fold", ratio=4)
    for d in report.decisions:
        decisions.add_row(
            _clock(report, d.at),
            Text(d.action),
            Text(d.transition),
            _guards_text(d.guards),
            Text(d.reason),
        )
    if not report.decisions:
        decisions.add_row("-", "-", "-", "-", "no decision recorded yet")

    figures = Table(title="over the rollout", title_justify="left")
    figures.add_column("figure")
    figures.add_column(Text(f"primary: {r.baseline_label}"), justify="right")
    figures.add_column(Text(f"candidate: {r.candidate}"), justify="right")
    for name, primary, candidate in side_rows(report):
        figures.add_row(name, primary, candidate)
    title = Text(f"Rollout {r.id}: {r.candidate} vs {r.baseline_label}", style="bold")
    return Group(title, header, decisions, figures)
