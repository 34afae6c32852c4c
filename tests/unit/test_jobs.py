"""Training jobs: claimed once, trained in a child, registered or failed with the reason.

The child is tests/unit/fake_trainer.py (the real trainer's runs are in
tests/integration/test_trainer.py); the training set is built with the real model's
tokenizer, which `tunewatch model prepare` has put in the cache.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from registry.versions import versions
from retrain import jobs
from retrain.jobs import (
    RetrainConfig,
    TrainingRunner,
    active_job,
    cancel,
    claim,
    get_job,
    queue_job,
    run_in_foreground,
)
from retrain.training.spec import TrainingConfig
from store import Store
from tests.unit.conftest import write_adapter
from tests.unit.views import exchange_record
from tunewatch import stack
from tunewatch.settings import load_settings

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))
QUESTIONS = [f"What is {a} plus {b}?" for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return stack.prepare(load_settings())[0]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    records = [exchange_record(n, prompt=q) for n, q in enumerate(QUESTIONS)]
    store.record_exchanges(records)
    for n in range(len(QUESTIONS)):
        store.add_feedback(f"x{n:04d}", str(n), None)
    return store


@pytest.fixture
def config(tmp_path: Path, model_dir: Path, store: Store) -> RetrainConfig:
    return RetrainConfig(
        model_dir=model_dir, jobs_dir=tmp_path / "training", database_url=str(store.engine.url),
        training=TrainingConfig(max_length=64), family="support", launcher=(sys.executable,
        FAKE_TRAINER),
    )  # fmt: skip


def run_until_settled(runner: TrainingRunner, store: Store, job_id: int) -> None:
    deadline = time.monotonic() + 60
    while get_job(store, job_id).status in ("queued", "running"):
        assert time.monotonic() < deadline, "the job did not settle"
        asyncio.run(runner.tick())
        time.sleep(0.1)


def test_a_queued_job_is_claimed_once(store: Store) -> None:
    job_id = queue_job(store, "drift", None)
    assert claim(store, job_id)
    assert not claim(store, job_id)


def test_only_a_job_that_has_not_started_can_be_cancelled(store: Store) -> None:
    waiting, started = queue_job(store, "drift", None), queue_job(store, "drift", None)
    claim(store, started)
    assert cancel(store, waiting, "drift cleared")
    assert not cancel(store, started, "drift cleared")
    assert get_job(store, waiting).status == "cancelled"
    assert get_job(store, started).status == "running"


def test_a_successful_job_registers_a_candidate_with_its_lineage(
    store: Store, config: RetrainConfig
) -> None:
    job_id = queue_job(store, "drift held for 3 checks", None)
    run_until_settled(TrainingRunner(store, config), store, job_id)
    job = get_job(store, job_id)
    assert job.status == "succeeded" and job.adapter == "support-v1"
    [version] = versions(store)
    assert (version.name, version.status, version.job_id) == ("support-v1", "candidate", job_id)
    assert version.metrics["exact_match"] == 0.5 and version.metrics["base_exact_match"] == 0.0
    assert version.hyperparameters["max_length"] == 64
    trained_on = set(version.data["exchange_ids"])
    assert trained_on and trained_on <= {f"x{n:04d}" for n in range(len(QUESTIONS))}
    assert version.data["golden_prompts"] == []  # the golden set is the exam, not the lesson
    kinds = [e.kind for e in reversed(store.events(limit=20))]
    assert kinds == ["retrain.queued", "retrain.started", "adapter.registered", "retrain.succeeded"]


def test_a_job_continues_the_serving_adapter_and_keeps_its_family(
    store: Store, config: RetrainConfig, tmp_path: Path
) -> None:
    store.register_adapter("capitals-v3", str(write_adapter(tmp_path / "v3")), "f")
    job_id = queue_job(store, "drift", "capitals-v3")
    run_until_settled(TrainingRunner(store, config), store, job_id)
    job = get_job(store, job_id)
    spec = json.loads((config.jobs_dir / f"job-{job_id}" / "data" / "lineage.json").read_text())
    assert job.adapter == "capitals-v4" and spec["exchange_ids"]
    [version] = [v for v in versions(store) if v.name == "capitals-v4"]
    assert version.parent == "capitals-v3"


def test_no_labelled_data_fails_the_job_with_that_reason(tmp_path: Path, model_dir: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    config = RetrainConfig(
        model_dir=model_dir, jobs_dir=tmp_path / "training", database_url=str(store.engine.url),
        training=TrainingConfig(), family="support",
    )  # fmt: skip
    job_id = queue_job(store, "drift", None)
    run_until_settled(TrainingRunner(store, config), store, job_id)
    job = get_job(store, job_id)
    assert job.status == "failed" and "no labelled exchanges" in job.error
    assert versions(store) == []


def test_a_training_failure_is_recorded_with_the_trainers_reason(
    store: Store, config: RetrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER", "fail")
    job_id = queue_job(store, "drift", None)
    run_until_settled(TrainingRunner(store, config), store, job_id)
    assert get_job(store, job_id).error == "loss is nan"
    assert versions(store) == []
    [failed] = store.events(kind="retrain.failed")
    assert failed.reason == "loss is nan"


def test_a_trainer_that_dies_without_a_result_fails_the_job(
    store: Store, config: RetrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER", "crash")
    job_id = queue_job(store, "drift", None)
    run_until_settled(TrainingRunner(store, config), store, job_id)
    job = get_job(store, job_id)
    assert job.status == "failed" and "exited 3 without a result" in job.error


def test_a_restarted_daemon_adopts_the_running_trainer_and_settles_it(
    store: Store, config: RetrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TRAINER", "slow")
    job_id = queue_job(store, "drift", None)
    asyncio.run(TrainingRunner(store, config).tick())  # starts the child, then "dies"
    assert get_job(store, job_id).status == "running"
    successor = TrainingRunner(store, config)
    asyncio.run(successor.tick())
    assert get_job(store, job_id).status == "running"  # its child still trains: adopted
    run_until_settled(successor, store, job_id)
    assert get_job(store, job_id).status == "succeeded"


def lost_connection(statement: str) -> OperationalError:
    return OperationalError(statement, {}, ConnectionRefusedError("connection refused"))


def test_a_database_that_fails_as_the_trainer_starts_neither_stops_it_nor_fails_the_job(
    store: Store, config: RetrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database goes down the moment the child is started (its pid not yet recorded) and
    stays down while it trains: the daemon keeps the child, and settles it once it is back."""
    monkeypatch.setenv("FAKE_TRAINER", "slow")
    job_id = queue_job(store, "drift", None)
    session, popen, down = store.session, subprocess.Popen, False

    def failing_session():
        if down:
            raise lost_connection("SELECT training_jobs")
        return session()

    def popen_then_outage(*args, **kwargs):
        nonlocal down
        child = popen(*args, **kwargs)
        down = True
        return child

    monkeypatch.setattr(store, "session", failing_session)
    monkeypatch.setattr(jobs.subprocess, "Popen", popen_then_outage)
    runner = TrainingRunner(store, config)
    asyncio.run(runner.tick())  # claims, prepares, starts: then the database is gone
    for _ in range(3):
        with pytest.raises(OperationalError):
            asyncio.run(runner.tick())
    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    down = False
    run_until_settled(runner, store, job_id)
    assert get_job(store, job_id).status == "succeeded"
    [started] = store.events(kind="retrain.started")
    assert "pid" in started.reason


def test_a_settle_the_database_interrupts_registers_the_adapter_once(
    store: Store, config: RetrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered, then the database fails before the job is marked succeeded: settling again
    finds the adapter and does not register a second one."""
    job_id = queue_job(store, "drift", None)
    transition, failures = jobs._transition, [lost_connection("UPDATE training_jobs")]

    def failing_once(store, job_id, before, after, **values):
        if after == "succeeded" and failures:
            raise failures.pop()
        return transition(store, job_id, before, after, **values)

    monkeypatch.setattr(jobs, "_transition", failing_once)
    runner = TrainingRunner(store, config)
    with pytest.raises(OperationalError):
        run_until_settled(runner, store, job_id)
    run_until_settled(runner, store, job_id)
    assert get_job(store, job_id).status == "succeeded"
    assert [v.job_id for v in versions(store)] == [job_id]


def test_a_queued_job_waits_out_the_start_delay(store: Store, config: RetrainConfig) -> None:
    job_id = queue_job(store, "drift", None)
    asyncio.run(TrainingRunner(store, replace(config, start_delay_s=3600)).tick())
    assert get_job(store, job_id).status == "queued"


def test_a_job_by_hand_runs_in_the_foreground_and_leaves_nothing_active(
    store: Store, config: RetrainConfig
) -> None:
    job = run_in_foreground(store, config, "requested by hand", None)
    assert job.status == "succeeded" and job.adapter == "support-v1"
    assert active_job(store) is None
