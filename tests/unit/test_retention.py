"""Retention: old exchanges go, with their feedback and shadow replays, in batches; what a rollout
in progress, a training job or the monitor's first windows read stays. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from controller.retention import Retention, RetentionConfig
from store import Store
from store.exchanges import Exchange, Feedback, new_id
from store.jobs import TrainingJob
from store.rollouts import Rollout

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
FIRST = NOW - timedelta(days=90)  # every adapter's first exchange: its drift reference
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=2)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    yield store
    store.close()


def config(**changes: Any) -> RetentionConfig:
    values: dict[str, Any] = dict(
        max_age=timedelta(days=30), max_exchanges=None, batch=1000, base_adapter=None,
        reference_size=1, window_size=1, max_examples=5000,
    )  # fmt: skip
    return RetentionConfig(**(values | changes))


def record(store: Store, at: datetime, *, adapter: str = "base", **fields: Any) -> str:
    row = dict(
        id=new_id(), created_at=at, recorded_at=at, route="primary", adapter=adapter,
        parent_id=None, endpoint="chat.completions", user=None, api_key_id=None,
        prompt="Capital of France?", request={}, response="Paris", prompt_tokens=5,
        completion_tokens=1, ttft_seconds=0.1, latency_seconds=0.2, mean_logprob=-0.1,
        finish_reason="stop", status="ok", http_status=200, error=None,
    ) | fields  # fmt: skip
    store.record_exchanges([row])
    return row["id"]


def record_first(store: Store) -> str:
    """The base's first exchange, labelled: its drift reference and its quality baseline."""
    first = record(store, FIRST)
    store.add_feedback(first, "Paris", 1.0)
    return first


def ids(store: Store) -> set[str]:
    with store.session() as session:
        return set(session.scalars(select(Exchange.id)))


def prune(store: Store, **changes: Any) -> None:
    Retention(store, config(**changes), clock=lambda: NOW).run()


def pruned_rows(table: str) -> float:
    value = REGISTRY.get_sample_value("tunewatch_retention_pruned_rows_total", {"table": table})
    return value or 0.0


def test_exchanges_older_than_the_limit_go_with_their_feedback_and_shadow_replays(store):
    reference = record_first(store)
    old = record(store, OLD)
    replay = record(store, OLD + timedelta(seconds=1), route="shadow", parent_id=old,
                    adapter="cand")  # fmt: skip
    store.add_feedback(old, "Paris", 1.0)
    store.add_feedback(replay, "Paris", None)
    recent = record(store, RECENT)
    store.add_feedback(recent, "Paris", 1.0)
    exchanges_before, feedback_before = pruned_rows("exchanges"), pruned_rows("feedback")

    prune(store)

    assert ids(store) == {reference, recent}
    with store.session() as session:
        assert set(session.scalars(select(Feedback.exchange_id))) == {reference, recent}
    [event] = store.events(kind="store.pruned")
    assert event.data["exchanges"] == 2 and event.data["feedback"] == 2
    assert "older than 30 days" in event.reason
    assert pruned_rows("exchanges") - exchanges_before == 2
    assert pruned_rows("feedback") - feedback_before == 2


def test_what_a_rollout_in_progress_reads_since_its_start_survives(store):
    record_first(store)
    before_it = record(store, OLD - timedelta(days=1))
    started = OLD
    primary = record(store, started + timedelta(hours=1))
    replay = record(store, started + timedelta(hours=1, seconds=1), route="shadow",
                    parent_id=primary, adapter="cand")  # fmt: skip
    canary = record(store, started + timedelta(hours=2), route="canary", adapter="cand")
    with store.session() as session:
        session.add(Rollout(candidate="cand", baseline=None, stage="canary", step=0,
                            reason="started", created_at=started))  # fmt: skip

    prune(store)

    kept = ids(store)
    assert {primary, replay, canary} <= kept
    assert before_it not in kept
    [event] = store.events(kind="store.pruned")
    assert event.data["held_since"] == {"rollout 1": started.isoformat()}


def test_a_finished_rollout_holds_nothing_back(store):
    record_first(store)
    old = record(store, OLD + timedelta(hours=1))
    with store.session() as session:
        session.add(Rollout(candidate="cand", baseline=None, stage="promoted", step=3,
                            reason="promoted", created_at=OLD))  # fmt: skip

    prune(store)

    assert old not in ids(store)


def test_a_queued_training_job_keeps_the_labelled_exchanges_it_will_read(store):
    record_first(store)
    older = record(store, OLD - timedelta(days=5))
    labelled = [record(store, OLD + timedelta(hours=h)) for h in range(3)]
    for exchange_id in labelled:
        store.add_feedback(exchange_id, "Paris", None)
    with store.session() as session:
        session.add(TrainingJob(status="queued", reason="drift"))

    prune(store, max_examples=3)

    kept = ids(store)
    assert set(labelled) <= kept and older not in kept


def test_a_running_training_job_keeps_its_window(store):
    record_first(store)
    older = record(store, OLD - timedelta(days=5))
    in_window = record(store, OLD)
    with store.session() as session:
        window = [OLD.isoformat(), (OLD + timedelta(hours=1)).isoformat()]
        session.add(TrainingJob(status="running", reason="drift", progress={"window": window}))

    prune(store)

    kept = ids(store)
    assert in_window in kept and older not in kept


def test_the_cap_keeps_the_newest_exchanges(store):
    reference = record_first(store)
    rows = [record(store, RECENT + timedelta(minutes=m)) for m in range(5)]

    prune(store, max_age=None, max_exchanges=2)

    assert ids(store) == {reference, *rows[-2:]}
    assert "beyond the newest 2 exchanges" in store.events(kind="store.pruned")[0].reason


def test_an_adapters_drift_reference_stays_and_one_still_filling_keeps_everything(store):
    store.register_adapter("support-v2", "/a/v2", "f" * 64)
    base_reference = [record(store, FIRST + timedelta(minutes=m)) for m in range(3)]
    base_old = record(store, OLD)
    filling = [record(store, OLD + timedelta(minutes=m), adapter="support-v2") for m in range(2)]

    prune(store, reference_size=3)

    kept = ids(store)
    assert set(base_reference) <= kept and base_old not in kept
    assert set(filling) <= kept  # 2 of its 3: its reference is not whole yet


def test_a_parent_whose_shadow_replay_must_stay_stays(store):
    record_first(store)
    parent = record(store, OLD - timedelta(seconds=1))
    replay = record(store, OLD, route="shadow", parent_id=parent, adapter="cand")
    with store.session() as session:
        session.add(Rollout(candidate="cand", baseline=None, stage="shadow", step=-1,
                            reason="started", created_at=OLD))  # fmt: skip

    prune(store)

    assert {parent, replay} <= ids(store)


def test_a_backlog_goes_in_batches(store):
    reference = record_first(store)
    for day in range(7):
        record(store, OLD - timedelta(days=day))

    prune(store, batch=2)

    assert ids(store) == {reference}
    assert store.events(kind="store.pruned")[0].data["exchanges"] == 7


def test_nothing_to_delete_records_nothing(store):
    record_first(store)
    record(store, RECENT)

    prune(store)

    assert len(ids(store)) == 2
    assert store.events(kind="store.pruned") == []
