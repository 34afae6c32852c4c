"""The trigger job: drift checks in the store, judged once each, acted on, remembered."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from registry.versions import register
from retrain.jobs import active_job, claim
from retrain.policy import TriggerConfig
from retrain.trigger import QualitySignal, Trigger
from store import Store
from store.adapters import RoutingTable
from tests.unit.conftest import write_adapter
from tests.unit.views import exchange_record

CONFIG = TriggerConfig(
    consecutive_checks=3, min_new_labelled=10, cooldown=timedelta(hours=6), daily_budget=2,
    enter_share=0.25, exit_share=0.125,
)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'trigger.db'}")
    store.record_exchanges([exchange_record(n) for n in range(20)])
    for n in range(20):
        store.add_feedback(f"x{n:04d}", f"reference {n}", None)
    return store


def drift(store: Store, *shares: float | None) -> None:
    for share in shares:
        reason = "not judged: too few exchanges" if share is None else f"share {share}"
        detected = None if share is None else share >= 0.25
        store.record_drift_check("base", share, detected, reason, {})


def decisions(store: Store) -> list[str]:
    """The trigger's evaluations, oldest first, by the action each decided."""
    events = reversed(store.events(kind="retrain.trigger", limit=1000))
    return [event.data["action"] for event in events]


def test_every_drift_check_is_one_evaluation_with_its_reason(store: Store) -> None:
    drift(store, 0.0, 0.5, None)
    Trigger(store, CONFIG).evaluate()
    events = list(reversed(store.events(kind="retrain.trigger")))
    assert [e.data["drift_share"] for e in events] == [0.0, 0.5, None]
    assert "clear" in events[0].reason and "waiting" in events[1].reason
    assert "monitor refused to judge: not judged: too few exchanges" in events[2].reason


def test_a_drift_storm_queues_exactly_one_training_job(store: Store) -> None:
    drift(store, *[0.5] * 12)
    Trigger(store, CONFIG).evaluate()
    assert decisions(store).count("retrain") == 1
    job = active_job(store)
    assert job is not None and job.status == "queued" and "retrain" in job.reason


def test_checks_are_judged_once_across_restarts_and_the_cooldown_survives(store: Store) -> None:
    drift(store, 0.5, 0.5, 0.5)
    Trigger(store, CONFIG).evaluate()
    assert decisions(store) == ["none", "none", "retrain"]
    job = active_job(store)
    assert job is not None and claim(store, job.id)
    Trigger(store, CONFIG).evaluate()  # a restarted daemon: nothing new to judge
    assert len(decisions(store)) == 3
    drift(store, 0.5, 0.5, 0.5)
    Trigger(store, CONFIG).evaluate()
    assert decisions(store)[3:] == ["none", "none", "none"]
    assert "a retrain job is running" in store.events(kind="retrain.trigger", limit=1)[0].reason


def test_a_drift_that_clears_before_the_job_starts_cancels_it(store: Store) -> None:
    drift(store, 0.5, 0.5, 0.5)
    trigger = Trigger(store, CONFIG)
    trigger.evaluate()
    queued = active_job(store)
    assert queued is not None
    drift(store, 0.0)
    trigger.evaluate()
    assert decisions(store)[-1] == "cancel_pending"
    assert active_job(store) is None
    [cancelled] = store.events(kind="retrain.cancelled")
    assert cancelled.subject == f"job-{queued.id}" and "alarm cleared" in cancelled.reason


def test_a_candidate_on_its_way_to_primary_blocks_another_retrain(
    store: Store, tmp_path: Path
) -> None:
    register(store, "support", write_adapter(tmp_path / "a"), reason="by hand")
    drift(store, 0.5, 0.5, 0.5)
    Trigger(store, CONFIG).evaluate()
    assert decisions(store) == ["none", "none", "none"]
    assert "rollout in progress" in store.events(kind="retrain.trigger", limit=1)[0].reason


def test_too_few_new_labels_block_the_retrain_and_say_how_many(store: Store) -> None:
    drift(store, 0.5, 0.5, 0.5)
    Trigger(store, TriggerConfig(min_new_labelled=50, enter_share=0.25, exit_share=0.1)).evaluate()
    assert active_job(store) is None
    assert (
        "20 new labelled examples < 50" in store.events(kind="retrain.trigger", limit=1)[0].reason
    )


def test_new_labels_are_counted_up_to_the_threshold_and_no_further(store: Store) -> None:
    drift(store, 0.0)
    Trigger(store, replace(CONFIG, min_new_labelled=7)).evaluate()
    assert store.events(kind="retrain.trigger", limit=1)[0].data["new_labelled"] == 7


def test_a_new_primary_starts_its_drift_count_afresh(store: Store, tmp_path: Path) -> None:
    drift(store, 0.5, 0.5)
    trigger = Trigger(store, CONFIG)
    trigger.evaluate()
    store.register_adapter("support-v1", str(write_adapter(tmp_path / "s")), "f")
    store.set_routing_table(RoutingTable(primary="support-v1"), reason="promoted")
    store.record_drift_check("support-v1", 0.5, True, "share 0.5", {})
    trigger.evaluate()
    [latest] = store.events(kind="retrain.trigger", limit=1)
    assert latest.subject == "support-v1" and latest.data["drift_streak"] == 1


def test_a_quality_drop_below_the_first_labelled_window_fires_on_its_own(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'quality.db'}")
    store.record_exchanges([exchange_record(n, response="Paris") for n in range(80)])
    for n in range(80):  # right at first, then wrong: the answers stayed, the world moved on
        store.add_feedback(f"x{n:04d}", "Paris" if n < 40 else "Lyon", None)
    config = replace(CONFIG, quality_drop=0.2, quality_metric="exact_match")
    drift(store, 0.0, 0.0, 0.0)
    Trigger(store, config, QualitySignal("exact_match", window=40)).evaluate()
    assert decisions(store) == ["none", "none", "retrain"]
    [fired] = store.events(kind="retrain.trigger", limit=1)
    assert (fired.data["quality"], fired.data["quality_baseline"]) == (0.0, 1.0)
    assert fired.data["trigger"] == "quality" and "100% drop >= 20%" in fired.reason
