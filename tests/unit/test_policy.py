"""The retraining trigger: `decide_retrain` on sequences of checks, one behaviour per test.

Unless a test says otherwise: K = 3 consecutive checks, M = 200 new labelled examples, a
6-hour cooldown, 2 retrains per UTC day, the drift alarm enters at a share >= 0.5 and
leaves at <= 0.3, and each check sees 240 new labelled examples, no rollout and no job.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from retrain.policy import (
    Observation,
    Pending,
    TriggerConfig,
    TriggerDecision,
    TriggerState,
    decide_retrain,
)

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
CONFIG = TriggerConfig(
    consecutive_checks=3,
    min_new_labelled=200,
    cooldown=timedelta(hours=6),
    daily_budget=2,
    enter_share=0.5,
    exit_share=0.3,
)
QUALITY = replace(CONFIG, quality_drop=0.1, quality_metric="chrF")
DRIFTING = 0.6


def check(minute: float = 0, share: float | None = DRIFTING, **fields: object) -> Observation:
    """One check `minute` minutes after T0; by default drifting, with enough data."""
    fields = {"new_labelled": 240, **fields}
    return Observation(now=T0 + timedelta(minutes=minute), drift_share=share, **fields)  # type: ignore[arg-type]


def checks(shares: list[float | None], every: float = 10, **fields: object) -> list[Observation]:
    return [check(i * every, share, **fields) for i, share in enumerate(shares)]


def run(
    observations: list[Observation],
    config: TriggerConfig = CONFIG,
    state: TriggerState | None = None,
    *,
    queued_for: int = 0,
    running_for: int = 0,
    restart_at: int | None = None,
) -> list[TriggerDecision]:
    """Decide each check in turn, standing in for the caller.

    After a retrain, its job is reported queued for `queued_for` checks, then running for
    `running_for`, then gone (0 and 0: it ran between two checks). At `restart_at` the
    state goes through JSON, as a restarted daemon reads it back from the store.
    """
    state = state or TriggerState()
    decisions: list[TriggerDecision] = []
    since_retrain: int | None = None
    for i, obs in enumerate(observations):
        if since_retrain is not None:
            job = (
                "queued"
                if since_retrain < queued_for
                else "running"
                if since_retrain < queued_for + running_for
                else "none"
            )
            obs = replace(obs, retrain_job=job)
            since_retrain += 1
        if i == restart_at:
            state = TriggerState.from_dict(json.loads(json.dumps(state.to_dict())))
        decision = decide_retrain(config, state, obs)
        if decision.action == "retrain":
            since_retrain = 0
        elif decision.action == "cancel_pending":
            since_retrain = None
        decisions.append(decision)
        state = decision.state
    return decisions


def actions(decisions: list[TriggerDecision]) -> list[str]:
    return [d.action for d in decisions]


def retrains(decisions: list[TriggerDecision]) -> list[int]:
    """The indexes of the checks that decided a retrain."""
    return [i for i, d in enumerate(decisions) if d.action == "retrain"]


# --- firing -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_drift_held_for_k_consecutive_checks_with_every_gate_open_retrains(k: int) -> None:
    decisions = run(checks([DRIFTING] * k), replace(CONFIG, consecutive_checks=k))
    assert actions(decisions) == ["none"] * (k - 1) + ["retrain"]


def test_a_retrain_reason_names_every_figure_behind_it() -> None:
    state = TriggerState(
        drift_entered=True, drift_streak=2, last_retrain_at=T0 - timedelta(hours=6)
    )
    decision = decide_retrain(CONFIG, state, check(0, 0.62))
    assert decision.reason == (
        "drift share 0.62 >= 0.5 for 3 of 3 checks; 240 new labelled examples >= 200; "
        "cooldown passed (6h since last); no rollout; budget 1 of 2 used today -> retrain"
    )


def test_a_retrain_records_its_figures_for_the_audit_trail() -> None:
    decision = run(checks([0.7, 0.6, 0.62]))[-1]
    figures = decision.figures
    assert figures["action"] == "retrain"
    assert figures["trigger"] == "drift"
    assert figures["drift_share"] == 0.62
    assert figures["drift_streak"] == 3
    assert figures["new_labelled"] == 240
    assert figures["budget_used"] == 0
    assert figures["blockers"] == []
    assert figures["pending_since"] == (T0 + timedelta(minutes=20)).isoformat()


def test_waiting_checks_say_how_many_of_k_checks_the_drift_has_held() -> None:
    decision = run(checks([0.6, 0.55]))[-1]
    assert decision.action == "none"
    assert decision.reason.startswith("waiting: drift held 2 of 3 checks (drift share 0.55 >= 0.5)")


def test_a_clear_check_says_so_with_its_share() -> None:
    decision = run(checks([0.12]))[-1]
    assert decision.reason == "clear: drift share 0.12 < 0.5 -> no retrain"


@pytest.mark.parametrize(
    "observation",
    [
        check(0, 0.1),
        check(0, 0.9),
        check(0, None, refusal="too few exchanges"),
        check(0, 0.9, rollout_in_progress=True, retrain_job="running", new_labelled=0),
        check(0, 0.1, quality=40.0, quality_baseline=50.0),
    ],
    ids=["clear", "drifting", "refused", "blocked", "quality"],
)
@pytest.mark.parametrize("config", [CONFIG, QUALITY], ids=["drift only", "with quality"])
def test_every_evaluation_yields_a_reason_and_json_ready_figures(
    observation: Observation, config: TriggerConfig
) -> None:
    decision = decide_retrain(config, TriggerState(), observation)
    assert decision.reason
    assert json.loads(json.dumps(decision.figures))["action"] == decision.action


# --- storms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queued_for", "running_for"),
    [(0, 0), (1, 5), (3, 20)],
    ids=["job ran between checks", "job queued then ran", "job queued long and ran long"],
)
def test_a_drift_storm_yields_exactly_one_retrain(queued_for: int, running_for: int) -> None:
    # 50 drifting checks, 5 minutes apart: the storm lasts 4 hours, inside the 6-hour cooldown.
    decisions = run(
        checks([DRIFTING] * 50, every=5), queued_for=queued_for, running_for=running_for
    )
    assert retrains(decisions) == [2]


def test_a_storm_outlasting_the_cooldown_retrains_once_more_when_it_has_passed() -> None:
    # Chosen: the retrain failed or its candidate was rolled back if drift is still there
    # after the cooldown, so the storm earns one more (within the daily budget).
    decisions = run(checks([DRIFTING] * 50, every=10))  # 8 h 10 min of drift
    first, second = retrains(decisions)
    assert (second - first) * 10 == 6 * 60  # the first check with the cooldown passed


def test_a_storm_spends_the_daily_budget_and_then_stops() -> None:
    config = replace(CONFIG, cooldown=timedelta(hours=1))
    decisions = run(checks([DRIFTING] * 60, every=10), config)  # 10 hours, all on one day
    assert len(retrains(decisions)) == 2
    assert decisions[-1].reason.startswith("blocked: daily budget 2 of 2 spent")


def test_the_checks_behind_a_retrain_are_spent_on_it() -> None:
    # Without a cooldown, the next retrain still needs K fresh drifting checks.
    config = replace(CONFIG, cooldown=timedelta(0), daily_budget=10)
    assert retrains(run(checks([DRIFTING] * 9), config)) == [2, 5, 8]


# --- recovery cancels a retrain that has not started ----------------------------------------


@pytest.mark.parametrize("recovered_share", [0.3, 0.1, 0.0])
def test_drift_recovering_before_the_job_starts_cancels_it(recovered_share: float) -> None:
    decisions = run(checks([0.6, 0.6, 0.6, recovered_share]), queued_for=5)
    assert actions(decisions) == ["none", "none", "retrain", "cancel_pending"]
    assert decisions[-1].reason.endswith("-> cancel the pending retrain")
    assert decisions[-1].state.pending is None


def test_drift_easing_but_above_the_exit_threshold_keeps_the_pending_retrain() -> None:
    decisions = run(checks([0.6, 0.6, 0.6, 0.4]), queued_for=5)
    assert actions(decisions) == ["none", "none", "retrain", "none"]
    assert decisions[-1].state.pending is not None


def test_drift_recovering_after_the_job_started_cancels_nothing() -> None:
    decisions = run(checks([0.6, 0.6, 0.6, 0.6, 0.1]), queued_for=1, running_for=5)
    assert actions(decisions) == ["none", "none", "retrain", "none", "none"]


def test_a_cancelled_retrain_gives_back_its_cooldown_and_its_budget() -> None:
    shares = [0.6, 0.6, 0.6, 0.1, 0.6, 0.6, 0.6]  # cancelled at the 4th check, 30 minutes in
    decisions = run(checks(shares), replace(CONFIG, daily_budget=1), queued_for=1)
    assert actions(decisions) == ["none", "none", "retrain", "cancel_pending", "none", "none",
                                  "retrain"]  # fmt: skip


def test_a_retrain_queued_by_hand_is_never_cancelled_by_the_policy() -> None:
    decision = decide_retrain(CONFIG, TriggerState(), check(0, 0.1, retrain_job="queued"))
    assert decision.action == "none"


def test_quality_recovering_cancels_a_retrain_the_quality_drop_triggered() -> None:
    dropped = {"quality": 40.0, "quality_baseline": 50.0}
    recovered = {"quality": 49.0, "quality_baseline": 50.0}
    observations = [*checks([0.1] * 3, **dropped), check(30, 0.1, **recovered)]
    decisions = run(observations, QUALITY, queued_for=5)
    assert actions(decisions) == ["none", "none", "retrain", "cancel_pending"]


# --- restarts -------------------------------------------------------------------------------


@pytest.mark.parametrize("restart_at", range(1, 12))
def test_a_restart_keeps_the_cooldown(restart_at: int) -> None:
    # A retrain at the 3rd check, then drift all through the cooldown: nothing more may fire.
    observations = checks([DRIFTING] * 12, every=30)
    without = run(observations)
    with_restart = run(observations, restart_at=restart_at)
    assert [(d.action, d.reason, d.state) for d in with_restart] == [
        (d.action, d.reason, d.state) for d in without
    ]
    assert retrains(with_restart) == [2]


def test_forgetting_the_state_would_have_lost_the_cooldown() -> None:
    # The contrast that makes the restart test meaningful.
    state = TriggerState(drift_entered=True, drift_streak=5)
    assert decide_retrain(CONFIG, state, check()).action == "retrain"


@pytest.mark.parametrize(
    "state",
    [
        TriggerState(),
        TriggerState(
            drift_entered=True,
            drift_streak=4,
            quality_dropped=True,
            quality_streak=2,
            last_retrain_at=T0,
            budget_day=date(2026, 11, 2),
            retrains_today=1,
            pending=Pending(T0, "drift", T0 - timedelta(days=1)),
        ),
        TriggerState(
            last_retrain_at=datetime(2026, 11, 2, 9, 0, tzinfo=timezone(timedelta(hours=2))),
            pending=Pending(T0, "quality", None),
        ),
    ],
    ids=["fresh", "everything set", "offset times, first pending"],
)
def test_state_round_trips_through_json(state: TriggerState) -> None:
    assert TriggerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_a_state_missing_keys_reads_back_with_their_defaults() -> None:
    assert TriggerState.from_dict({}) == TriggerState()


# --- hysteresis -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "entered"),
    [
        ([0.49, 0.5], [False, True]),  # enters at the enter threshold
        ([0.6, 0.31], [True, True]),  # just above exit: holds
        ([0.6, 0.3], [True, False]),  # at the exit threshold: leaves
        ([0.6, 0.3, 0.45], [True, False, False]),  # between the two after leaving: stays out
    ],
)
def test_the_drift_alarm_enters_at_enter_and_leaves_only_at_exit(
    shares: list[float], entered: list[bool]
) -> None:
    assert [d.state.drift_entered for d in run(checks(shares))] == entered


@pytest.mark.parametrize(
    ("exit_share", "expected"),
    [(0.3, [2]), (0.5, [])],
    ids=["with hysteresis: one retrain", "single threshold: flaps, never holds K"],
)
def test_a_share_wobbling_between_the_thresholds_does_not_flap(
    exit_share: float, expected: list[int]
) -> None:
    wobble = [0.55, 0.45] * 10
    assert retrains(run(checks(wobble), replace(CONFIG, exit_share=exit_share))) == expected


def test_a_share_wobbling_below_the_enter_threshold_never_enters() -> None:
    decisions = run(checks([0.45, 0.35] * 10))
    assert not any(d.state.drift_entered for d in decisions)
    assert set(actions(decisions)) == {"none"}


# --- the gates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new_labelled", "action"),
    [(0, "none"), (40, "none"), (199, "none"), (200, "retrain"), (5000, "retrain")],
)
def test_a_retrain_needs_m_new_labelled_examples(new_labelled: int, action: str) -> None:
    assert actions(run(checks([DRIFTING] * 3, new_labelled=new_labelled)))[-1] == action


def test_too_little_data_says_how_much_there_is() -> None:
    decision = run(checks([DRIFTING] * 3, new_labelled=40))[-1]
    assert decision.reason.startswith("blocked: 40 new labelled examples < 200 (")


@pytest.mark.parametrize(
    ("hours_since_last", "action", "reason"),
    [
        (2, "none", "blocked: cooldown 4h left"),
        (5.5, "none", "blocked: cooldown 30m left"),
        (5.99, "none", "blocked: cooldown <1m left"),
        (6, "retrain", "cooldown passed (6h since last)"),
        (30, "retrain", "cooldown passed (30h since last)"),
    ],
)
def test_the_cooldown_since_the_last_retrain(
    hours_since_last: float, action: str, reason: str
) -> None:
    state = TriggerState(
        drift_entered=True, drift_streak=2, last_retrain_at=T0 - timedelta(hours=hours_since_last)
    )
    decision = decide_retrain(CONFIG, state, check())
    assert (decision.action, reason in decision.reason) == (action, True)


def test_a_spent_daily_budget_blocks() -> None:
    state = TriggerState(
        drift_entered=True, drift_streak=2, budget_day=T0.date(), retrains_today=2,
        last_retrain_at=T0 - timedelta(hours=7),
    )  # fmt: skip
    decision = decide_retrain(CONFIG, state, check())
    assert decision.action == "none"
    assert decision.reason.startswith("blocked: daily budget 2 of 2 spent")


@pytest.mark.parametrize(
    ("now", "action"),
    [
        # 01:00 at UTC+2 is still 23:00 on the spent UTC day.
        (datetime(2026, 11, 3, 1, 0, tzinfo=timezone(timedelta(hours=2))), "none"),
        # 23:30 at UTC-5 is already 04:30 on the next UTC day.
        (datetime(2026, 11, 2, 23, 30, tzinfo=timezone(timedelta(hours=-5))), "retrain"),
        (datetime(2026, 11, 3, 0, 0, tzinfo=UTC), "retrain"),
    ],
    ids=["local next day, same UTC day", "local same day, next UTC day", "UTC midnight"],
)
def test_the_daily_budget_resets_on_a_new_utc_day(now: datetime, action: str) -> None:
    state = TriggerState(
        drift_entered=True, drift_streak=2, budget_day=date(2026, 11, 2), retrains_today=2,
        last_retrain_at=datetime(2026, 11, 2, 12, 0, tzinfo=UTC),
    )  # fmt: skip
    decision = decide_retrain(CONFIG, state, replace(check(), now=now))
    assert decision.action == action


def test_a_rollout_in_progress_blocks_until_it_ends() -> None:
    observations = [*checks([DRIFTING] * 4, rollout_in_progress=True), check(40)]
    decisions = run(observations)
    assert actions(decisions) == ["none"] * 4 + ["retrain"]
    assert decisions[3].reason.startswith("blocked: rollout in progress (")


@pytest.mark.parametrize("job", ["queued", "running"])
def test_a_retrain_job_already_queued_or_running_blocks(job: str) -> None:
    decision = run(checks([DRIFTING] * 3, retrain_job=job))[-1]
    assert decision.action == "none"
    assert decision.reason.startswith(f"blocked: a retrain job is {job} (")


# --- the monitor refusing to judge ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "expected"),
    [
        ([0.6, None, 0.6, 0.6], ["none", "none", "none", "retrain"]),
        ([0.6, 0.6, None, None, None, 0.6], ["none"] * 5 + ["retrain"]),
        ([None, None, 0.6, 0.6, 0.6], ["none"] * 4 + ["retrain"]),
    ],
    ids=["one refusal inside", "refusals at the threshold", "refusals first"],
)
def test_a_refused_check_neither_counts_as_drift_nor_resets_the_count(
    shares: list[float | None], expected: list[str]
) -> None:
    assert actions(run(checks(shares))) == expected


def test_a_refused_check_keeps_the_alarm_and_the_pending_retrain() -> None:
    decisions = run(checks([0.6, 0.6, 0.6, None, None]), queued_for=5)
    assert actions(decisions) == ["none", "none", "retrain", "none", "none"]
    assert decisions[-1].state.drift_entered
    assert decisions[-1].state.pending is not None


def test_a_refused_check_cannot_fire_a_retrain() -> None:
    # The drift held K checks while a rollout blocked; the rollout is over, but this check
    # carries no evidence. The next judged drifting check fires.
    state = TriggerState(drift_entered=True, drift_streak=3)
    decisions = run([check(0, None), check(10)], state=state)
    assert actions(decisions) == ["none", "retrain"]


def test_a_refusal_says_why_the_monitor_refused() -> None:
    decision = decide_retrain(CONFIG, TriggerState(), check(0, None, refusal="40 exchanges < 200"))
    assert decision.reason == "monitor refused to judge: 40 exchanges < 200 -> no change"
    assert decision.figures["refusal"] == "40 exchanges < 200"


# --- the quality drop -----------------------------------------------------------------------


def test_a_quality_drop_alone_triggers_a_retrain() -> None:
    decisions = run(checks([0.1] * 3, quality=40.0, quality_baseline=50.0), QUALITY)
    assert actions(decisions) == ["none", "none", "retrain"]
    assert decisions[-1].figures["trigger"] == "quality"
    assert decisions[-1].reason.startswith("chrF 40 vs baseline 50: 20% drop >= 10% for 3 of 3")


@pytest.mark.parametrize(
    ("config", "quality"),
    [(QUALITY, 46.0), (QUALITY, 55.0), (CONFIG, 30.0)],
    ids=["8% drop < 10%", "improved", "quality drop not configured"],
)
def test_quality_that_has_not_dropped_enough_never_triggers(
    config: TriggerConfig, quality: float
) -> None:
    decisions = run(checks([0.1] * 5, quality=quality, quality_baseline=50.0), config)
    assert set(actions(decisions)) == {"none"}


def test_a_window_without_a_quality_figure_leaves_the_quality_count() -> None:
    dropped = {"quality": 40.0, "quality_baseline": 50.0}
    observations = [check(0, 0.1, **dropped), check(10, 0.1), check(20, 0.1, **dropped),
                    check(30, 0.1, **dropped)]  # fmt: skip
    assert actions(run(observations, QUALITY)) == ["none", "none", "none", "retrain"]


# --- inputs ---------------------------------------------------------------------------------


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Observation(now=datetime(2026, 11, 2, 8, 0), drift_share=0.6)


@pytest.mark.parametrize(
    "fields",
    [
        {"enter_share": 0.3, "exit_share": 0.5},
        {"consecutive_checks": 0},
        {"cooldown": timedelta(hours=-1)},
        {"quality_drop": 0.0},
    ],
    ids=["exit above enter", "no checks", "negative cooldown", "zero quality drop"],
)
def test_a_config_that_cannot_work_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TriggerConfig(**fields)  # type: ignore[arg-type]
