"""The rollout report: what a rollout saw and what it decided, for the people who review it.

`tunewatch rollout report ID` shows it as a table in the terminal (rich) and writes a static
HTML page with plots (plotly) of quality, agreement, latency and errors over the rollout,
primary against candidate, every decision marked where it was taken and the stages shaded.

`build_report` is the only part that touches the store, and only reads it: the rollout row,
the exchanges of both sides between its start and its end (or now), their newest feedback,
and the rollout's events (subject `rollout-ID`, kinds `rollout.*`). It returns a
`RolloutReport` of plain values, with the quality pairs its guard judged (gathered by
rollout/evidence.py, as the rollout gathers them); rollout/report/table.py and html.py only
draw one. The sides:
- primary: the baseline adapter (the primary when the rollout started; the base model's
  exchanges are labelled "base"), routes primary and golden;
- candidate: the candidate adapter, routes shadow, canary and golden.
Per-exchange quality is the monitor's `answer_score` by the metric the rollout judged on
(chrF / 100, exact match or ROUGE-L; sentence-level), and exact match (the monitor's
normalisation), against the newest reference posted for the exchange. A shadow replay
gets no feedback of its own (users post it for the answer they saw), so it is judged
against its parent's reference: the paired comparison of the shadow stage. Agreement is the
sentence chrF / 100 of a shadow answer against the primary answer it mirrored. Latency and
errors are those of live traffic, as the guards judge them (shadow and canary answers
against the primary's; golden runs count for quality only); latency percentiles are of
answered exchanges (an error's latency is a timeout or a fast refusal; errors count in the
error rate). A figure with no data is None (a gap in a plot, "no data" in a table), never 0.
The HTML page opens offline: plotly.js is inlined (~4.6 MB, the price of no network).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import select

from monitor.quality import answer_score
from monitor.signals import mean, percentiles
from monitor.traffic import exchanges_by_id, exchanges_since
from monitor.window import AnswerMetric, ExchangeView
from rollout.evidence import Gathered, gather
from rollout.repository import RolloutRecord, UnknownRolloutError, load
from serving.exchange import BASE_LABEL
from store import Store
from store.base import utcnow
from store.events import Event

METRIC_LABELS = {"chrf": "chrF/100", "exact_match": "exact match", "rouge_l": "ROUGE-L"}
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
    quality: float | None  # mean score over them, by the rollout's metric
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
    metric: AnswerMetric  # the score of its quality, as its guard judged it

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
class PairedQuality:
    """The quality pairs the rollout's guard judged (rollout/evidence.py: the same gather),
    over the whole rollout: the same prompt answered by both sides."""

    n: int
    candidate: float | None  # mean score of each side; None: no pairs
    primary: float | None
    difference: float | None  # mean of candidate - primary, the guard's estimate
    test: str  # scipy's one-shot paired test: a figure, valid at one planned look


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
    paired: PairedQuality  # what the quality guard judged

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
    served: bool  # live traffic, as the guards judge it: not a golden run, not interrupted
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
        rollout = load(session, rollout_id)
        if rollout is None:
            raise UnknownRolloutError(rollout_id)
        summary = _summary(rollout)
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
    score = partial(answer_score, metric=summary.metric)
    gathered = gather(store, rollout, summary.metric, score, until=end)

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
        paired=_paired(gathered),
    )


def default_bucket_s(duration_s: float) -> float:
    """The smallest round bucket cutting `duration_s` into at most 60, and at least 10 s."""
    wanted = max(duration_s / _TARGET_BUCKETS, MIN_BUCKET_S)
    for nice in _NICE_BUCKETS_S:
        if nice >= wanted:
            return float(nice)
    return float(math.ceil(wanted / 86400) * 86400)  # whole days


def _summary(rollout: RolloutRecord) -> RolloutSummary:
    row, state = rollout.row, rollout.state
    return RolloutSummary(
        id=row.id,
        candidate=row.candidate,
        baseline=row.baseline,
        stage=state.stage,
        step=state.step,
        steps=rollout.config.steps,
        created_at=row.created_at,
        stage_started_at=state.stage_started_at,
        finished_at=row.finished_at,
        reason=row.reason,
        metric=rollout.metric or "chrf",  # a rollout that never looked: chrF, the default
    )


def _paired(gathered: Gathered) -> PairedQuality:
    figures = gathered.figures
    candidate, primary = figures["quality_candidate"], figures["quality_primary"]
    return PairedQuality(
        n=figures["quality_pairs"],
        candidate=candidate,
        primary=primary,
        difference=None if candidate is None else candidate - primary,
        test=figures["paired_test"]["reason"],
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
        [_score(e, None, summary.metric) for e in primary],
        [_score(e, parents.get(e.parent_id or ""), summary.metric) for e in candidate],
    )


def _score(exchange: ExchangeView, parent: ExchangeView | None, metric: AnswerMetric) -> _Scored:
    """Quality against the newest reference (a shadow's: its parent's); agreement with the
    primary answer a shadow mirrored."""
    shadow_of = parent if exchange.route == "shadow" else None
    reference = exchange.reference
    if reference is None and shadow_of is not None:
        reference = shadow_of.reference
    answered = exchange.ok and exchange.response is not None
    quality = exact = agreement = None
    if answered and reference is not None:
        quality = answer_score(exchange.response or "", reference, metric)
        exact = answer_score(exchange.response or "", reference, "exact_match") == 1.0
    if answered and shadow_of is not None and shadow_of.ok and shadow_of.response is not None:
        agreement = answer_score(exchange.response or "", shadow_of.response, "chrf")
    return _Scored(
        at=exchange.created_at,
        served=exchange.route in SERVED_ROUTES and not exchange.interrupted,
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


def _figures(scored: Sequence[_Scored]) -> SideFigures:
    served = [s for s in scored if s.served]
    latencies = [s.latency_s for s in served if s.answered and math.isfinite(s.latency_s)]
    p50, p95 = percentiles(latencies, (50, 95))
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
        mean_logprob=mean(logprobs),
        n_labelled=len(quality),
        quality=mean(quality),
        exact_match=mean(exact),
        n_agreement=len(agreement),
        agreement=mean(agreement),
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
        if (
            "to_stage" in data
            and before is not None
            and (before, data.get("step")) != (data["to_stage"], data.get("to_step"))
        ):
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
