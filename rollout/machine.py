"""The rollout state machine: a candidate adapter through shadow and canary steps to promoted,
or rolled back the moment a guard fails.

    shadow -> canary(w1) -> canary(w2) -> ... -> promoted
       |            |             |
       +------------+-------------+--> rolled_back     (a guard failed, or a person said so)
       +------------+-------------+--> paused          (no decision by the stage's deadline,
                                                         or a person said so; resumed by one)

Pure, like the trigger: `decide_rollout(config, state, observation) -> Transition` judges one look
(the scheduler's rollout job calls it once per interval), and `command(state, name, now)`
judges what a person asks (pause, resume, promote, rollback). Neither reads the store or a
clock; rollout/runner.py gathers the evidence, applies the transition (routing
table, engine, registry) and records it as an event with its reason and figures.

What a look needs before the rollout moves on:
- no guard failed (rollout/guards.py: confidence sequences over ALL the rollout's evidence,
  so looking every interval costs no extra false rollbacks); a failed guard rolls back at
  once, in any stage;
- the stage has lasted `stage_min_s` and gathered its own minimum of candidate samples
  (`shadow_min_pairs` mirrored answers in shadow, `step_min_samples` canary answers in each
  step), so every step is seen live at its weight;
- the first canary step is the first weight that brings its `step_min_samples` within
  `step_target_s` at the live traffic seen in shadow: at ~1 request/s a 5% step waits over
  three minutes for 10 canary answers, so it is skipped and the reason says so; at a GPU's
  traffic it is taken. Never the last step: at 100% no primary request is left to mirror,
  and the paired evidence would stop where the shadow left it. Later steps are all taken;
- every guard has enough data to judge (no "too few samples", no NaN): missing evidence is
  a reason to wait, never a pass. A stage that is still waiting at `stage_deadline_s` is
  paused, and the figures say what was missing.
After the last step, that is promotion: no guard found harm on the evidence of the whole
rollout. Proving a candidate not worse (every guard "pass") takes thousands of requests
(bench/rollout.py); where traffic affords it, `require_pass` makes promotion wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from rollout.guards.types import GuardConfig, GuardResult, Judgement
from store.rollouts import ACTIVE_STAGES as ACTIVE_STAGES  # the database allows one at a time

Stage = Literal["shadow", "canary", "paused", "promoted", "rolled_back"]
Action = Literal["none", "advance", "promote", "rollback", "pause", "resume"]
Command = Literal["pause", "resume", "promote", "rollback"]
FINISHED: tuple[Stage, ...] = ("promoted", "rolled_back")


class RolloutRefusal(ValueError):
    """What was asked cannot be done in the rollout's present state; the message says why."""


@dataclass(frozen=True)
class RolloutConfig:
    """The steps and the minimums. The defaults finish a rollout in about ten minutes at the
    ~1 request/s a 2-core CPU box serves (shadow ~1 min at half the traffic mirrored, then
    the 5% step waits for 10 canary answers, ~3 min); a GPU's traffic affords larger
    minimums and `guards.planned_samples` (bench/rollout.py)."""

    steps: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)
    shadow_fraction: float = 0.5  # of the primary's requests mirrored to the candidate
    shadow_min_pairs: int = 20
    step_min_samples: int = 10  # canary answers in each step
    stage_min_s: float = 30.0
    stage_deadline_s: float = 900.0
    step_target_s: float | None = 120.0  # None: every step, however long it takes
    require_pass: bool = False  # promote only once every guard proves the candidate not worse
    guards: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < w <= 1 for w in self.steps):
            raise ValueError(f"steps must be weights in (0, 1], got {self.steps}")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must rise, each once, got {self.steps}")
        if not 0 < self.shadow_fraction <= 1:
            raise ValueError(f"shadow_fraction must lie in (0, 1], got {self.shadow_fraction}")
        if min(self.shadow_min_pairs, self.step_min_samples) < 1:
            raise ValueError("shadow_min_pairs and step_min_samples must be at least 1")
        if not 0 <= self.stage_min_s < self.stage_deadline_s:
            raise ValueError("need 0 <= stage_min_s < stage_deadline_s")
        if self.step_target_s is not None and self.step_target_s <= 0:
            raise ValueError(f"step_target_s must be positive, got {self.step_target_s}")


@dataclass(frozen=True)
class RolloutState:
    stage: Stage
    step: int  # index into config.steps while in canary; -1 before
    stage_started_at: datetime
    paused_from: tuple[Stage, int] | None = None  # where `resume` goes back to

    def weight(self, config: RolloutConfig) -> float:
        """The canary weight the routing table carries in this state."""
        stage, step = (
            self.paused_from
            if self.stage == "paused" and self.paused_from
            else (self.stage, self.step)
        )
        return config.steps[step] if stage == "canary" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "step": self.step,
            "stage_started_at": self.stage_started_at.isoformat(),
            "paused_from": list(self.paused_from) if self.paused_from else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        paused = data.get("paused_from")
        return cls(
            data["stage"],
            int(data["step"]),
            datetime.fromisoformat(data["stage_started_at"]),
            (paused[0], int(paused[1])) if paused else None,
        )


def start(now: datetime) -> RolloutState:
    return RolloutState("shadow", -1, now)


@dataclass(frozen=True)
class Observation:
    """One look: the time, the candidate samples of this stage, the guards' judgement, and
    the live requests a second (primary and canary) seen since the rollout started (None:
    not known, every step is taken)."""

    now: datetime
    stage_samples: int
    judgement: Judgement
    live_rate: float | None = None


@dataclass(frozen=True)
class Transition:
    state: RolloutState
    action: Action
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def _short_of_data(result: GuardResult) -> bool:
    return "refusal" in result.figures


def _verdicts(judgement: Judgement) -> dict[str, Any]:
    return {
        r.name: {
            "verdict": r.verdict,
            "estimate": r.estimate,
            "lower": r.lower,
            "upper": r.upper,
            "n_candidate": r.n_candidate,
            "n_primary": r.n_primary,
            "reason": r.reason,
        }
        for r in judgement.results
    }


def _where(config: RolloutConfig, state: RolloutState) -> str:
    if state.stage == "canary":
        return (
            f"canary step {state.step + 1} of {len(config.steps)} ({config.steps[state.step]:.0%})"
        )
    return state.stage


def decide_rollout(config: RolloutConfig, state: RolloutState, obs: Observation) -> Transition:
    """Judge one look: roll back, pause, advance, promote, or wait; say why."""
    figures: dict[str, Any] = {
        "stage": state.stage,
        "step": state.step,
        "weight": state.weight(config),
        "stage_samples": obs.stage_samples,
        "guards": _verdicts(obs.judgement),
        "verdict": obs.judgement.verdict,
        "alpha": obs.judgement.alpha,
    }

    def move(action: Action, reason: str, to: RolloutState) -> Transition:
        return Transition(
            to,
            action,
            reason,
            {**figures, "to_stage": to.stage, "to_step": to.step, "to_weight": to.weight(config)},
        )

    if state.stage not in ("shadow", "canary"):
        return Transition(state, "none", f"{state.stage}: nothing to judge", figures)
    where = _where(config, state)
    failed = [r for r in obs.judgement.results if r.verdict == "fail"]
    if failed:
        reason = "; ".join(r.reason for r in failed)
        return move(
            "rollback",
            f"{where}: {reason} -> roll back",
            replace(state, stage="rolled_back", stage_started_at=obs.now, paused_from=None),
        )

    elapsed = obs.now - state.stage_started_at
    needed = config.shadow_min_pairs if state.stage == "shadow" else config.step_min_samples
    missing = []
    if elapsed < timedelta(seconds=config.stage_min_s):
        missing.append(f"{elapsed.total_seconds():.0f} s of {config.stage_min_s:.0f} s")
    if obs.stage_samples < needed:
        what = "mirrored answers" if state.stage == "shadow" else "canary answers"
        missing.append(f"{obs.stage_samples} of {needed} {what}")
    missing += [r.reason for r in obs.judgement.results if _short_of_data(r)]
    last = state.stage == "canary" and state.step == len(config.steps) - 1
    if last and config.require_pass and obs.judgement.verdict != "pass" and not missing:
        missing.append(f"not every guard passed yet ({obs.judgement.reason})")
    if missing:
        if elapsed >= timedelta(seconds=config.stage_deadline_s):
            paused = RolloutState("paused", state.step, obs.now, (state.stage, state.step))
            reason = (
                f"{where}: no decision after {elapsed.total_seconds():.0f} s "
                f"(deadline {config.stage_deadline_s:.0f} s): {'; '.join(missing)} -> pause"
            )
            return move("pause", reason, paused)
        return Transition(state, "none", f"{where}: waiting: {'; '.join(missing)}", figures)

    evidence = obs.judgement.reason
    if last:
        promoted = RolloutState("promoted", state.step, obs.now)
        return move("promote", f"{where}: no guard found harm ({evidence}) -> promote", promoted)
    step, skipped = (
        _first_step(config, obs.live_rate) if state.stage == "shadow" else (state.step + 1, "")
    )
    to = RolloutState("canary", step, obs.now)
    reason = f"{where}: no guard found harm ({evidence}) -> {_where(config, to)}{skipped}"
    return move("advance", reason, to)


def _first_step(config: RolloutConfig, live_rate: float | None) -> tuple[int, str]:
    """The first step whose weight gathers its canary answers within `step_target_s` at the
    live rate (the one before the last at most), and what was skipped, said for the reason."""
    if config.step_target_s is None or live_rate is None:
        return 0, ""
    needed_weight = config.step_min_samples / (max(live_rate, 1e-9) * config.step_target_s)
    chosen, highest = 0, max(len(config.steps) - 2, 0)
    while chosen < highest and config.steps[chosen] < needed_weight:
        chosen += 1
    if chosen == 0:
        return 0, ""
    skipped = ", ".join(f"{w:.0%}" for w in config.steps[:chosen])
    return chosen, (
        f", skipping {skipped}: at {live_rate:.2f} live requests/s a step needs "
        f"{needed_weight:.0%} of them for {config.step_min_samples} canary answers within "
        f"{config.step_target_s:.0f} s"
    )


def command(config: RolloutConfig, state: RolloutState, name: Command, now: datetime) -> Transition:
    """What a person asks, or a RolloutRefusal saying why it cannot be done now."""
    where = _where(config, state)
    if state.stage in FINISHED:
        raise RolloutRefusal(f"the rollout is {state.stage.replace('_', ' ')}: cannot {name} it")
    if name == "pause":
        if state.stage == "paused":
            raise RolloutRefusal("the rollout is already paused")
        paused = RolloutState("paused", state.step, now, (state.stage, state.step))
        return Transition(paused, "pause", f"{where}: paused by hand")
    if name == "resume":
        if state.stage != "paused" or state.paused_from is None:
            raise RolloutRefusal(f"the rollout is not paused ({where})")
        stage, step = state.paused_from
        resumed = RolloutState(stage, step, now)
        return Transition(resumed, "resume", f"resumed by hand: {_where(config, resumed)}")
    if name == "promote":
        return Transition(
            RolloutState("promoted", state.step, now), "promote", f"{where}: promoted by hand"
        )
    if name == "rollback":
        return Transition(
            RolloutState("rolled_back", state.step, now),
            "rollback",
            f"{where}: rolled back by hand",
        )
    raise RolloutRefusal(f"unknown command {name!r}: pause, resume, promote or rollback")
