"""The retraining trigger: when the evidence and the gates say so, decide to retrain.

`decide_retrain(config, state, observation) -> TriggerDecision` is pure: no store, no clock,
no I/O. The caller (the scheduler's trigger job) reads the monitor's latest figures into an
`Observation`, calls `decide_retrain`, records the decision as an event with its `reason` and
`figures` (the audit trail: every evaluation, fired or not), persists `decision.state`
(`to_dict`, JSON) and acts on `decision.action`. Persisting the state is what makes the
cooldown, the daily budget and the counters survive a restart.

The rules, in the order they are applied on each check:

Signals. Two signals can call for a retrain; each is judged only on a check that carries
its figure.
- Drift, with hysteresis on the monitor's drift share: the alarm enters when the share is
  >= `enter_share` and leaves only when it is <= `exit_share`; in between it keeps its
  state, so a share wobbling between the two thresholds does not flap. The monitor's own
  verdict (judged at its fixed threshold) is kept in the figures; the policy judges the
  share. `drift_streak` counts the consecutive checks the alarm has held.
- Quality (optional, `quality_drop` set): the relative drop of a quality figure (chrF,
  exact match, ...) below its baseline (the serving adapter's own score); the signal holds
  while the drop is >= `quality_drop`. `quality_streak` counts consecutive checks.
A check without a figure (the monitor refused to judge drift: too few exchanges, a failed
check; no quality figure in this window) leaves that signal exactly as it was: it neither
counts as one more drifting check nor clears the alarm, because it carries no evidence
either way. Such a check cannot fire on that signal either: a retrain needs this check's
evidence.

Firing. A retrain is decided when a signal judged on this check has held for
`consecutive_checks` checks AND there are >= `min_new_labelled` new labelled examples AND
the cooldown since the last retrain has passed AND no rollout is in progress AND no
retrain job is queued or running AND the daily budget (counted per UTC day) is not spent.

Storms. Firing spends the evidence: both streaks go back to 0 (the drift alarm stays
entered). Another retrain needs `consecutive_checks` fresh checks of a held signal AND
the cooldown passed (and the budget), so a drift storm within the cooldown yields exactly
one retrain. A storm that outlasts the cooldown (the retrain failed, or its candidate was
rolled back, and the drift is still there) earns one more, within the daily budget:
waiting for the drift to clear first would leave a failed retrain unrepaired for as long
as the drift lasts.

Cancelling. A retrain decided here stays pending until the caller reports its job running
(started: too late to cancel) or gone (finished or removed between two checks). If, while
it is still queued, the alarm clears (the drift share falls to <= `exit_share` and no
quality drop holds), the decision is `cancel_pending`. A cancelled retrain never ran: it
gives back its cooldown and its place in the daily budget. Jobs this policy did not queue
(a retrain started by hand) are never cancelled by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

Action = Literal["none", "retrain", "cancel_pending"]
PendingJob = Literal["none", "queued", "running"]
Signal = Literal["drift", "quality"]


def _aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment!r}")


@dataclass(frozen=True)
class TriggerConfig:
    """The thresholds and gates of the trigger."""

    consecutive_checks: int = 3  # K: checks a signal must hold before a retrain
    min_new_labelled: int = 200  # M: new labelled examples since the last retrain
    cooldown: timedelta = timedelta(hours=6)  # since the last retrain decided
    daily_budget: int = 2  # retrains per UTC day
    enter_share: float = 0.5  # drift alarm enters at a drift share >= this
    exit_share: float = 0.3  # ... and leaves only at a drift share <= this
    quality_drop: float | None = None  # relative drop below baseline that holds; None: off
    quality_metric: str = "quality"  # the quality figure's name, for the reasons

    def __post_init__(self) -> None:
        if self.consecutive_checks < 1:
            raise ValueError("consecutive_checks must be at least 1")
        if self.min_new_labelled < 0:
            raise ValueError("min_new_labelled must not be negative")
        if self.cooldown < timedelta(0):
            raise ValueError("cooldown must not be negative")
        if self.daily_budget < 0:
            raise ValueError("daily_budget must not be negative")
        if not 0.0 <= self.exit_share <= self.enter_share <= 1.0:
            raise ValueError("need 0 <= exit_share <= enter_share <= 1")
        if self.quality_drop is not None and not 0.0 < self.quality_drop <= 1.0:
            raise ValueError("quality_drop must lie in (0, 1]")


@dataclass(frozen=True)
class Observation:
    """What one evaluation sees: the monitor's figures, the data, the rollout and the jobs."""

    now: datetime  # timezone-aware; the policy never reads a clock
    drift_share: float | None  # share of drifted columns; None: the monitor refused to judge
    drift_detected: bool | None = None  # the monitor's own verdict, kept for the audit trail
    refusal: str | None = None  # why the monitor refused to judge, in its words
    quality: float | None = None  # the quality figure on this window; None: not measured
    quality_baseline: float | None = None  # the serving adapter's score on the same figure
    new_labelled: int = 0  # labelled since the last retrain (the trigger counts to M only)
    rollout_in_progress: bool = False
    retrain_job: PendingJob = "none"  # the retrain job the store holds, if any

    def __post_init__(self) -> None:
        _aware(self.now, "now")
        if self.drift_share is not None and not 0.0 <= self.drift_share <= 1.0:
            raise ValueError(f"drift_share must lie in [0, 1], got {self.drift_share}")
        if self.new_labelled < 0:
            raise ValueError("new_labelled must not be negative")


@dataclass(frozen=True)
class Pending:
    """A retrain decided here whose job has not been seen running yet."""

    decided_at: datetime
    trigger: Signal
    previous_retrain_at: datetime | None  # the cooldown to restore if it is cancelled

    def to_dict(self) -> dict[str, Any]:
        return {
            "decided_at": self.decided_at.isoformat(),
            "trigger": self.trigger,
            "previous_retrain_at": _iso(self.previous_retrain_at),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pending:
        trigger = data["trigger"]
        if trigger not in ("drift", "quality"):
            raise ValueError(f"unknown pending trigger {trigger!r}")
        decided_at = _parse_moment(data["decided_at"])
        assert decided_at is not None
        return cls(decided_at, trigger, _parse_moment(data.get("previous_retrain_at")))


@dataclass(frozen=True)
class TriggerState:
    """What the trigger remembers between evaluations; the caller persists it as JSON."""

    drift_entered: bool = False  # the drift alarm is on (hysteresis)
    drift_streak: int = 0  # consecutive judged checks it has held, since entering or firing
    quality_dropped: bool = False  # the last judged quality figure showed the drop
    quality_streak: int = 0  # consecutive judged checks the drop has held, likewise
    last_retrain_at: datetime | None = None
    budget_day: date | None = None  # the UTC day `retrains_today` counts
    retrains_today: int = 0
    pending: Pending | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_entered": self.drift_entered,
            "drift_streak": self.drift_streak,
            "quality_dropped": self.quality_dropped,
            "quality_streak": self.quality_streak,
            "last_retrain_at": _iso(self.last_retrain_at),
            "budget_day": self.budget_day.isoformat() if self.budget_day else None,
            "retrains_today": self.retrains_today,
            "pending": self.pending.to_dict() if self.pending else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriggerState:
        """Read back `to_dict`'s output; a missing key takes its default (an older state)."""
        day = data.get("budget_day")
        pending = data.get("pending")
        return cls(
            drift_entered=bool(data.get("drift_entered", False)),
            drift_streak=int(data.get("drift_streak", 0)),
            quality_dropped=bool(data.get("quality_dropped", False)),
            quality_streak=int(data.get("quality_streak", 0)),
            last_retrain_at=_parse_moment(data.get("last_retrain_at")),
            budget_day=date.fromisoformat(day) if day else None,
            retrains_today=int(data.get("retrains_today", 0)),
            pending=Pending.from_dict(pending) if pending else None,
        )


@dataclass(frozen=True)
class TriggerDecision:
    """The outcome of one evaluation: the next state, what to do, and why."""

    state: TriggerState
    action: Action
    reason: str  # for people: names the figures behind the decision
    figures: dict[str, Any] = field(default_factory=dict)  # the same, JSON-ready, for the event


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _parse_moment(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    _aware(moment, "a stored time")
    return moment


def _num(x: float) -> str:
    return f"{x:.4g}"


def _duration(span: timedelta) -> str:
    """Hours and minutes, as people say them: '6h', '2h 10m', '45m', '<1m'."""
    minutes = int(span.total_seconds() // 60)
    if minutes < 1:
        return "<1m"
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    return " ".join(part for part in parts if part)


def _checks(streak: int, needed: int) -> str:
    return f"{streak} of {needed}" if streak <= needed else f"{streak} ({needed} needed)"


@dataclass(frozen=True)
class _Reading:
    """One signal on this check, after its update."""

    judged: bool
    holds: bool  # in alarm after this check
    streak: int
    summary: str  # what the figure says, with the thresholds it was judged against


def _read_drift(config: TriggerConfig, state: TriggerState, obs: Observation) -> _Reading:
    share = obs.drift_share
    if share is None:
        why = obs.refusal or "no drift share"
        return _Reading(False, state.drift_entered, state.drift_streak, f"drift not judged ({why})")
    enter, exit_ = _num(config.enter_share), _num(config.exit_share)
    if not state.drift_entered:
        if share >= config.enter_share:
            return _Reading(True, True, 1, f"drift share {_num(share)} >= {enter}")
        return _Reading(True, False, 0, f"drift share {_num(share)} < {enter}")
    if share <= config.exit_share:
        return _Reading(True, False, 0, f"drift share {_num(share)} <= exit {exit_}, alarm left")
    if share >= config.enter_share:
        summary = f"drift share {_num(share)} >= {enter}"
    else:
        summary = f"drift share {_num(share)} > exit {exit_}, alarm holds"
    return _Reading(True, True, state.drift_streak + 1, summary)


def _quality_drop(config: TriggerConfig, obs: Observation) -> float | None:
    """The relative drop below baseline, or None when there is nothing to judge."""
    if config.quality_drop is None or obs.quality is None or obs.quality_baseline is None:
        return None
    if obs.quality_baseline <= 0:
        return None  # no drop can be measured against a zero baseline
    return (obs.quality_baseline - obs.quality) / obs.quality_baseline


def _read_quality(config: TriggerConfig, state: TriggerState, obs: Observation) -> _Reading:
    drop = _quality_drop(config, obs)
    if drop is None or config.quality_drop is None:
        summary = f"{config.quality_metric} not judged"
        return _Reading(False, state.quality_dropped, state.quality_streak, summary)
    assert obs.quality is not None and obs.quality_baseline is not None
    figure = f"{config.quality_metric} {_num(obs.quality)} vs baseline {_num(obs.quality_baseline)}"
    if drop >= config.quality_drop:
        summary = f"{figure}: {drop:.0%} drop >= {config.quality_drop:.0%}"
        return _Reading(True, True, state.quality_streak + 1, summary)
    return _Reading(True, False, 0, f"{figure}: {drop:.0%} drop < {config.quality_drop:.0%}")


def decide_retrain(config: TriggerConfig, state: TriggerState, obs: Observation) -> TriggerDecision:
    """Judge one check: retrain, cancel the pending retrain, or do nothing, and say why."""
    k = config.consecutive_checks
    drift = _read_drift(config, state, obs)
    quality = _read_quality(config, state, obs)
    today = obs.now.astimezone(UTC).date()
    used = state.retrains_today if state.budget_day == today else 0
    since_last = obs.now - state.last_retrain_at if state.last_retrain_at else None
    cooldown_left = (
        max(config.cooldown - since_last, timedelta(0)) if since_last is not None else timedelta(0)
    )

    # Pending retrain: still queued, or started/gone (then it is no longer ours to cancel).
    pending = state.pending if obs.retrain_job == "queued" else None
    new_state = replace(
        state,
        drift_entered=drift.holds,
        drift_streak=drift.streak,
        quality_dropped=quality.holds,
        quality_streak=quality.streak,
        budget_day=today,
        retrains_today=used,
        pending=pending,
    )
    signals: list[tuple[Signal, _Reading]] = [("drift", drift)]
    if config.quality_drop is not None:
        signals.append(("quality", quality))
    summaries = "; ".join(reading.summary for _, reading in signals)
    held = [(name, r) for name, r in signals if r.judged and r.holds and r.streak >= k]

    blockers: list[str] = []
    if obs.retrain_job != "none":
        blockers.append(f"a retrain job is {obs.retrain_job}")
    if obs.rollout_in_progress:
        blockers.append("rollout in progress")
    if cooldown_left > timedelta(0):
        blockers.append(f"cooldown {_duration(cooldown_left)} left")
    if used >= config.daily_budget:
        blockers.append(f"daily budget {used} of {config.daily_budget} spent")
    if obs.new_labelled < config.min_new_labelled:
        blockers.append(f"{obs.new_labelled} new labelled examples < {config.min_new_labelled}")

    figures: dict[str, Any] = {
        "drift_share": obs.drift_share,
        "drift_detected": obs.drift_detected,
        "refusal": obs.refusal if obs.drift_share is None else None,
        "enter_share": config.enter_share,
        "exit_share": config.exit_share,
        "drift_entered": drift.holds,
        "drift_streak": drift.streak,
        "quality_metric": config.quality_metric,
        "quality": obs.quality,
        "quality_baseline": obs.quality_baseline,
        "quality_drop": _quality_drop(config, obs),
        "quality_drop_threshold": config.quality_drop,
        "quality_dropped": quality.holds,
        "quality_streak": quality.streak,
        "consecutive_checks": k,
        "new_labelled": obs.new_labelled,
        "min_new_labelled": config.min_new_labelled,
        "cooldown_s": config.cooldown.total_seconds(),
        "since_last_retrain_s": since_last.total_seconds() if since_last is not None else None,
        "cooldown_left_s": cooldown_left.total_seconds(),
        "rollout_in_progress": obs.rollout_in_progress,
        "retrain_job": obs.retrain_job,
        "budget_used": used,
        "daily_budget": config.daily_budget,
        "budget_day": today.isoformat(),
        "blockers": blockers,
        "trigger": None,
    }

    def decision(action: Action, reason: str, state: TriggerState = new_state) -> TriggerDecision:
        pending_since = _iso(state.pending.decided_at) if state.pending else None
        return TriggerDecision(
            state, action, reason, {**figures, "action": action, "pending_since": pending_since}
        )

    # A queued retrain of ours whose alarm has cleared on this check's evidence: cancel it.
    alarm_cleared = not drift.holds and not quality.holds
    if pending is not None and alarm_cleared and (drift.judged or quality.judged):
        same_day = pending.decided_at.astimezone(UTC).date() == today
        refunded = replace(
            new_state,
            pending=None,
            last_retrain_at=pending.previous_retrain_at,
            retrains_today=max(used - 1, 0) if same_day else used,
        )
        figures["trigger"] = pending.trigger
        reason = f"alarm cleared before the queued retrain started: {summaries}"
        return decision("cancel_pending", f"{reason} -> cancel the pending retrain", refunded)

    if held:
        trigger = held[0][0]
        signal = "; ".join(f"{r.summary} for {_checks(r.streak, k)} checks" for _, r in held)
        if blockers:
            return decision("none", f"blocked: {', '.join(blockers)} ({signal}) -> no retrain")
        figures["trigger"] = trigger
        cooldown = (
            f"cooldown passed ({_duration(since_last)} since last)"
            if since_last is not None
            else "cooldown passed (no retrain yet)"
        )
        reason = (
            f"{signal}; {obs.new_labelled} new labelled examples >= {config.min_new_labelled}; "
            f"{cooldown}; no rollout; budget {used + 1} of {config.daily_budget} used today"
            " -> retrain"
        )
        fired = replace(
            new_state,
            drift_streak=0,
            quality_streak=0,
            last_retrain_at=obs.now,
            retrains_today=used + 1,
            pending=Pending(obs.now, trigger, state.last_retrain_at),
        )
        return decision("retrain", reason, fired)

    why = obs.refusal or "no drift share"
    refused = "" if drift.judged else f"; monitor refused to judge: {why}"
    waiting = [
        f"{'drift' if name == 'drift' else 'quality drop'} held {r.streak} of {k} checks"
        f" ({r.summary})"
        for name, r in signals
        if r.judged and r.holds
    ]
    if waiting:
        return decision("none", f"waiting: {'; '.join(waiting)}{refused} -> no retrain")
    if not drift.judged:
        holding = [
            f"{'drift alarm' if name == 'drift' else 'quality drop'} still held"
            f" {_checks(r.streak, k)} checks"
            for name, r in signals
            if r.holds
        ]
        context = "; ".join(
            [*holding, *(r.summary for name, r in signals if name != "drift" and r.judged)]
        )
        tail = f" ({context})" if context else ""
        return decision("none", f"monitor refused to judge: {why} -> no change{tail}")
    return decision("none", f"clear: {summaries} -> no retrain")
