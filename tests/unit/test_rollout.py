"""The rollout state machine: every transition of decide_rollout(), every refusal of command()."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from rollout.guards.sequences import judge
from rollout.guards.types import Evidence, GuardConfig
from rollout.machine import (
    Observation,
    RolloutConfig,
    RolloutRefusal,
    RolloutState,
    command,
    decide_rollout,
    start,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)
CONFIG = RolloutConfig()
LAST = len(CONFIG.steps) - 1
rng = np.random.default_rng(0)


def evidence(n: int = 200, *, errors: float = 0.0, slower: float = 1.0, worse: float = 0.0,
             same: bool = False) -> Evidence:  # fmt: skip
    """n requests a side: quality pairs, latencies and error flags."""
    primary = rng.binomial(1, 0.6, n).astype(float)
    candidate = primary.copy() if same else np.clip(primary - rng.binomial(1, worse, n), 0, 1)
    latency = rng.lognormal(0, 0.4, n)
    return Evidence(
        quality_candidate=candidate, quality_primary=primary, paired_quality=True,
        latency_candidate=latency * slower, latency_primary=rng.lognormal(0, 0.4, n),
        errors_candidate=rng.binomial(1, errors, n).astype(float),
        errors_primary=np.zeros(n),
    )  # fmt: skip


def look(state: RolloutState, after_s: float, samples: int = 50, **kw) -> Observation:
    guards = kw.pop("guards", CONFIG.guards)
    return Observation(T0 + timedelta(seconds=after_s), samples, judge(evidence(**kw), guards))


def canary(step: int) -> RolloutState:
    return RolloutState("canary", step, T0)


def test_a_rollout_starts_in_shadow_with_no_canary_weight():
    state = start(T0)
    assert (state.stage, state.step, state.weight(CONFIG)) == ("shadow", -1, 0.0)


def test_shadow_waits_for_its_minimum_time_and_pairs_and_says_so():
    moved = decide_rollout(CONFIG, start(T0), look(start(T0), after_s=10, samples=5))
    assert moved.action == "none" and moved.state == start(T0)
    assert "10 s of 30 s" in moved.reason and "5 of 20 mirrored answers" in moved.reason


def test_shadow_moves_to_the_first_canary_step_once_no_guard_found_harm():
    moved = decide_rollout(CONFIG, start(T0), look(start(T0), after_s=60, same=True))
    assert moved.action == "advance"
    assert (moved.state.stage, moved.state.step, moved.state.weight(CONFIG)) == ("canary", 0, 0.05)
    assert moved.state.stage_started_at == T0 + timedelta(seconds=60)
    assert moved.figures["to_weight"] == 0.05 and "no guard found harm" in moved.reason


@pytest.mark.parametrize("step", range(LAST))
def test_each_canary_step_moves_to_the_next(step: int):
    moved = decide_rollout(CONFIG, canary(step), look(canary(step), after_s=60, same=True))
    assert moved.action == "advance" and moved.state.step == step + 1


def test_a_step_too_small_for_the_live_traffic_is_skipped_and_the_reason_says_so():
    # 0.7 requests/s: 5% gathers 10 canary answers in 286 s, over the 120 s target; 25%
    # gathers them in 57 s.
    observed = replace(look(start(T0), after_s=60, same=True), live_rate=0.7)
    moved = decide_rollout(CONFIG, start(T0), observed)
    assert moved.action == "advance" and moved.state.weight(CONFIG) == 0.25
    assert "skipping 5%" in moved.reason and "0.70 live requests/s" in moved.reason


def test_at_enough_traffic_every_step_is_taken():
    observed = replace(look(start(T0), after_s=60, same=True), live_rate=20.0)
    moved = decide_rollout(CONFIG, start(T0), observed)
    assert moved.state.weight(CONFIG) == 0.05 and "skipping" not in moved.reason


def test_a_trickle_of_traffic_starts_at_the_step_before_the_last_at_most():
    # At 100% no primary request is left to mirror: the paired evidence would stop.
    observed = replace(look(start(T0), after_s=60, same=True), live_rate=0.01)
    moved = decide_rollout(CONFIG, start(T0), observed)
    assert (moved.action, moved.state.step) == ("advance", LAST - 1)
    assert "skipping 5%, 25%" in moved.reason


def test_only_the_first_step_is_sized_by_the_traffic():
    observed = replace(look(canary(0), after_s=60, same=True), live_rate=0.01)
    moved = decide_rollout(CONFIG, canary(0), observed)
    assert moved.state.step == 1 and "skipping" not in moved.reason


def test_without_a_step_target_every_step_is_taken_however_slow():
    config = RolloutConfig(step_target_s=None)
    observed = replace(look(start(T0), after_s=60, same=True), live_rate=0.01)
    assert decide_rollout(config, start(T0), observed).state.step == 0


def test_the_last_step_promotes():
    moved = decide_rollout(CONFIG, canary(LAST), look(canary(LAST), after_s=60, same=True))
    assert moved.action == "promote" and moved.state.stage == "promoted"


@pytest.mark.parametrize(
    ("state", "harm"),
    [
        (start(T0), {"errors": 0.5}),
        (canary(0), {"slower": 3.0}),
        (canary(2), {"worse": 0.4}),
        (canary(LAST), {"errors": 1.0}),
    ],
)
def test_a_failed_guard_rolls_back_at_once_in_any_stage(state: RolloutState, harm: dict):
    moved = decide_rollout(CONFIG, state, look(state, after_s=1, samples=0, **harm))
    assert moved.action == "rollback" and moved.state.stage == "rolled_back"
    assert "-> roll back" in moved.reason and moved.figures["verdict"] == "fail"


def test_too_little_evidence_for_a_guard_is_a_reason_to_wait_never_a_pass():
    moved = decide_rollout(CONFIG, canary(LAST), look(canary(LAST), after_s=60, n=10, same=True))
    assert moved.action == "none"
    assert "10 pairs < 30 needed" in moved.reason


def test_a_stage_still_waiting_at_its_deadline_is_paused_with_what_was_missing():
    state = canary(1)
    moved = decide_rollout(CONFIG, state, look(state, after_s=CONFIG.stage_deadline_s, samples=3))
    assert moved.action == "pause"
    assert moved.state.stage == "paused" and moved.state.paused_from == ("canary", 1)
    assert "3 of 10 canary answers" in moved.reason and "deadline" in moved.reason
    assert moved.state.weight(CONFIG) == CONFIG.steps[1]  # a pause keeps the routing as it is


@pytest.mark.parametrize("stage", ["paused", "promoted", "rolled_back"])
def test_a_paused_or_finished_rollout_is_not_judged(stage: str):
    state = RolloutState(stage, 1, T0, ("canary", 1) if stage == "paused" else None)
    moved = decide_rollout(CONFIG, state, look(state, after_s=60, errors=1.0))
    assert moved.action == "none" and moved.state == state


def test_with_require_pass_the_last_step_waits_for_proof():
    strict = RolloutConfig(require_pass=True)
    moved = decide_rollout(strict, canary(LAST), look(canary(LAST), after_s=60, same=True, n=40))
    assert moved.action == "none" and "not every guard passed yet" in moved.reason


def test_pause_keeps_the_place_and_resume_returns_to_it_with_a_fresh_clock():
    paused = command(CONFIG, canary(2), "pause", T0 + timedelta(seconds=5))
    assert (paused.state.stage, paused.state.paused_from) == ("paused", ("canary", 2))
    resumed = command(CONFIG, paused.state, "resume", T0 + timedelta(seconds=99))
    assert resumed.state == RolloutState("canary", 2, T0 + timedelta(seconds=99))


@pytest.mark.parametrize(
    "state", [start(T0), canary(1), RolloutState("paused", 1, T0, ("canary", 1))]
)
@pytest.mark.parametrize(("name", "stage"), [("promote", "promoted"), ("rollback", "rolled_back")])
def test_a_person_can_promote_or_roll_back_at_any_active_point(state, name, stage):
    assert command(CONFIG, state, name, T0).state.stage == stage


@pytest.mark.parametrize(
    ("state", "name", "why"),
    [
        (RolloutState("paused", 1, T0, ("canary", 1)), "pause", "already paused"),
        (canary(1), "resume", "not paused"),
        (RolloutState("rolled_back", 1, T0), "promote", "rolled back: cannot promote"),
        (RolloutState("promoted", 3, T0), "rollback", "promoted: cannot rollback"),
        (RolloutState("rolled_back", 1, T0), "resume", "rolled back"),
        (canary(1), "restart", "unknown command"),
    ],
)
def test_a_command_that_cannot_apply_now_is_refused_with_the_reason(state, name, why):
    with pytest.raises(RolloutRefusal, match=why):
        command(CONFIG, state, name, T0)


def test_the_state_round_trips_through_json():
    state = RolloutState("paused", 2, T0, ("canary", 2))
    assert RolloutState.from_dict(state.to_dict()) == state


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": ()}, {"steps": (0.5, 0.25)}, {"steps": (0.0, 1.0)}, {"steps": (0.5, 0.5)},
        {"shadow_fraction": 0.0}, {"step_min_samples": 0},
        {"stage_min_s": 100.0, "stage_deadline_s": 50.0},
    ],
)  # fmt: skip
def test_a_config_that_cannot_work_is_refused(bad: dict):
    with pytest.raises(ValueError):
        RolloutConfig(**bad)


def test_only_the_configured_guards_must_have_data():
    latency_only = GuardConfig(guards=("latency", "errors"))
    config = RolloutConfig(guards=latency_only)
    moved = decide_rollout(
        config, canary(LAST), look(canary(LAST), after_s=60, same=True, guards=latency_only)
    )
    assert moved.action == "promote"
