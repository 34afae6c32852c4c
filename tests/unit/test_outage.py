"""The database fails under a running controller: a real PostgreSQL stopped for 15 s, a real
SQLite file locked by another connection past its busy timeout. The daemon (the scheduler
with a training job runner, its trainer child training meanwhile) must survive, stop its
jobs while it cannot renew its lease, lead again once the database answers, and settle the
job the trainer finished during the outage. No engine and no stack, so among the unit
tests (PostgreSQL's, like the store's, marked slow). The figures are printed (run with -s)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from controller.scheduler import PeriodicJob, Scheduler
from retrain.jobs import RetrainConfig, TrainingRunner, get_job, queue_job
from retrain.training.spec import TrainingConfig
from store import Store
from tests.conftest import postgres_cluster
from tests.unit.views import exchange_record
from tunewatch import stack
from tunewatch.settings import load_settings

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))
TTL_S = 3.0  # renewed every second
OUTAGE_S = 15.0
TRAINING_S = 4.0  # the trainer child finishes during the outage


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return stack.prepare(load_settings())[0]


def seeded(url: str) -> Store:
    """A store with labelled exchanges to train on."""
    store = Store(url)
    store.record_exchanges([exchange_record(n, prompt=f"What is {n} plus 1?") for n in range(12)])
    for n in range(12):
        store.add_feedback(f"x{n:04d}", str(n + 1), None)
    return store


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `check()` holds; fails after `timeout_s`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"not in {timeout_s} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class Ticks:
    def __init__(self) -> None:
        self.runs: list[float] = []

    async def __call__(self) -> None:
        self.runs.append(time.monotonic())


async def survive(
    store: Store,
    config: RetrainConfig,
    fail: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
    label: str,
) -> None:
    """Run the daemon, fail the database once the trainer runs, recover it; check and print."""
    ticks, runner = Ticks(), TrainingRunner(store, config)
    scheduler = Scheduler(
        store,
        [PeriodicJob("tick", ticks, 0.2), PeriodicJob("training", runner.tick, 0.5)],
        holder="daemon",
        lease_ttl_s=TTL_S,
    )
    task = asyncio.create_task(scheduler.run())
    try:
        await until(lambda: scheduler.leading, 30, "leading")
        job_id = queue_job(store, "an outage test", None)
        log = config.jobs_dir / f"job-{job_id}" / "trainer.log"
        await until(lambda: log.exists() and "spec read" in log.read_text(), 60, "training")
        failed = time.monotonic()
        await fail()
        standby_s = await until(lambda: not scheduler.leading, TTL_S, "jobs stopped")
        stopped_runs = len(ticks.runs)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - failed)))
        assert not task.done(), "the daemon died"
        assert len(ticks.runs) <= stopped_runs + 1  # no jobs ran while not leading
        await recover()
        leading_s = await until(lambda: scheduler.leading, 30, "leading again")
        await until(lambda: len(ticks.runs) > stopped_runs + 2, 10, "jobs running again")
        settled_s = await until(
            lambda: get_job(store, job_id).status != "running", 30, "the job settled"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    job = get_job(store, job_id)
    assert job.status == "succeeded", job.error
    kinds = [e.kind for e in reversed(store.events(kind_prefix="scheduler."))]
    assert kinds == ["scheduler.leading", "scheduler.standby", "scheduler.leading"]
    [standby] = store.events(kind="scheduler.standby")
    assert standby.reason.startswith("the lease could not be renewed: ")
    print(
        f"\n{label}: outage {OUTAGE_S:.0f} s, lease ttl {TTL_S:.0f} s: jobs stopped "
        f"{standby_s:.2f} s after the failure; leading again {leading_s:.2f} s after the "
        f"database returned; job {job_id} settled ({job.status}) {leading_s + settled_s:.2f} s "
        f"after it returned; standby reason: {standby.reason!r}"
    )


@pytest.fixture
def config(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Store], RetrainConfig]:
    """The training jobs' config for a store: the fake trainer, training TRAINING_S."""
    monkeypatch.setenv("FAKE_TRAINER", "slow")
    monkeypatch.setenv("FAKE_TRAINER_SLEEP_S", str(TRAINING_S))

    def of(store: Store) -> RetrainConfig:
        return RetrainConfig(
            model_dir=model_dir,
            jobs_dir=tmp_path / "training",
            database_url=store.engine.url.render_as_string(hide_password=False),
            training=TrainingConfig(max_length=64),
            family="support",
            launcher=(sys.executable, FAKE_TRAINER),
        )

    return of


@pytest.mark.slow
async def test_postgresql_stopped_for_a_while_kills_nothing_and_the_leader_resumes(
    config: Callable[[Store], RetrainConfig],
) -> None:
    with postgres_cluster() as cluster:
        store = seeded(cluster.url)
        try:
            await survive(
                store,
                config(store),
                lambda: asyncio.to_thread(cluster.stop),
                lambda: asyncio.to_thread(cluster.start),
                "PostgreSQL stopped (pg_ctl stop -m fast)",
            )
        finally:
            store.close()


async def test_sqlite_locked_past_its_busy_timeout_kills_nothing_and_the_leader_resumes(
    tmp_path: Path, config: Callable[[Store], RetrainConfig]
) -> None:
    database = tmp_path / "tunewatch.db"
    store = seeded(f"sqlite:///{database}")
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)

    async def lock() -> None:
        holder.execute("BEGIN EXCLUSIVE")

    async def unlock() -> None:
        holder.execute("ROLLBACK")

    try:
        await survive(
            store, config(store), lock, unlock, "SQLite write-locked by another connection"
        )
    finally:
        holder.close()
        store.close()
