"""`tunewatch replay --dry-run`: the monitor's drift checks and the retrain trigger over a
traffic file, offline, on the file's own clock, with no engine and no store.

The same code judges as live: the reference is the first `monitor.reference_size` lines,
fitted thresholds come from monitor/thresholds.py once it is full (as the monitor fits
them), each check is monitor/drift.py's `DriftDetector` on the last `monitor.window_size`
lines every `monitor.drift_interval_s` of the file's time, and each check goes to
retrain/policy.py's `decide_retrain`. What the live loop would add is taken as clear: no
rollout in progress, and a retrain decided is gone at once (no job to wait for), so the
trigger's gates are the streak, the labels, the cooldown and the daily budget. Answers are
judged where the line recorded one (`tunewatch export` writes it); a line with nothing
recorded counts as answered, with no answer to judge, so only its prompt columns count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from monitor.drift import DriftConfig, DriftDetector, DriftResult, EmbedFn
from monitor.thresholds import FittingConfig, fit_thresholds, judging_config
from monitor.window import ExchangeView, Window
from retrain.policy import Observation, TriggerConfig, TriggerState, decide_retrain
from serving.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from tunewatch.traffic import NumberedLine

T0 = datetime(2000, 1, 1, tzinfo=UTC)  # the file's clock starts here; only differences count
ADAPTER = "dry-run"


@dataclass(frozen=True)
class DryRunConfig:
    window_size: int
    reference_size: int
    interval_s: float  # between drift checks, on the file's clock
    drift: DriftConfig
    fitting: FittingConfig | None
    feedback_share: float = 1.0  # of the references, as if posted


@dataclass(frozen=True)
class Check:
    at_s: float
    result: DriftResult
    labelled: int  # lines with a reference so far, times the feedback share


@dataclass(frozen=True)
class Fit:
    """The thresholds fitted on the full reference, and the rates measured on its splits."""

    thresholds: dict[str, float]
    dataset_false_alarms: float  # at the configured thresholds
    dataset_false_alarms_fitted: float
    runs: int


@dataclass(frozen=True)
class DriftRun:
    checks: tuple[Check, ...]
    fit: Fit | None
    fit_refused: str | None


@dataclass(frozen=True)
class TriggerRun:
    """One trigger configuration over the checks."""

    config: TriggerConfig
    retrains_at_s: tuple[float, ...]


def exchange_view(numbered: NumberedLine, at_s: float) -> ExchangeView:
    """A line as the monitor would read its recorded exchange (the prompt text the gateway
    stores, by the gateway's own request models)."""
    line, recorded = numbered.line, numbered.line.recorded
    if line.endpoint == "completions":
        prompt = CompletionRequest(model="-", prompt=line.prompt).prompt_text()
    else:
        messages = line.messages or [ChatMessage(role="user", content=line.prompt)]
        prompt = ChatCompletionRequest(model="-", messages=messages).prompt_text()
    answered = recorded is None or recorded.status == "ok"
    return ExchangeView(
        id=f"line-{numbered.number}",
        created_at=T0 + timedelta(seconds=at_s),
        adapter=ADAPTER,
        route="primary",
        prompt=prompt,
        response=recorded.answer if recorded is not None and answered else None,
        completion_tokens=None,
        mean_logprob=recorded.mean_logprob if recorded is not None else None,
        latency_seconds=0.0,
        status="ok" if answered else "error",
        reference=line.reference,
    )


def line_times(lines: Sequence[NumberedLine], rate: float | None) -> list[float]:
    """Each line's time: at `rate` lines a second when given, else its own `at`."""
    if rate is not None:
        return [i / rate for i in range(len(lines))]
    missing = [n.number for n in lines if n.line.at is None]
    if missing:
        raise ValueError(
            f"lines {missing[:5]} have no `at` time: give every line one, or give --rate"
        )
    return [float(n.line.at) for n in lines]  # type: ignore[arg-type]


def run_checks(
    lines: Sequence[NumberedLine], times: Sequence[float], embed: EmbedFn, config: DryRunConfig
) -> DriftRun:
    """Every drift check the monitor would have made over the file, in order."""
    order = sorted(range(len(lines)), key=lambda i: times[i])
    views = [exchange_view(lines[i], times[i]) for i in order]
    at = [times[i] for i in order]
    detector: DriftDetector | None = None
    fit, refused = None, None
    checks: list[Check] = []
    seen = labelled = 0
    for step in range(1, math.floor(at[-1] / config.interval_s) + 1):
        moment = step * config.interval_s
        while seen < len(views) and at[seen] <= moment:
            labelled += views[seen].reference is not None
            seen += 1
        if seen == 0:
            continue
        reference = Window(ADAPTER, tuple(views[: min(seen, config.reference_size)]))
        if detector is None or len(detector.reference) != len(reference):
            judging = config.drift
            if config.fitting is not None and len(reference) == config.reference_size:
                judging, fit, refused = _fitted(reference, embed, config)
            detector = DriftDetector(reference, embed, judging)
        start = max(0, seen - config.window_size)
        current = Window(ADAPTER, tuple(views[start:seen]))
        checks.append(Check(moment, detector.check(current), int(labelled * config.feedback_share)))
    return DriftRun(tuple(checks), fit, refused)


def _fitted(
    reference: Window, embed: EmbedFn, config: DryRunConfig
) -> tuple[DriftConfig, Fit | None, str | None]:
    assert config.fitting is not None
    try:
        calibration = fit_thresholds(
            reference, embed, config.drift, config.fitting, config.window_size
        )
    except ValueError as exc:
        return config.drift, None, str(exc)
    judging = judging_config(config.drift, calibration, config.fitting.pinned)
    fit = Fit(
        {str(c.column): c.proposed_threshold for c in calibration.columns},
        calibration.dataset_false_alarm_rate,
        calibration.proposed_dataset_false_alarm_rate,
        calibration.runs,
    )
    return judging, fit, None


def run_trigger(checks: Sequence[Check], config: TriggerConfig) -> TriggerRun:
    """`decide_retrain` on each check, as the trigger job feeds it (nothing else pending)."""
    state, retrains = TriggerState(), []
    labelled_at_retrain = 0
    for check in checks:
        result = check.result
        observation = Observation(
            now=T0 + timedelta(seconds=check.at_s),
            drift_share=result.drift_share,
            drift_detected=result.drifted,
            refusal=result.reason if result.drift_share is None else None,
            new_labelled=check.labelled - labelled_at_retrain,
        )
        decision = decide_retrain(config, state, observation)
        state = decision.state
        if decision.action == "retrain":
            retrains.append(check.at_s)
            labelled_at_retrain = check.labelled
    return TriggerRun(config, tuple(retrains))


@dataclass(frozen=True)
class Verdicts:
    """What the checks say against a known change point (None: no change point given)."""

    checks: int
    drifted: int
    quiet_checks: int | None  # checks whose whole window precedes the change
    false_alarms: int | None  # of those, how many flagged drift
    first_flag_s: float | None  # the first drift verdict (after the change, when given)


def verdicts(run: DriftRun, change_at_s: float | None) -> Verdicts:
    judged = [c for c in run.checks if c.result.drifted is not None]
    drifted = [c for c in judged if c.result.drifted]
    if change_at_s is None:
        first = drifted[0].at_s if drifted else None
        return Verdicts(len(judged), len(drifted), None, None, first)
    quiet = [c for c in judged if c.at_s < change_at_s]
    after = [c for c in drifted if c.at_s >= change_at_s]
    return Verdicts(
        len(judged),
        len(drifted),
        len(quiet),
        sum(bool(c.result.drifted) for c in quiet),
        after[0].at_s if after else None,
    )


def trigger_grid(
    base: TriggerConfig, enter_shares: Sequence[float], consecutive: Sequence[int]
) -> list[TriggerConfig]:
    """The configured trigger, or every combination of the values given."""
    shares = list(enter_shares) or [base.enter_share]
    streaks = list(consecutive) or [base.consecutive_checks]
    return [
        replace(base, enter_share=s, exit_share=min(base.exit_share, s), consecutive_checks=k)
        for s in shares
        for k in streaks
    ]
