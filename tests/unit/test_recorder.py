"""The recorder loses nothing: a full queue and an unreachable store spill to a local file,
which goes into the store at the next start (or as soon as the store is back), and a stop
writes or spills everything by its deadline."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.exc import OperationalError

from serving.exchange import ExchangeDraft
from serving.protocol import ChatCompletionRequest
from serving.recorder import ExchangeRecorder
from serving.spill import SpillFile
from store import Store
from store.exchanges import Exchange

QUESTION = "Wie setze ich mein Passwort zurück? 🔑"


def exchange(parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """An exchange as the gateway records it (a shadow replay of `parent`, if given)."""
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": QUESTION}], temperature=0.2
    )
    draft = ExchangeDraft(
        "chat.completions",
        request,
        route="shadow" if parent else "primary",
        adapter="v1",
        parent_id=parent["id"] if parent else None,
        user="user-17",
    )
    draft.absorb_response(
        {
            "choices": [
                {
                    "message": {"content": "Öffne die Einstellungen."},
                    "logprobs": {"content": [{"token": "Ö", "logprob": -0.1234567890123}]},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 14, "completion_tokens": 5},
        }
    )
    return draft.record(200)


class FlakyStore(Store):
    """A real store whose writes fail as an unreachable database's do while `reachable` is off."""

    reachable = True

    def record_exchanges(self, exchanges: list[dict[str, Any]]) -> None:
        if not self.reachable:
            refused = ConnectionRefusedError("connection refused")
            raise OperationalError("INSERT INTO exchanges ...", None, refused)
        super().record_exchanges(exchanges)


class HungStore(Store):
    """A store whose writes hang until `released` is set, and then fail."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.released = threading.Event()

    def record_exchanges(self, exchanges: list[dict[str, Any]]) -> None:
        self.released.wait()
        raise OperationalError("INSERT INTO exchanges ...", None, TimeoutError("timed out"))


@pytest.fixture
def store(store_url: str) -> Iterator[FlakyStore]:
    store = FlakyStore(store_url)
    yield store
    store.close()


@pytest.fixture
def spill(tmp_path: Path) -> SpillFile:
    return SpillFile(tmp_path / "spill" / "exchanges.jsonl")


def recorder(store: Store, spill: SpillFile, **options: Any) -> ExchangeRecorder:
    return ExchangeRecorder(store, spill, backoff_s=0.01, replay_interval_s=0.05, **options)


def stored(store: Store, exchange_id: str) -> dict[str, Any] | None:
    row = store.get_exchange(exchange_id)
    if row is None:
        return None
    # As it was submitted: `recorded_at` is the store's own stamp of when the row was written.
    columns = [c.name for c in Exchange.__table__.columns if c.name != "recorded_at"]
    return {name: getattr(row, name) for name in columns}


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def replayed(spill: SpillFile) -> None:
    """Wait until the recorder has replayed the spill file (it does so on its own task)."""
    for _ in range(500):
        if not spill.holds_rows():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{spill.path} was never replayed")


def spilled_ids(spill: SpillFile) -> list[str]:
    """The ids in the spill, in the order a replay reads them."""
    files = [f for f in (spill.replay_path, spill.path) if f.exists()]
    return [json.loads(line)["id"] for f in files for line in f.read_text().splitlines()]


def test_an_exchange_reads_back_from_the_spill_as_the_dict_that_was_spilled(
    spill: SpillFile,
) -> None:
    parent = exchange()
    rows = [parent, exchange(parent), dict(exchange(), response=None, mean_logprob=None)]
    spill.append(rows)
    assert spill.take()
    assert list(spill.rows()) == rows
    assert all(json.loads(line) for line in spill.replay_path.read_text().splitlines())


def test_the_spill_file_is_private(spill: SpillFile) -> None:
    spill.append([exchange()])
    assert spill.path.stat().st_mode & 0o777 == 0o600


async def test_a_full_queue_spills_and_the_rows_come_back_at_the_next_start(
    store: FlakyStore, spill: SpillFile
) -> None:
    full = counted("tunewatch_recorder_spilled_total", reason="queue_full")
    first = recorder(store, spill, queue_max=3)  # not started: nothing leaves its queue
    submitted = [exchange() for _ in range(8)]
    for record in submitted:
        first.submit(record)
    assert REGISTRY.get_sample_value("tunewatch_recorder_queue_depth") == 3
    assert counted("tunewatch_recorder_spilled_total", reason="queue_full") == full + 5
    assert spilled_ids(spill) == [record["id"] for record in submitted[3:]]
    await first.stop(timeout_s=0.05)  # the three queued are spilled behind them
    assert len(spilled_ids(spill)) == 8

    again = recorder(store, spill)
    again.start()
    await replayed(spill)
    await again.stop(timeout_s=5)

    assert [stored(store, record["id"]) for record in submitted] == submitted


async def test_a_store_that_cannot_be_reached_spills_everything_and_loses_nothing(
    store: FlakyStore, spill: SpillFile
) -> None:
    unreachable = counted("tunewatch_recorder_spilled_total", reason="store_unreachable")
    behind = counted("tunewatch_recorder_spilled_total", reason="behind_spill")
    lost = counted("tunewatch_store_write_failures_total")
    store.reachable = False
    running = recorder(store, spill, max_batch=4)
    running.start()
    parent = exchange()
    submitted = [parent, exchange(parent), *(exchange() for _ in range(10))]
    try:
        for record in submitted:
            running.submit(record)
        await running.flush()

        assert store.count_exchanges() == 0
        # (a set: a failing replay may be moving rows from one of its files to the other)
        assert set(spilled_ids(spill)) == {record["id"] for record in submitted}
        spilled = counted("tunewatch_recorder_spilled_total", reason="store_unreachable")
        spilled += counted("tunewatch_recorder_spilled_total", reason="behind_spill")
        assert spilled == unreachable + behind + 12
        assert counted("tunewatch_store_write_failures_total") == lost

        store.reachable = True  # the database is back: the spill goes in without a restart
        await replayed(spill)
    finally:
        await running.stop(timeout_s=5)
    assert [stored(store, record["id"]) for record in submitted] == submitted
    assert counted("tunewatch_store_write_failures_total") == lost


async def test_replay_at_start_writes_the_spill_and_removes_it(
    store: FlakyStore, spill: SpillFile
) -> None:
    parent, other = exchange(), exchange()
    shadow = exchange(parent)
    store.record_exchanges([other])  # written, but its answer was lost: spilled too
    spill.append([shadow, other])  # a shadow spilled before its parent
    spill.append([parent, shadow])  # and once more (a stop cut its append short)
    before = counted("tunewatch_recorder_replayed_total")
    lost = counted("tunewatch_store_write_failures_total")

    running = recorder(store, spill)
    running.start()
    await replayed(spill)
    await running.stop(timeout_s=5)

    assert not spill.path.exists() and not spill.replay_path.exists()
    assert [stored(store, e["id"]) for e in (parent, shadow, other)] == [parent, shadow, other]
    assert store.count_exchanges() == 3
    assert counted("tunewatch_recorder_replayed_total") == before + 2
    assert counted("tunewatch_store_write_failures_total") == lost


async def test_a_replay_the_store_refuses_keeps_the_spill_for_the_next_try(
    store: FlakyStore, spill: SpillFile
) -> None:
    record = exchange()
    spill.append([record])
    store.reachable = False
    running = recorder(store, spill)
    running.start()
    await asyncio.sleep(0.1)  # a replay or two, refused
    await running.stop(timeout_s=5)
    assert spill.holds_rows()
    assert store.get_exchange(record["id"]) is None

    store.reachable = True
    again = recorder(store, spill)
    again.start()
    await replayed(spill)
    await again.stop(timeout_s=5)
    assert stored(store, record["id"]) == record


async def test_stop_spills_what_it_cannot_write_by_its_deadline(
    store_url: str, spill: SpillFile
) -> None:
    hung = HungStore(store_url)
    running = recorder(hung, spill)
    running.start()
    submitted = [exchange() for _ in range(5)]
    try:
        for record in submitted:
            running.submit(record)
        await asyncio.wait_for(running.stop(timeout_s=0.2), timeout=5)
        late = exchange()
        running.submit(late)  # after the stop: straight to the spill
        assert spill.take()
        assert list(spill.rows()) == [*submitted, late]
    finally:
        hung.released.set()
        hung.close()
