"""Drift thresholds fitted on an adapter's full reference: when, kept across restarts, pinned
columns, references too small to split, and the stated rate on the splits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from monitor.drift import Column, DriftConfig
from monitor.sidecar import Monitor, MonitorConfig
from monitor.thresholds import FittingConfig, fit_thresholds, judging_config, splits_config
from monitor.traffic import read_window
from store import Store
from tests.unit.test_monitor_sidecar import embed, make_monitor
from tests.unit.views import exchange_record as exchange
from tunewatch.monitoring import fitting_config
from tunewatch.settings import Settings, SettingsError

ADAPTER = "tw-fit-v1"
WORDS = "tax refund form income deadline receipt audit credit deduction bracket".split()
# 8 columns at a target of 20%: 39 splits are the fewest that state it (and keep tests quick).
FITTING = FittingConfig(target_false_alarm=0.2, runs=39)
DRIFT = DriftConfig(min_reference=20, min_current=20, embedding_rows=200)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'fit.db'}")


def one_topic(store: Store, count: int, start: int = 0) -> None:
    """Prompts of one topic, of varied length and wording; answers of varied length."""
    rng = random.Random(start)
    rows = []
    for n in range(start, start + count):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))
        rows.append(
            exchange(n, adapter=ADAPTER, prompt=prompt, response=answer, mean_logprob=-rng.random())
        )
    store.record_exchanges(rows)


def fitting_monitor(store: Store, fitting: FittingConfig | None = FITTING, **config) -> Monitor:
    store.register_adapter(ADAPTER, "/adapters/fit", "f" * 64)
    defaults = dict(window_size=40, reference_size=80, drift=DRIFT, fitting=fitting)
    return make_monitor(store, MonitorConfig(**(defaults | config)))


def thresholds_used(monitor: Monitor) -> dict[Column, float]:
    detector = monitor._detectors[ADAPTER]
    return {column: test.threshold for column, test in detector.config.tests.items()}


def test_a_full_reference_gets_fitted_thresholds_recorded_with_their_rates(store: Store) -> None:
    one_topic(store, 120)
    monitor = fitting_monitor(store)
    monitor.check_drift()
    [event] = store.events(kind="drift.thresholds", subject=ADAPTER)
    assert event.reason.startswith("fitted on 39 A/A splits of the reference (80 exchanges")
    fitted = {Column(c): t for c, t in event.data["thresholds"].items()}
    assert fitted and set(fitted) <= set(DRIFT.tests)
    used = thresholds_used(monitor)
    assert all(used[c] == t for c, t in fitted.items())
    assert any(used[c] != DRIFT.tests[c].threshold for c in fitted)
    assert 0 <= event.data["dataset_false_alarms_fitted"] <= 1


def test_a_restarted_monitor_uses_the_kept_fit_without_fitting_again(store: Store) -> None:
    one_topic(store, 120)
    first = fitting_monitor(store)
    first.check_drift()
    again = fitting_monitor(store)
    again.check_drift()
    assert len(store.events(kind="drift.thresholds", subject=ADAPTER)) == 1
    assert thresholds_used(again) == thresholds_used(first)


def test_a_reference_still_filling_is_judged_at_the_configured_thresholds(store: Store) -> None:
    one_topic(store, 60)  # the reference wants 80
    monitor = fitting_monitor(store)
    monitor.check_drift()
    assert store.events(kind="drift.thresholds", subject=ADAPTER) == []
    assert thresholds_used(monitor) == {c: t.threshold for c, t in DRIFT.tests.items()}


def test_pinned_columns_keep_their_threshold(store: Store) -> None:
    one_topic(store, 120)
    pinned = DRIFT.with_thresholds({Column.PROMPT_LENGTH: 0.0123})
    fitting = FittingConfig(0.2, 39, pinned=frozenset({Column.PROMPT_LENGTH}))
    monitor = fitting_monitor(store, fitting, drift=pinned)
    monitor.check_drift()
    [event] = store.events(kind="drift.thresholds", subject=ADAPTER)
    assert "prompt_length" not in event.data["thresholds"]
    assert thresholds_used(monitor)[Column.PROMPT_LENGTH] == 0.0123


def test_a_reference_no_larger_than_the_window_is_not_fitted_and_says_why(store: Store) -> None:
    one_topic(store, 120)
    monitor = fitting_monitor(store, window_size=80, reference_size=80)
    monitor.check_drift()
    [event] = store.events(kind="drift.thresholds", subject=ADAPTER)
    assert event.reason.startswith("not fitted, configured ones kept: ")
    assert "reference_size larger than monitor.window_size" in event.reason
    assert thresholds_used(monitor) == {c: t.threshold for c, t in DRIFT.tests.items()}


def test_without_fitting_the_configured_thresholds_stay(store: Store) -> None:
    one_topic(store, 120)
    monitor = fitting_monitor(store, fitting=None)
    monitor.check_drift()
    assert store.events(kind="drift.thresholds", subject=ADAPTER) == []


def test_the_fit_holds_the_dataset_verdict_under_the_target_on_its_splits(store: Store) -> None:
    one_topic(store, 80)
    reference = read_window(store, ADAPTER, 80, newest=False)
    calibration = fit_thresholds(reference, embed, DRIFT, FITTING, current_size=40)
    assert calibration.runs == 39 and calibration.current_size == 40
    # Each column at target / 8 on the same splits: the verdict (any column) at most the target.
    assert calibration.proposed_dataset_false_alarm_rate <= FITTING.target_false_alarm
    judged = judging_config(DRIFT, calibration).tests
    proposed = {c.column: c.proposed_threshold for c in calibration.columns}
    assert proposed and all(judged[c].threshold == t for c, t in proposed.items())


def test_the_splits_are_judged_with_the_reference_they_have() -> None:
    assert splits_config(DriftConfig(), 300, 100).min_reference == 200
    assert splits_config(DriftConfig(), 200, 100).min_reference == 100


def test_too_few_runs_for_the_target_are_refused_naming_the_number_needed() -> None:
    with pytest.raises(ValueError, match="at least 799 are needed"):
        FittingConfig(target_false_alarm=0.01, runs=200).check(DriftConfig())
    settings = Settings(monitor={"fitting_runs": 100})
    with pytest.raises(SettingsError, match="monitor.fitting_runs: .*at least 799"):
        fitting_config(settings, DriftConfig())


def test_the_settings_pin_the_columns_they_name_and_can_turn_fitting_off() -> None:
    settings = Settings(monitor={"drift_thresholds": {"prompt_length": 0.01}})
    fitting = fitting_config(settings, DriftConfig())
    assert fitting is not None and fitting.pinned == {Column.PROMPT_LENGTH}
    assert fitting_config(Settings(monitor={"fit_thresholds": False}), DriftConfig()) is None
