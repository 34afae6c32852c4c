"""The store's behaviour, the same on SQLite and on PostgreSQL (one schema, one code path)."""

from __future__ import annotations

import concurrent.futures
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from serving.exchange import storable
from serving.recorder import ExchangeRecorder
from serving.spill import SpillFile
from store import Store
from store.adapters import AdapterNameTakenError, AdapterRecord, RoutingTable
from store.exchanges import (
    Exchange,
    Feedback,
    FeedbackLimitError,
    NotMadeByError,
    UnknownExchangeError,
    new_id,
)
from store.schema import SchemaMismatchError


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    yield store
    store.close()


def exchange(**fields: Any) -> dict[str, Any]:
    """An exchange as the gateway records it (every column given), with `fields` changed."""
    record = dict(
        id=new_id(),
        created_at=datetime(2026, 11, 3, 14, 5, 6, 123456, tzinfo=UTC),
        route="primary",
        adapter="support-v3",
        parent_id=None,
        endpoint="chat.completions",
        user="user-17",
        api_key_id="0123456789abcdef",
        prompt="Wie setze ich mein Passwort zurück? 🔑",
        request={
            "model": "tunewatch",
            "messages": [{"role": "user", "content": "Wie setze ich mein Passwort zurück? 🔑"}],
            "temperature": 0.2,
            "logprobs": True,
            "stop": None,
        },
        response="Open Settings, then Security.",
        prompt_tokens=14,
        completion_tokens=7,
        ttft_seconds=0.0421875,
        latency_seconds=0.3125,
        mean_logprob=-0.734375,
        finish_reason="stop",
        status="ok",
        http_status=200,
        error=None,
    )
    return record | fields


def count(store: Store, model: type) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


# exchanges


def test_a_shadow_recorded_after_its_parent_in_the_same_batch_is_accepted(store: Store) -> None:
    parent = exchange()
    shadow = exchange(route="shadow", adapter="support-v4", parent_id=parent["id"])

    store.record_exchanges([parent, shadow])

    assert store.get_exchange(shadow["id"]).parent_id == parent["id"]


def test_a_batch_is_written_in_the_given_order(store: Store) -> None:
    # Each exchange refers to the one before it: any other order breaks a foreign key.
    chain = [exchange()]
    for _ in range(49):
        chain.append(exchange(route="shadow", parent_id=chain[-1]["id"]))

    store.record_exchanges(chain)

    assert count(store, Exchange) == 50


def test_a_batch_with_a_shadow_before_its_parent_is_refused_whole(store: Store) -> None:
    parent = exchange()
    shadow = exchange(route="shadow", parent_id=parent["id"])

    with pytest.raises(IntegrityError):
        store.record_exchanges([exchange(), shadow, parent])

    assert count(store, Exchange) == 0


def test_an_exchange_reads_back_field_for_field(store: Store) -> None:
    recorded = exchange()

    store.record_exchanges([recorded])

    stored = store.get_exchange(recorded["id"])
    assert {name: getattr(stored, name) for name in recorded} == recorded


def test_an_exchange_with_empty_optional_fields_reads_back_as_none(store: Store) -> None:
    recorded = exchange(
        user=None, response=None, prompt_tokens=None, completion_tokens=None,
        ttft_seconds=None, mean_logprob=None, finish_reason=None,
        status="error", http_status=503, error="engine unavailable",
    )  # fmt: skip

    store.record_exchanges([recorded])

    stored = store.get_exchange(recorded["id"])
    assert {name: getattr(stored, name) for name in recorded} == recorded


def test_created_at_reads_back_timezone_aware_at_the_same_instant(store: Store) -> None:
    in_berlin = datetime(2026, 11, 3, 15, 5, 6, 123456, tzinfo=timezone(timedelta(hours=1)))
    recorded = exchange(created_at=in_berlin)

    store.record_exchanges([recorded])

    created_at = store.get_exchange(recorded["id"]).created_at
    assert created_at.tzinfo is not None
    assert created_at.utcoffset() == timedelta(0)
    assert created_at == in_berlin


def test_created_at_defaults_to_now_in_utc(store: Store) -> None:
    recorded = exchange()
    del recorded["created_at"]
    before = datetime.now(UTC)

    store.record_exchanges([recorded])

    created_at = store.get_exchange(recorded["id"]).created_at
    assert before <= created_at <= datetime.now(UTC)


def test_recorded_ids_are_those_of_the_given_ids_the_store_has(store: Store) -> None:
    written = exchange()
    store.record_exchanges([written])
    assert store.recorded_ids([written["id"], new_id()]) == {written["id"]}


def test_an_unknown_exchange_reads_as_none(store: Store) -> None:
    assert store.get_exchange(new_id()) is None


# feedback


def test_feedback_for_a_recorded_exchange_is_kept(store: Store) -> None:
    recorded = exchange()
    store.record_exchanges([recorded])

    feedback_id = store.add_feedback(recorded["id"], "Settings, then Security.", rating=0.5)

    with store.session() as session:
        feedback = session.get(Feedback, feedback_id)
        assert (feedback.exchange_id, feedback.reference, feedback.rating) == (
            recorded["id"], "Settings, then Security.", 0.5,
        )  # fmt: skip


def test_feedback_for_an_unknown_exchange_raises_and_writes_nothing(store: Store) -> None:
    with pytest.raises(UnknownExchangeError):
        store.add_feedback(new_id(), reference="anything", rating=1.0)

    assert count(store, Feedback) == 0


def test_feedback_with_a_reference_only_or_a_rating_only_is_kept(store: Store) -> None:
    recorded = exchange()
    store.record_exchanges([recorded])
    ids = [
        store.add_feedback(recorded["id"], "Settings.", None, max_per_exchange=5),
        store.add_feedback(recorded["id"], None, 0.25, max_per_exchange=5),
    ]
    with store.session() as session:
        kept = [(f.reference, f.rating) for f in (session.get(Feedback, i) for i in ids)]
    assert kept == [("Settings.", None), (None, 0.25)]


def test_feedback_made_by_another_key_is_refused(store: Store) -> None:
    recorded = exchange()
    store.record_exchanges([recorded])
    with pytest.raises(NotMadeByError):
        store.add_feedback(recorded["id"], "x", None, made_by="fedcba9876543210")
    store.add_feedback(recorded["id"], "x", None, made_by=recorded["api_key_id"])
    assert count(store, Feedback) == 1


def test_the_feedback_cap_per_exchange_holds_under_concurrent_writers(store: Store) -> None:
    recorded = exchange()
    store.record_exchanges([recorded])

    def add(_: int) -> bool:
        try:
            store.add_feedback(recorded["id"], None, 1.0, max_per_exchange=5)
        except FeedbackLimitError:
            return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(add, range(40)))
    assert (sum(taken), count(store, Feedback)) == (5, 5)


# adapters


def test_registering_an_adapter_again_with_the_same_weights_is_accepted(store: Store) -> None:
    store.register_adapter("support-v3", "/adapters/support-v3", fingerprint="ab12")
    store.set_adapter_loaded("support-v3", False)

    store.register_adapter("support-v3", "/mnt/adapters/support-v3", fingerprint="ab12")

    assert store.adapters() == [
        AdapterRecord("support-v3", "/mnt/adapters/support-v3", "ab12", loaded=True)
    ]


def test_registering_a_taken_name_for_other_weights_raises_and_keeps_the_first(
    store: Store,
) -> None:
    store.register_adapter("support-v3", "/adapters/support-v3", fingerprint="ab12")

    with pytest.raises(AdapterNameTakenError):
        store.register_adapter("support-v3", "/adapters/other", fingerprint="cd34")

    assert store.adapters() == [
        AdapterRecord("support-v3", "/adapters/support-v3", "ab12", loaded=True)
    ]


# routing


def test_there_is_no_routing_table_before_one_is_set(store: Store) -> None:
    assert store.routing_table() is None


def test_the_newest_routing_table_is_in_force(store: Store) -> None:
    first = RoutingTable(primary="support-v3")
    newest = RoutingTable(
        primary="support-v3", canary="support-v4", canary_weight=0.1,
        shadow="support-v5", shadow_fraction=0.25,
    )  # fmt: skip

    store.set_routing_table(first, reason="initial")
    store.set_routing_table(newest, reason="canary step 1")

    assert store.routing_table() == newest


def test_each_routing_change_is_an_event_with_its_reason(store: Store) -> None:
    first = RoutingTable(primary="support-v3")
    second = RoutingTable(primary="support-v3", canary="support-v4", canary_weight=0.1)

    store.set_routing_table(first, reason="initial")
    store.set_routing_table(second, reason="canary step 1")

    events = store.events(kind="routing.changed")  # newest first
    assert [(e.reason, e.data) for e in events] == [
        ("canary step 1", second.as_dict()),
        ("initial", first.as_dict()),
    ]


# events


def test_an_event_keeps_its_kind_subject_reason_and_data(store: Store) -> None:
    store.record_event(
        "retrain.skipped", "drift held 2 of 3 checks", subject="support-v3",
        drift_score=0.41, checks=[True, True, False], window={"size": 200},
    )  # fmt: skip

    [event] = store.events()
    assert (event.kind, event.subject, event.reason, event.data) == (
        "retrain.skipped",
        "support-v3",
        "drift held 2 of 3 checks",
        {"drift_score": 0.41, "checks": [True, True, False], "window": {"size": 200}},
    )


def test_events_are_filtered_by_kind_newest_first(store: Store) -> None:
    store.record_event("rollout.started", "first")
    store.record_event("retrain.skipped", "other kind")
    store.record_event("rollout.started", "second")

    assert [e.reason for e in store.events(kind="rollout.started")] == ["second", "first"]


# the database itself


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_sqlite_runs_in_wal_mode(store: Store) -> None:
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_two_stores_on_one_database_see_each_others_writes(store_url: str) -> None:
    gateway_a, gateway_b = Store(store_url), Store(store_url)
    try:
        recorded = exchange()
        gateway_a.record_exchanges([recorded])
        gateway_b.set_routing_table(RoutingTable(primary="support-v3"), reason="initial")

        assert gateway_b.get_exchange(recorded["id"]) is not None
        assert gateway_a.routing_table() == RoutingTable(primary="support-v3")
    finally:
        gateway_a.close()
        gateway_b.close()


# the recorder


async def test_the_recorder_writes_everything_submitted_once_flushed(
    store: Store, tmp_path: Path
) -> None:
    recorder = ExchangeRecorder(store, SpillFile(tmp_path / "spill.jsonl"), max_batch=16)
    recorder.start()
    try:
        submitted = [exchange() for _ in range(100)]
        for record in submitted:
            recorder.submit(record)

        await recorder.flush()

        assert count(store, Exchange) == 100
        assert all(store.get_exchange(record["id"]) is not None for record in submitted)
    finally:
        await recorder.stop(30.0)


async def test_one_row_the_store_refuses_loses_only_itself(store: Store, tmp_path: Path) -> None:
    taken = exchange()
    store.record_exchanges([taken])
    failures = REGISTRY.get_sample_value("tunewatch_store_write_failures_total") or 0.0
    good = [exchange(), exchange()]
    recorder = ExchangeRecorder(store, SpillFile(tmp_path / "spill.jsonl"), linger_s=0.05)
    recorder.start()
    try:
        for record in (good[0], dict(taken, prompt="a second row under a taken id"), good[1]):
            recorder.submit(record)
        await recorder.flush()
    finally:
        await recorder.stop(30.0)
    assert all(store.get_exchange(record["id"]) is not None for record in good)
    assert store.get_exchange(taken["id"]).prompt == taken["prompt"]
    assert REGISTRY.get_sample_value("tunewatch_store_write_failures_total") == failures + 1


def test_text_with_a_nul_is_stored_on_both_databases(store: Store) -> None:
    record = exchange(prompt=storable("before\x00after"), response=storable("\x00"))
    store.record_exchanges([record])
    assert store.get_exchange(record["id"]).prompt == "before\ufffdafter"


async def test_the_recorder_writes_a_shadow_submitted_after_its_parent(
    store: Store, tmp_path: Path
) -> None:
    recorder = ExchangeRecorder(store, SpillFile(tmp_path / "spill.jsonl"))
    recorder.start()
    try:
        parent = exchange()
        recorder.submit(parent)
        recorder.submit(exchange(route="shadow", parent_id=parent["id"]))

        await recorder.flush()

        assert count(store, Exchange) == 2
    finally:
        await recorder.stop(30.0)


async def test_stopping_the_recorder_loses_nothing_queued(store: Store, tmp_path: Path) -> None:
    recorder = ExchangeRecorder(store, SpillFile(tmp_path / "spill.jsonl"))
    recorder.start()
    for _ in range(500):
        recorder.submit(exchange())

    await recorder.stop(30.0)

    assert count(store, Exchange) == 500


def test_a_database_with_tables_of_no_release_is_refused_naming_them(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, path TEXT)")
    with pytest.raises(SchemaMismatchError, match=r"holds the tables adapters but matches no"):
        Store(f"sqlite:///{path}")


def test_a_new_sqlite_database_and_its_wal_are_private(tmp_path) -> None:
    path = tmp_path / "private.db"
    store = Store(f"sqlite:///{path}")
    store.record_exchanges([exchange()])
    try:
        for each in (path, path.with_name("private.db-wal")):
            assert each.stat().st_mode & 0o777 == 0o600, each
    finally:
        store.close()
