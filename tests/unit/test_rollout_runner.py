"""The rollout job on a fake engine: start, looks, promotion, rollback, people's commands."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import retrain.metrics  # noqa: F401  (declares the trigger's and the training jobs' counters)
from registry.versions import register, set_status, versions
from rollout import control
from rollout import runner as runner_module
from rollout.guards.types import GuardConfig
from rollout.machine import RolloutConfig, RolloutRefusal
from rollout.runner import RolloutRunner, RunnerConfig
from serving.engine import EngineClient
from store import Store
from store.adapters import RoutingTable
from tests.unit.conftest import ENGINE_URL, FakeEngine, write_adapter
from tests.unit.views import exchange_record

FAST = RunnerConfig(
    rollout=RolloutConfig(
        shadow_min_pairs=5, step_min_samples=3, stage_min_s=0.0, stage_deadline_s=600.0,
        guards=GuardConfig(min_samples=20),
    ),
    metric="exact_match",
    drain_s=0.0,
)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'rollout.db'}")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def runner(store: Store, engine: FakeEngine) -> RolloutRunner:
    return RolloutRunner(store, EngineClient(ENGINE_URL, transport=engine.transport()), FAST)


@pytest.fixture
def candidate(store: Store, tmp_path: Path) -> str:
    return register(store, "support", write_adapter(tmp_path / "c", b"c"), reason="trained").name


def traffic(store: Store, candidate: str, route: str, n: int, *, status: str = "ok") -> None:
    """n primary answers, each mirrored or mirrored-by-canary on the candidate (ending with
    `status`), labelled."""
    rows = []
    for _ in range(n):
        now, primary_id = datetime.now(UTC), uuid.uuid4().hex
        rows.append(exchange_record(0, id=primary_id, created_at=now, response="Paris",
                                    latency_seconds=random.lognormvariate(0, 0.3)))  # fmt: skip
        rows.append(exchange_record(
            0, id=uuid.uuid4().hex, adapter=candidate, route=route, created_at=now,
            parent_id=primary_id if route == "shadow" else None, response="Paris",
            status=status, latency_seconds=random.lognormvariate(0, 0.3),
        ))  # fmt: skip
    store.record_exchanges(rows)
    for row in rows[::2]:
        store.add_feedback(row["id"], "Paris", None)


def status_of(store: Store, name: str) -> str:
    return next(v.status for v in versions(store) if v.name == name)


def tick(runner: RolloutRunner) -> None:
    asyncio.run(runner.tick())


def test_a_new_candidate_is_loaded_and_started_in_shadow(
    runner: RolloutRunner, store: Store, engine: FakeEngine, candidate: str
):
    tick(runner)
    active = control.active_rollout(store)
    assert active is not None and (active.candidate, active.stage) == (candidate, "shadow")
    assert candidate in engine.loaded
    assert store.routing_table() == RoutingTable(shadow=candidate, shadow_fraction=0.5)
    assert status_of(store, candidate) == "shadow"
    [started] = store.events(kind="rollout.started")
    assert started.subject == f"rollout-{active.id}" and started.data["candidate"] == candidate


def test_an_adapter_the_engine_refuses_fails_the_start_and_routes_nothing(
    runner: RolloutRunner, store: Store, engine: FakeEngine, candidate: str
):
    engine.lists_loaded_adapters = False  # vLLM accepts the load but never serves it
    tick(runner)
    assert control.active_rollout(store) is None
    assert status_of(store, candidate) == "failed"
    assert store.routing_table() is None
    [refused] = store.events(kind="rollout.refused")
    assert "does not list it" in refused.reason


def test_a_good_candidate_goes_through_every_step_to_primary(
    runner: RolloutRunner, store: Store, candidate: str
):
    tick(runner)
    traffic(store, candidate, "shadow", 25)
    tick(runner)
    stages = []
    for _ in FAST.rollout.steps:
        active = control.active_rollout(store)
        assert active is not None
        stages.append((active.stage, active.weight))
        traffic(store, candidate, "canary", 5)
        tick(runner)
    assert stages == [("canary", 0.05), ("canary", 0.25), ("canary", 0.5), ("canary", 1.0)]
    assert control.active_rollout(store) is None
    assert store.routing_table() == RoutingTable(primary=candidate)
    assert status_of(store, candidate) == "primary"
    events = list(reversed(store.events(kind_prefix="rollout.", limit=20)))
    assert [e.kind for e in events] == [
        "rollout.started",
        *["rollout.advanced"] * 4,
        "rollout.promoted",
    ]
    shadow = events[1].data  # the figures behind leaving shadow: 25 labelled pairs, all equal
    assert shadow["quality_pairs"] == 25 and shadow["agreement"] == 1.0
    assert "no pair of the 25 differs" in shadow["paired_test"]["reason"]


def test_too_few_answers_wait_and_say_what_is_missing(
    runner: RolloutRunner, store: Store, candidate: str
):
    tick(runner)
    traffic(store, candidate, "shadow", 2)
    tick(runner)
    active = control.active_rollout(store)
    assert active is not None and active.stage == "shadow"
    assert "waiting: 2 of 5 mirrored answers" in active.reason


def test_a_candidate_that_fails_every_request_is_rolled_back_and_drained(
    runner: RolloutRunner, store: Store, engine: FakeEngine, candidate: str
):
    tick(runner)
    traffic(store, candidate, "shadow", 40, status="error")
    tick(runner)  # the look rolls back; the drain is due at once (drain_s 0)
    assert control.active_rollout(store) is None
    assert store.routing_table() == RoutingTable()
    assert status_of(store, candidate) == "failed"
    [rolled] = store.events(kind="rollout.rolled_back")
    assert "error rate candidate 100.00%" in rolled.reason and "-> roll back" in rolled.reason
    tick(runner)
    assert candidate not in engine.loaded
    assert store.events(kind="adapter.unloaded")[0].subject == candidate


def test_shadows_a_shutdown_interrupted_are_not_the_candidate_s_errors(
    runner: RolloutRunner, store: Store, candidate: str
):
    tick(runner)
    traffic(store, candidate, "shadow", 40, status="interrupted")
    tick(runner)
    active = control.active_rollout(store)
    assert active is not None and active.stage == "shadow"
    assert "waiting: 0 of 5 mirrored answers" in active.reason
    assert status_of(store, candidate) == "shadow"


def test_promotion_retires_the_old_primary_and_unloads_it(
    runner: RolloutRunner, store: Store, engine: FakeEngine, tmp_path: Path
):
    old = register(store, "support", write_adapter(tmp_path / "old", b"old"), reason="v1").name
    set_status(store, old, "primary", "promoted earlier")
    engine.loaded.add(old)
    store.set_routing_table(RoutingTable(primary=old), reason="earlier")
    new = register(store, "support", write_adapter(tmp_path / "new", b"new"), reason="v2").name
    tick(runner)
    request = control.request(store, "promote", by="cli")
    tick(runner)
    assert control.get_command(store, request.id).status == "done"
    assert store.routing_table() == RoutingTable(primary=new)
    assert (status_of(store, old), status_of(store, new)) == ("retired", "primary")
    tick(runner)
    assert old not in engine.loaded and new in engine.loaded


def test_a_person_can_pause_resume_and_roll_back(
    runner: RolloutRunner, store: Store, candidate: str
):
    tick(runner)
    pause = control.request(store, "pause", by="cli")
    tick(runner)
    assert control.active_rollout(store).stage == "paused"
    assert store.routing_table() == RoutingTable(shadow=candidate, shadow_fraction=0.5)
    with pytest.raises(RolloutRefusal, match="already paused"):
        control.request(store, "pause", by="cli")
    control.request(store, "resume", by="cli")
    tick(runner)
    assert control.active_rollout(store).stage == "shadow"
    control.request(store, "rollback", by="admin api")
    tick(runner)
    assert control.get_command(store, pause.id).result.endswith("paused by hand")
    assert status_of(store, candidate) == "failed"
    with pytest.raises(RolloutRefusal, match="no rollout is in progress"):
        control.request(store, "promote", by="cli")


def test_one_rollout_at_a_time_and_only_candidates(
    store: Store, engine: FakeEngine, candidate: str, tmp_path: Path
):
    by_hand = replace(FAST, auto_start=False)
    runner = RolloutRunner(store, EngineClient(ENGINE_URL, transport=engine.transport()), by_hand)
    control.request(store, "start", adapter=candidate, by="cli")
    tick(runner)
    other = register(store, "other", write_adapter(tmp_path / "o", b"o"), reason="x").name
    with pytest.raises(RolloutRefusal, match="one rollout at a time"):
        control.request(store, "start", adapter=other, by="cli")
    control.request(store, "rollback", by="cli")
    tick(runner)
    with pytest.raises(RolloutRefusal, match="is failed: only a candidate"):
        control.request(store, "start", adapter=candidate, by="cli")
    with pytest.raises(RolloutRefusal, match="no adapter named 'ghost'"):
        control.request(store, "start", adapter="ghost", by="cli")


def test_a_restarted_controller_resumes_the_rollout_where_it_stood(
    store: Store, engine: FakeEngine, candidate: str
):
    first = RolloutRunner(store, EngineClient(ENGINE_URL, transport=engine.transport()), FAST)
    tick(first)
    traffic(store, candidate, "shadow", 25)
    tick(first)
    traffic(store, candidate, "canary", 5)
    tick(first)
    before = control.active_rollout(store)
    routing = store.routing_table()
    assert (before.stage, before.weight) == ("canary", 0.25)
    second = RolloutRunner(store, EngineClient(ENGINE_URL, transport=engine.transport()), FAST)
    tick(second)  # nothing new to see: it stays where the first left it
    after = control.active_rollout(store)
    assert (after.id, after.stage, after.weight) == (before.id, "canary", 0.25)
    assert store.routing_table() == routing


def test_a_stale_leaders_transition_is_dropped_not_written_over_a_newer_state(
    store: Store, engine: FakeEngine, candidate: str, monkeypatch: pytest.MonkeyPatch
):
    """The old leader decides to advance on what it read; meanwhile the new one has rolled the
    rollout back (a person asked). The old leader's advance must not bring it back to life."""
    stale = RolloutRunner(store, EngineClient(ENGINE_URL, transport=engine.transport()), FAST)
    leader = RolloutRunner(store, EngineClient(ENGINE_URL, transport=engine.transport()), FAST)
    tick(stale)
    rollout_id = control.active_rollout(store).id
    traffic(store, candidate, "shadow", 25)
    decide = runner_module.decide_rollout

    def decided_meanwhile(*args: object):
        transition = decide(*args)
        control.request(store, "rollback", by="cli")
        tick(leader)  # the new leader carries it out while the old one still holds its look
        return transition

    monkeypatch.setattr(runner_module, "decide_rollout", decided_meanwhile)
    assert stale.look(rollout_id).action == "none"
    monkeypatch.undo()
    rollout = control.get_rollout(store, rollout_id)
    assert rollout.stage == "rolled_back"
    assert store.routing_table() == RoutingTable()  # the baseline (the base model) alone
    assert status_of(store, candidate) == "failed"
    [dropped] = store.events(kind="rollout.stale")
    assert "-> canary step 1 of 4" in dropped.reason and dropped.data["action"] == "advance"
    assert not store.events(kind="rollout.advanced")


def test_a_look_that_fails_midway_reads_the_evidence_whole_at_the_next(
    runner: RolloutRunner, store: Store, candidate: str, monkeypatch: pytest.MonkeyPatch
):
    tick(runner)
    rollout_id = control.active_rollout(store).id
    traffic(store, candidate, "shadow", 3)
    runner.look(rollout_id)
    traffic(store, candidate, "shadow", 3)

    def broken(*_: object) -> float:
        raise RuntimeError("the scorer broke")

    with monkeypatch.context() as patched:  # after the new answers are taken, before pairing
        patched.setattr("rollout.evidence.answer_score", broken)
        with pytest.raises(RuntimeError):
            runner.look(rollout_id)
    assert runner.look(rollout_id).figures["shadow_pairs"] == 6


def test_a_new_candidate_waits_for_the_rollout_in_progress_then_starts_by_itself(
    runner: RolloutRunner, store: Store, candidate: str, tmp_path: Path
):
    tick(runner)
    later = register(store, "support", write_adapter(tmp_path / "l", b"l"), reason="x").name
    control.request(store, "rollback", by="cli")
    tick(runner)  # the rollback, then the next candidate in line
    active = control.active_rollout(store)
    assert active is not None and active.candidate == later


def test_an_engine_down_at_the_start_leaves_the_candidate_to_try_again(
    runner: RolloutRunner, store: Store, engine: FakeEngine, candidate: str
):
    engine.down = True
    tick(runner)
    assert control.active_rollout(store) is None
    assert status_of(store, candidate) == "candidate"  # not its fault: not failed
    engine.down = False
    tick(runner)
    assert control.active_rollout(store).candidate == candidate


def test_an_engine_down_at_the_drain_unloads_once_it_is_back(
    runner: RolloutRunner, store: Store, engine: FakeEngine, candidate: str
):
    tick(runner)
    control.request(store, "rollback", by="cli")
    engine.down = True
    tick(runner)  # the rollback is in the store; vLLM cannot be told yet
    assert store.routing_table() == RoutingTable()
    engine.down = False
    tick(runner)
    assert candidate not in engine.loaded


def test_the_loops_counters_start_at_zero_so_the_first_event_counts() -> None:
    for name, labels in (
        ("tunewatch_rollouts_total", {"outcome": "rolled_back"}),
        ("tunewatch_training_jobs_total", {"outcome": "failed"}),
        ("tunewatch_retrain_trigger_decisions_total", {"action": "retrain"}),
    ):
        assert REGISTRY.get_sample_value(name, labels) is not None, name


def test_two_controllers_starting_at_once_leave_one_rollout_in_progress(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A stale leader and the new one each see no rollout in progress and each start one (here
    of a candidate each, in threads): the database keeps one; the other start is refused as a
    start is while a rollout is in progress."""
    stores = [Store(store_url), Store(store_url)]
    try:
        names = [
            register(stores[0], family, write_adapter(tmp_path / family, b"w"), reason="x").name
            for family in ("support", "other")
        ]
        both_checked = threading.Barrier(2, timeout=30)
        check = control.start_refusal

        def checked_then_wait(store: Store, adapter: str) -> str | None:
            refusal = check(store, adapter)
            both_checked.wait()  # each has seen none in progress before either inserts
            return refusal

        monkeypatch.setattr(control, "start_refusal", checked_then_wait)
        outcomes: dict[str, int | RolloutRefusal] = {}

        def start(store: Store, adapter: str) -> None:
            engine = EngineClient(ENGINE_URL, transport=FakeEngine().transport())
            runner = RolloutRunner(store, engine, replace(FAST, auto_start=False))
            try:
                outcomes[adapter] = asyncio.run(runner.start(adapter, by="auto", reason="new"))
            except RolloutRefusal as exc:
                outcomes[adapter] = exc

        pairs = zip(stores, names, strict=True)
        threads = [threading.Thread(target=start, args=pair) for pair in pairs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        monkeypatch.undo()

        [winner] = [name for name, outcome in outcomes.items() if isinstance(outcome, int)]
        [refusal] = [outcome for outcome in outcomes.values() if isinstance(outcome, Exception)]
        active = control.active_rollout(stores[0])
        assert active is not None and (active.id, active.candidate) == (outcomes[winner], winner)
        assert str(refusal) == control.start_refusal(stores[0], names[0])
        assert "one rollout at a time" in str(refusal)
        assert [r.candidate for r in control.rollouts(stores[0])] == [winner]
        assert len(stores[0].events(kind="rollout.started")) == 1
    finally:
        for store in stores:
            store.close()
