"""The rollout report: what a rollout saw and what it decided, for the people who review it.

`tunewatch rollout report ID` shows it as a table in the terminal (rich) and writes a static
HTML page with plots (plotly) of quality, agreement, latency and errors over the rollout,
primary against candidate, every decision marked where it was taken and the stages shaded.

`build_report` is the only part that touches the store, and only reads it: the rollout row,
the exchanges of both sides between its start and its end (or now), their newest feedback,
and the rollout's events (subject `rollout-ID`, kinds `rollout.*`). It returns a
`RolloutReport` of plain values; `render_table` and `render_html` only draw one. The sides:
- primary: the baseline adapter (the primary when the rollout started; the base model's
  exchanges are labelled "base"), routes primary and golden;
- candidate: the candidate adapter, routes shadow, canary and golden.
Per-exchange quality is the monitor's `answer_score`: sentence chrF / 100 (sacrebleu) and
exact match (the monitor's normalisation), against the newest reference posted for the
exchange. A shadow replay gets no feedback of its own (users post it for the
answer they saw), so it is judged against its parent's reference: the paired comparison of
the shadow stage. Agreement is the sentence chrF / 100 of a shadow answer against the
primary answer it mirrored. Latency and errors are those of live traffic, as the guards
judge them (shadow and canary answers against the primary's; golden runs count for quality
only); latency percentiles are of answered exchanges (an error's latency is a timeout or a
fast refusal; errors count in the error rate). A figure with no
data is None (a gap in a plot, "no data" in a table), never 0.

The HTML page opens offline: plotly.js is inlined (~4.6 MB, the price of no network), every
string from the store is escaped with `html.escape`, in the page and in the plot's labels.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from monitor.quality import answer_score
from monitor.traffic import exchanges_by_id, exchanges_since
from monitor.window import ExchangeView
from serving.exchange import BASE_LABEL
from store import Store
from store.base import utcnow
from store.events import Event
from store.rollouts import Rollout

PRIMARY_ROUTES = ("primary", "golden")
CANDIDATE_ROUTES = ("shadow", "canary", "golden")
# Latency and errors: the traffic served, as the rollout's guards judge it (golden runs are
# a scheduled exam, judged for quality only)
SERVED_ROUTES = ("primary", "shadow", "canary")
MIN_BUCKET_S = 10.0
MAX_BUCKETS = 5000  # an explicit bucket this small for a rollout this long is a mistake
# Bucket sizes a person reads at a glance; the default is the smallest giving <= 60 buckets
# (so >= 24 for rollouts longer than 10 minutes, fewer only at the 10 s minimum).
_NICE_BUCKETS_S = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
_TARGET_BUCKETS = 60
_STAGE_OF_KIND = {
    "rollout.paused": "paused",
    "rollout.promoted": "promoted",
    "rollout.rolled_back": "rolled_back",
}


class UnknownRolloutError(LookupError):
    """No rollout has this id."""

    def __init__(self, rollout_id: int) -> None:
        super().__init__(f"no rollout with id {rollout_id} in the store")
        self.rollout_id = rollout_id


# --- The report, as plain values ------------------------------------------------------------


@dataclass(frozen=True)
class SideFigures:
    """One side's exchanges over a span of time. None: nothing to compute it on."""

    n: int  # exchanges, golden runs included
    n_served: int  # live traffic: shadow and canary answers, the primary's primary answers
    errors: int  # of the served
    error_rate: float | None
    latency_p50_s: float | None  # of the served answered
    latency_p95_s: float | None
    mean_logprob: float | None  # mean over exchanges of their mean token logprob
    n_labelled: int  # answered exchanges with a reference
    quality: float | None  # mean sentence chrF / 100 over them
    exact_match: float | None  # share of them matching their reference
    n_agreement: int  # shadow answers compared with the primary answer they mirrored
    agreement: float | None  # mean sentence chrF / 100 of those pairs


@dataclass(frozen=True)
class Bucket:
    """A slice of the rollout's time, [start, end), with each side's figures in it."""

    start: datetime
    end: datetime
    primary: SideFigures
    candidate: SideFigures


@dataclass(frozen=True)
class GuardVerdict:
    """One guard's verdict at a decision, as the rollout recorded it."""

    guard: str
    verdict: str  # pass | fail | inconclusive
    estimate: float | None  # candidate - primary (latency: the ratio)
    lower: float | None
    upper: float | None
    n_candidate: int | None
    n_primary: int | None
    reason: str


@dataclass(frozen=True)
class RecordedDecision:
    """One rollout event: when, what, why, from where to where, and the guards' verdicts."""

    at: datetime
    kind: str  # rollout.started | rollout.advanced | rollout.paused | ...
    reason: str
    stage: str  # where the rollout is after it
    step: int
    weight: float | None  # the canary weight after it
    from_stage: str | None  # where it was before; None: not known (the start)
    from_step: int | None
    from_weight: float | None
    guards: tuple[GuardVerdict, ...]
    steps: int = 0  # how many canary steps the rollout has ("step 2/4")

    @property
    def action(self) -> str:
        """The kind in words: "advanced", "rolled back"."""
        return self.kind.removeprefix("rollout.").replace("_", " ")

    @property
    def transition(self) -> str:
        """E.g. "shadow -> canary 5% (1/4)"; only where it is when it did not move."""
        to = stage_label(self.stage, self.step, self.weight, self.steps)
        if self.from_stage is None:
            return to
        was = stage_label(self.from_stage, self.from_step, self.from_weight, self.steps)
        return to if was == to else f"{was} -> {to}"


@dataclass(frozen=True)
class StageSpan:
    """A stretch of the rollout spent in one stage (and canary step)."""

    stage: str
    step: int
    weight: float | None
    start: datetime
    end: datetime


@dataclass(frozen=True)
class RolloutSummary:
    id: int
    candidate: str
    baseline: str | None  # the primary adapter at the start; None: the base model
    stage: str  # shadow | canary | paused | promoted | rolled_back
    step: int  # index into steps while in canary; -1 before
    steps: tuple[float, ...]  # the canary weights, from the config
    created_at: datetime
    stage_started_at: datetime
    finished_at: datetime | None
    reason: str  # of the latest transition
    config: dict[str, Any] = field(repr=False)  # the settings it runs under, as stored

    @property
    def baseline_label(self) -> str:
        """The primary side's adapter label in the store ("base" for the base model)."""
        return self.baseline or BASE_LABEL

    @property
    def weight(self) -> float | None:
        """The canary weight now (kept while paused); None outside the canary steps."""
        return _weight(self.stage, self.step, self.steps)

    @property
    def stage_label(self) -> str:
        return stage_label(self.stage, self.step, self.weight, len(self.steps))


@dataclass(frozen=True)
class RolloutReport:
    rollout: RolloutSummary
    start: datetime  # the rollout's creation
    end: datetime  # its end, or when the report was built
    generated_at: datetime
    bucket_s: float
    buckets: tuple[Bucket, ...]  # consecutive, from start to end
    primary: SideFigures  # over the whole rollout
    candidate: SideFigures
    decisions: tuple[RecordedDecision, ...]  # oldest first
    stages: tuple[StageSpan, ...]  # consecutive, from start to end

    @property
    def has_data(self) -> bool:
        return self.primary.n + self.candidate.n > 0


def stage_label(stage: str, step: int | None, weight: float | None, steps: int = 0) -> str:
    """A stage in words: "shadow", "canary 25% (2/4)", "paused at 25%", "rolled back"."""
    if stage == "canary":
        share = f" {weight:.0%}" if weight is not None else ""
        position = f" ({step + 1}/{steps})" if steps and step is not None and step >= 0 else ""
        return f"canary{share}{position}"
    if stage == "paused":
        return f"paused at {weight:.0%}" if weight else "paused"
    return stage.replace("_", " ")


# --- Building it from the store -------------------------------------------------------------


@dataclass(frozen=True)
class _Scored:
    """One exchange, reduced to what the figures need."""

    at: datetime
    served: bool  # live traffic, not a golden run
    answered: bool
    latency_s: float
    mean_logprob: float | None
    quality: float | None
    exact_match: bool | None
    agreement: float | None


def build_report(
    store: Store, rollout_id: int, *, bucket_s: float | None = None, now: datetime | None = None
) -> RolloutReport:
    """The report of one rollout, read from the store.

    `bucket_s` None: a round size giving 20-60 buckets over the rollout, at least 10 s.
    `now`: the end of a rollout still under way (default: the clock). Raises
    UnknownRolloutError when no rollout has the id.
    """
    if bucket_s is not None and not (math.isfinite(bucket_s) and bucket_s > 0):
        raise ValueError(f"bucket_s must be a positive number of seconds, got {bucket_s!r}")
    generated_at = now or utcnow()
    with store.session() as session:
        row = session.get(Rollout, rollout_id)
        if row is None:
            raise UnknownRolloutError(rollout_id)
        summary = _summary(row)
        end = max(summary.finished_at or generated_at, summary.created_at)
        events = session.scalars(
            select(Event)
            .where(
                Event.subject == f"rollout-{rollout_id}",
                Event.kind.startswith("rollout.", autoescape=True),
            )
            .order_by(Event.created_at, Event.id)
        )
        decisions = _decisions(list(events), summary)
    primary, candidate = _read_sides(store, summary, end)

    start = summary.created_at
    duration_s = (end - start).total_seconds()
    size = float(bucket_s) if bucket_s is not None else default_bucket_s(duration_s)
    count = max(1, math.ceil(duration_s / size))
    if count > MAX_BUCKETS:
        raise ValueError(
            f"bucket_s={size:g} cuts this rollout ({duration_s:.0f} s) into {count} buckets, "
            f"more than {MAX_BUCKETS}: choose a larger bucket"
        )
    primary_in = _split(primary, start, size, count)
    candidate_in = _split(candidate, start, size, count)
    buckets = []
    for i in range(count):
        lo = start + timedelta(seconds=i * size)
        hi = end if i == count - 1 else start + timedelta(seconds=(i + 1) * size)
        buckets.append(Bucket(lo, hi, _figures(primary_in[i]), _figures(candidate_in[i])))
    return RolloutReport(
        rollout=summary,
        start=start,
        end=end,
        generated_at=generated_at,
        bucket_s=size,
        buckets=tuple(buckets),
        primary=_figures(primary),
        candidate=_figures(candidate),
        decisions=decisions,
        stages=_stages(decisions, summary, end),
    )


def default_bucket_s(duration_s: float) -> float:
    """The smallest round bucket cutting `duration_s` into at most 60, and at least 10 s."""
    wanted = max(duration_s / _TARGET_BUCKETS, MIN_BUCKET_S)
    for nice in _NICE_BUCKETS_S:
        if nice >= wanted:
            return float(nice)
    return float(math.ceil(wanted / 86400) * 86400)  # whole days


def _summary(row: Rollout) -> RolloutSummary:
    config = json.loads(json.dumps(row.config or {}))
    try:
        steps = tuple(float(w) for w in config.get("steps") or ())
    except (TypeError, ValueError):
        steps = ()
    return RolloutSummary(
        id=row.id,
        candidate=row.candidate,
        baseline=row.baseline,
        stage=row.stage,
        step=row.step,
        steps=steps,
        created_at=row.created_at,
        stage_started_at=row.stage_started_at,
        finished_at=row.finished_at,
        reason=row.reason,
        config=config,
    )


def _read_sides(
    store: Store, summary: RolloutSummary, end: datetime
) -> tuple[list[_Scored], list[_Scored]]:
    """Both sides' exchanges in [start, end], oldest first, each scored."""
    start = summary.created_at
    primary = exchanges_since(store, summary.baseline_label, start, PRIMARY_ROUTES, until=end)
    candidate = exchanges_since(store, summary.candidate, start, CANDIDATE_ROUTES, until=end)
    parents = {e.id: e for e in primary}
    wanted = {e.parent_id for e in candidate if e.route == "shadow" and e.parent_id}
    missing = wanted - parents.keys()  # mirrored just before the rollout began
    parents.update((e.id, e) for e in exchanges_by_id(store, missing))
    return (
        [_score(e, None) for e in primary],
        [_score(e, parents.get(e.parent_id or "")) for e in candidate],
    )


def _score(exchange: ExchangeView, parent: ExchangeView | None) -> _Scored:
    """Quality against the newest reference (a shadow's: its parent's); agreement with the
    primary answer a shadow mirrored."""
    shadow_of = parent if exchange.route == "shadow" else None
    reference = exchange.reference
    if reference is None and shadow_of is not None:
        reference = shadow_of.reference
    answered = exchange.ok and exchange.response is not None
    quality = exact = agreement = None
    if answered and reference is not None:
        quality = answer_score(exchange.response or "", reference, "chrf")
        exact = answer_score(exchange.response or "", reference, "exact_match") == 1.0
    if answered and shadow_of is not None and shadow_of.ok and shadow_of.response is not None:
        agreement = answer_score(exchange.response or "", shadow_of.response, "chrf")
    return _Scored(
        at=exchange.created_at,
        served=exchange.route in SERVED_ROUTES,
        answered=answered,
        latency_s=exchange.latency_seconds,
        mean_logprob=exchange.mean_logprob,
        quality=quality,
        exact_match=exact,
        agreement=agreement,
    )


def _split(scored: list[_Scored], start: datetime, size: float, count: int) -> list[list[_Scored]]:
    buckets: list[list[_Scored]] = [[] for _ in range(count)]
    for s in scored:
        i = int((s.at - start).total_seconds() // size)
        buckets[min(max(i, 0), count - 1)].append(s)  # the end itself goes to the last one
    return buckets


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _figures(scored: Sequence[_Scored]) -> SideFigures:
    served = [s for s in scored if s.served]
    latencies = [s.latency_s for s in served if s.answered and math.isfinite(s.latency_s)]
    p50, p95 = np.percentile(latencies, [50, 95]).tolist() if latencies else (None, None)
    logprobs = [s.mean_logprob for s in scored if s.mean_logprob is not None]
    quality = [s.quality for s in scored if s.quality is not None]
    exact = [float(s.exact_match) for s in scored if s.exact_match is not None]
    agreement = [s.agreement for s in scored if s.agreement is not None]
    errors = sum(not s.answered for s in served)
    return SideFigures(
        n=len(scored),
        n_served=len(served),
        errors=errors,
        error_rate=errors / len(served) if served else None,
        latency_p50_s=p50,
        latency_p95_s=p95,
        mean_logprob=_mean(logprobs),
        n_labelled=len(quality),
        quality=_mean(quality),
        exact_match=_mean(exact),
        n_agreement=len(agreement),
        agreement=_mean(agreement),
    )


def _weight(stage: str, step: int | None, steps: Sequence[float]) -> float | None:
    if stage in ("canary", "paused") and step is not None and 0 <= step < len(steps):
        return steps[step]
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _guards(raw: Any) -> tuple[GuardVerdict, ...]:
    """{name: {verdict, estimate, ...}} as the rollout records it (or a list with "guard")."""
    if isinstance(raw, dict):
        items = [(str(name), g) for name, g in raw.items()]
    elif isinstance(raw, list):
        items = [(str(g.get("guard", "?")), g) for g in raw if isinstance(g, dict)]
    else:
        return ()
    verdicts = []
    for name, g in items:
        g = g if isinstance(g, dict) else {"verdict": g}
        verdicts.append(
            GuardVerdict(
                guard=name,
                verdict=str(g.get("verdict", "?")),
                estimate=_number(g.get("estimate")),
                lower=_number(g.get("lower")),
                upper=_number(g.get("upper")),
                n_candidate=_count(g.get("n_candidate")),
                n_primary=_count(g.get("n_primary")),
                reason=str(g.get("reason", "")),
            )
        )
    return tuple(verdicts)


def _decisions(events: list[Event], summary: RolloutSummary) -> tuple[RecordedDecision, ...]:
    """The events as decisions, oldest first. Where the rollout is after one: "to_stage"
    (`decide_rollout`'s figures), else "stage" (what rollout/runner.py records), else what
    the kind says; where it was before: "stage" when it differs from "to_stage" (`decide_rollout`'s
    figures as they are), else where the previous decision left it."""
    steps = summary.steps
    decisions: list[RecordedDecision] = []
    previous: tuple[str, int, float | None] | None = None
    for event in events:
        data = event.data if isinstance(event.data, dict) else {}
        if "to_stage" in data:
            stage, step, weight = str(data["to_stage"]), data.get("to_step"), data.get("to_weight")
        else:
            stage = _STAGE_OF_KIND.get(event.kind) or str(
                data.get("stage") or (previous[0] if previous else "shadow")
            )
            step, weight = data.get("step"), data.get("weight")
        step = _count(step)
        if step is None:
            step = previous[1] if previous is not None else -1
        weight = _number(weight)
        if weight is None:
            weight = _weight(stage, step, steps)
        before = data.get("stage")
        if "to_stage" in data and before is not None and (before, data.get("step")) != (
            data["to_stage"], data.get("to_step")
        ):  # fmt: skip
            from_stage, from_step = str(before), _count(data.get("step"))
            from_weight = _number(data.get("weight"))
            if from_weight is None:
                from_weight = _weight(from_stage, from_step, steps)
        elif previous is not None:
            from_stage, from_step, from_weight = previous
        else:
            from_stage, from_step, from_weight = None, None, None
        decisions.append(
            RecordedDecision(
                at=event.created_at,
                kind=event.kind,
                reason=event.reason,
                stage=stage,
                step=step,
                weight=weight,
                from_stage=from_stage,
                from_step=from_step,
                from_weight=from_weight,
                guards=_guards(data.get("guards")),
                steps=len(steps),
            )
        )
        previous = (stage, step, weight)
    return tuple(decisions)


def _same_stage(stage: str, step: int, other_stage: str, other_step: int) -> bool:
    """The step counts only where it names a canary weight."""
    if stage != other_stage:
        return False
    return stage not in ("canary", "paused") or step == other_step


def _stages(
    decisions: Sequence[RecordedDecision], summary: RolloutSummary, end: datetime
) -> tuple[StageSpan, ...]:
    """Consecutive stretches of one stage, from the decisions; the rollout row has the last
    word (a stage entered without an event starts at its `stage_started_at`)."""
    first = decisions[0] if decisions else None
    if first is not None and first.from_stage is not None:
        stage, step, weight = first.from_stage, first.from_step, first.from_weight
        step = -1 if step is None else step
    else:
        stage, step, weight = "shadow", -1, None
    spans: list[StageSpan] = []
    since = summary.created_at

    def move(at: datetime, to: tuple[str, int, float | None]) -> None:
        nonlocal stage, step, weight, since
        at = min(max(at, since), end)
        if _same_stage(to[0], to[1], stage, step):
            return
        if at > since:
            spans.append(StageSpan(stage, step, weight, since, at))
        stage, step, weight = to
        since = at

    for d in decisions:
        move(d.at, (d.stage, d.step, d.weight))
    move(summary.stage_started_at, (summary.stage, summary.step, summary.weight))
    spans.append(StageSpan(stage, step, weight, since, end))
    return tuple(spans)


# --- The terminal table ---------------------------------------------------------------------

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


def _side_rows(report: RolloutReport) -> list[tuple[str, str, str]]:
    """(figure, primary, candidate) rows of the overall figures, "no data" where none."""
    p, c = report.primary, report.candidate
    rows: list[tuple[str, Callable[[SideFigures], str]]] = [
        ("exchanges", lambda s: f"{s.n} ({s.n_served} live)"),
        ("quality (chrF/100)", lambda s: _with_n(s.quality, s.n_labelled)),
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


def _header_rows(report: RolloutReport) -> list[tuple[str, str]]:
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
    ]


def render_table(report: RolloutReport) -> Group:
    """The report for the terminal: the summary, the decisions, the figures of both sides.
    Every string from the store goes in as `Text`, never parsed as rich markup."""
    r = report.rollout
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    for key, value in _header_rows(report):
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
    for name, primary, candidate in _side_rows(report):
        figures.add_row(name, primary, candidate)
    title = Text(f"Rollout {r.id}: {r.candidate} vs {r.baseline_label}", style="bold")
    return Group(title, header, decisions, figures)


# --- The HTML page --------------------------------------------------------------------------

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


# (row, figure, line dash, hover label, the count behind it), per side; row 1 is the timeline
_PLOTTED = (
    (2, "quality", "solid", "chrF/100", "n_labelled"),
    (2, "exact_match", "dot", "exact match", "n_labelled"),
    (3, "agreement", "solid", "agreement", "n_agreement"),
    (4, "latency_p95_s", "solid", "p95 s", "n_served"),
    (4, "latency_p50_s", "dash", "p50 s", "n_served"),
    (5, "error_rate", "solid", "error rate", "n_served"),
)
_PLOT_TITLES = (
    "",  # the timeline: stages, and a marker per decision (its details on hover)
    "Quality against references: chrF/100 (solid), exact match (dotted)",
    "Agreement of the candidate's shadow answers with the primary's (chrF/100)",
    "Latency of live answers, seconds: p95 (solid), p50 (dashed)",
    "Error rate of live traffic",
)


def _figure(report: RolloutReport) -> go.Figure:
    """A timeline of stages and decisions over four panels of both sides' figures; the stages
    shaded and a dotted line per decision across all of them. Times are UTC."""
    r = report.rollout
    fig = make_subplots(
        rows=5,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.045,
        row_heights=[0.05, 0.27, 0.2, 0.26, 0.22],
        subplot_titles=_PLOT_TITLES,
    )
    mids = [_x(b.start + (b.end - b.start) / 2) for b in report.buckets]
    spans = [f"{_x(b.start)[:19]} - {_x(b.end)[11:19]}" for b in report.buckets]
    sides = (
        ("primary", f"primary {_e(r.baseline_label)}", _PRIMARY_COLOUR),
        ("candidate", f"candidate {_e(r.candidate)}", _CANDIDATE_COLOUR),
    )
    for side, name, colour in sides:
        figures = [getattr(b, side) for b in report.buckets]
        for row, attr, dash, what, count in _PLOTTED:
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
        fig.add_shape(type="rect", xref="x", yref="paper", x0=x0, x1=x1, y0=0, y1=1,
                      fillcolor=colour, opacity=0.15, line_width=0, layer="below")  # fmt: skip
        fig.add_shape(type="rect", xref="x", yref="y", x0=x0, x1=x1, y0=0, y1=1,
                      fillcolor=colour, opacity=0.7, line_width=0, layer="below")  # fmt: skip
        fig.add_annotation(x=x0, y=0.5, xref="x", yref="y", xanchor="left", xshift=8,
                           showarrow=False, font={"size": 11},
                           text=label)  # fmt: skip
    for d in report.decisions:  # a dotted line each, named above the timeline
        colour = _DECISION_COLOUR.get(d.kind, "#333333")
        fig.add_shape(type="line", xref="x", yref="paper", x0=_x(d.at), x1=_x(d.at), y0=0, y1=1,
                      line={"color": colour, "width": 1.5, "dash": "dot"})  # fmt: skip
        fig.add_annotation(x=_x(d.at), y=1, xref="x", yref="paper", yanchor="bottom",
                           xanchor="left", textangle=-25, showarrow=False,
                           font={"size": 10, "color": colour}, text=_e(d.action))  # fmt: skip
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
    summary = _table(None, [(_e(k), _e(v)) for k, v in _header_rows(report)])
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
            for name, p, c in _side_rows(report)
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
from the store; quality is sentence chrF/100 and exact match against the newest reference
(a shadow answer: its parent's); agreement is chrF/100 against the mirrored primary answer.</p>
</body>
</html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
