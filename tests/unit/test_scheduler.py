"""The scheduler: jobs stored once in the database, kept across restarts, one leader per DB."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from controller.scheduler import LEASE, PeriodicJob, Scheduler
from store import Store, events


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'scheduler.db'}")


class Counter:
    def __init__(self) -> None:
        self.runs: list[float] = []

    async def __call__(self) -> None:
        self.runs.append(time.monotonic())


def stored_jobs(store: Store) -> dict[str, datetime]:
    """Job id -> next run time, as APScheduler's job store holds them."""
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, next_run_time FROM apscheduler_jobs"))
        return {row.id: datetime.fromtimestamp(row.next_run_time, UTC) for row in rows}


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_job_runs_on_its_interval_and_is_stored_once_by_name(store: Store) -> None:
    tick = Counter()
    scheduler = Scheduler(store, [PeriodicJob("tick", tick, 0.2)], lease_ttl_s=3)
    async with running(scheduler):
        await until(lambda: len(tick.runs) >= 3)
    assert list(stored_jobs(store)) == ["tick"]


async def test_only_the_jobs_name_is_pickled_into_the_database(store: Store) -> None:
    scheduler = Scheduler(store, [PeriodicJob("tick", Counter(), 60)], lease_ttl_s=3)
    async with running(scheduler):
        await until(lambda: scheduler.leading)
    with store.engine.connect() as connection:
        state = pickle.loads(connection.scalar(text("SELECT job_state FROM apscheduler_jobs")))
    assert state["func"] == "controller.scheduler:run_job" and state["args"] == ("tick",)


async def test_a_restart_keeps_the_next_run_time_and_adds_no_second_copy(store: Store) -> None:
    first = Scheduler(store, [PeriodicJob("hourly", Counter(), 3600)], lease_ttl_s=3)
    async with running(first):
        await until(lambda: first.leading)
        await asyncio.sleep(0.2)  # its first run (now) has happened: the next is an hour away
    planned = stored_jobs(store)["hourly"]
    assert planned > datetime.now(UTC) + timedelta(minutes=59)
    again = Counter()
    second = Scheduler(store, [PeriodicJob("hourly", again, 3600)], lease_ttl_s=3)
    async with running(second):
        await until(lambda: second.leading)
        await asyncio.sleep(0.3)
    assert stored_jobs(store) == {"hourly": planned}
    assert again.runs == []  # not due: a restart does not run everything at once


async def test_runs_missed_while_down_are_coalesced_into_one(store: Store) -> None:
    first = Scheduler(store, [PeriodicJob("often", Counter(), 1)], lease_ttl_s=3)
    async with running(first):
        await until(lambda: first.leading)
    # The daemon was down for a minute: 60 runs of a 1-second job were missed.
    with store.engine.begin() as connection:
        missed = (datetime.now(UTC) - timedelta(seconds=60)).timestamp()
        connection.execute(text("UPDATE apscheduler_jobs SET next_run_time = :t"), {"t": missed})
    tick = Counter()
    second = Scheduler(store, [PeriodicJob("often", tick, 1)], lease_ttl_s=3)
    async with running(second):
        await until(lambda: len(tick.runs) >= 1)
        await asyncio.sleep(0.5)  # the next regular run is a second away
    assert len(tick.runs) == 1


async def test_a_job_that_fails_does_not_stop_the_others(store: Store) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    tick = Counter()
    jobs = [PeriodicJob("broken", broken, 0.1), PeriodicJob("tick", tick, 0.1)]
    async with running(Scheduler(store, jobs, lease_ttl_s=3)):
        await until(lambda: len(tick.runs) >= 3)


async def test_a_job_this_version_no_longer_has_is_removed_from_the_store(store: Store) -> None:
    old = Scheduler(store, [PeriodicJob("retired", Counter(), 60)], lease_ttl_s=3)
    async with running(old):
        await until(lambda: old.leading)
    new = Scheduler(store, [PeriodicJob("kept", Counter(), 60)], lease_ttl_s=3)
    async with running(new):
        await until(lambda: new.leading)
    assert list(stored_jobs(store)) == ["kept"]


async def test_a_second_daemon_on_the_same_database_waits_then_takes_over(store: Store) -> None:
    first_runs, second_runs = Counter(), Counter()
    first = Scheduler(store, [PeriodicJob("tick", first_runs, 0.1)], holder="a", lease_ttl_s=3)
    second = Scheduler(store, [PeriodicJob("tick", second_runs, 0.1)], holder="b", lease_ttl_s=3)
    async with running(first):
        await until(lambda: first.leading)
        async with running(second):
            await asyncio.sleep(1.5)
            assert not second.leading and second_runs.runs == []
            assert first_runs.runs
        async with running(second):
            await asyncio.sleep(0.3)
            assert not second.leading
    # The first stopped and released its lease: the second leads from its next look.
    async with running(second):
        await until(lambda: second.leading and len(second_runs.runs) >= 2)


def test_the_lease_is_held_renewed_refused_and_taken_once_expired(store_url: str) -> None:
    store = Store(store_url)
    assert store.acquire_lease(LEASE, "a", ttl_s=0.5)
    assert store.acquire_lease(LEASE, "a", ttl_s=0.5)  # renewal
    assert not store.acquire_lease(LEASE, "b", ttl_s=0.5)
    time.sleep(0.6)
    assert store.acquire_lease(LEASE, "b", ttl_s=30)  # a's lapsed
    assert not store.acquire_lease(LEASE, "a", ttl_s=30)
    store.release_lease(LEASE, "a")  # not a's to release: no effect
    assert not store.acquire_lease(LEASE, "a", ttl_s=30)
    store.release_lease(LEASE, "b")
    assert store.acquire_lease(LEASE, "a", ttl_s=30)
    store.close()


@pytest.mark.parametrize("skew", [timedelta(hours=-1), timedelta(hours=1)])
def test_the_leases_expiry_is_the_databases_clock_not_the_callers(
    store_url: str, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    """A holder whose clock runs an hour behind must not write a lease already expired; one
    whose clock runs an hour ahead must not take a lease still held."""
    store = Store(store_url)
    skewed = lambda: datetime.now(UTC) + skew  # noqa: E731
    with monkeypatch.context() as clock:
        clock.setattr(events, "utcnow", skewed)
        if skew < timedelta(0):
            assert store.acquire_lease(LEASE, "behind", ttl_s=60)
    if skew < timedelta(0):
        assert not store.acquire_lease(LEASE, "on-time", ttl_s=60)
    else:
        assert store.acquire_lease(LEASE, "on-time", ttl_s=60)
        with monkeypatch.context() as clock:
            clock.setattr(events, "utcnow", skewed)
            assert not store.acquire_lease(LEASE, "ahead", ttl_s=60)
    with store.engine.connect() as connection:
        expires = connection.scalar(text("SELECT expires_at FROM leases"))
    if isinstance(expires, str):  # SQLite's text
        expires = datetime.fromisoformat(expires).replace(tzinfo=UTC)
    assert abs(expires - (datetime.now(UTC) + timedelta(seconds=60))) < timedelta(seconds=10)
    store.close()


LOCKED = "OperationalError: database is locked"


def locked(statement: str) -> OperationalError:
    return OperationalError(statement, {}, sqlite3.OperationalError("database is locked"))


async def test_a_failing_lease_call_means_not_leading_and_the_loop_leads_again_after(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    tick = Counter()
    scheduler = Scheduler(store, [PeriodicJob("tick", tick, 0.1)], holder="a", lease_ttl_s=0.6)
    acquire, down = store.acquire_lease, False

    def flaky(*args: object) -> bool:
        if down:
            raise locked("UPDATE leases")
        return acquire(*args)

    monkeypatch.setattr(store, "acquire_lease", flaky)
    async with running(scheduler) as task:
        await until(lambda: scheduler.leading and len(tick.runs) >= 2)
        down = True
        await until(lambda: not scheduler.leading)
        stopped = len(tick.runs)
        await asyncio.sleep(1.0)  # several failed renewals
        assert not task.done()
        assert len(tick.runs) <= stopped + 1  # at most the run that was due as it stopped
        down = False
        await until(lambda: scheduler.leading and len(tick.runs) >= stopped + 3)
    kinds = [(e.kind, e.reason) for e in reversed(store.events(kind_prefix="scheduler."))]
    assert kinds == [
        ("scheduler.leading", "took the scheduler lease"),
        (
            "scheduler.standby",
            "the lease could not be renewed: OperationalError: database is locked",
        ),
        ("scheduler.leading", "took the scheduler lease"),
    ]


async def test_a_lease_call_that_does_not_answer_stops_the_jobs_before_the_lease_expires(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = Scheduler(store, [PeriodicJob("tick", Counter(), 60)], holder="a", lease_ttl_s=1.5)
    acquire, hanging = store.acquire_lease, False

    def slow(*args: object) -> bool:
        while hanging:
            time.sleep(0.05)
        return acquire(*args)

    monkeypatch.setattr(store, "acquire_lease", slow)
    async with running(scheduler):
        await until(lambda: scheduler.leading)
        renewed = time.monotonic()  # at the latest: the lease runs until then + 1.5 s
        hanging = True
        try:
            await until(lambda: not scheduler.leading, timeout_s=1.5)
            assert time.monotonic() - renewed < 1.5
        finally:
            hanging = False
        await until(lambda: scheduler.leading)


async def test_a_job_store_that_fails_writing_a_next_run_time_does_not_stop_the_jobs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    tick, failures = Counter(), [locked("UPDATE apscheduler_jobs")]
    update_job = SQLAlchemyJobStore.update_job

    def flaky(self: SQLAlchemyJobStore, job: object) -> None:
        if failures:
            raise failures.pop()
        update_job(self, job)

    monkeypatch.setattr(SQLAlchemyJobStore, "update_job", flaky)
    scheduler = Scheduler(store, [PeriodicJob("tick", tick, 0.1)], lease_ttl_s=0.6)
    async with running(scheduler):
        await until(lambda: len(tick.runs) >= 3)
    assert not failures


def test_two_jobs_may_not_share_a_name(store: Store) -> None:
    with pytest.raises(ValueError, match="unique"):
        Scheduler(store, [PeriodicJob("x", Counter(), 1), PeriodicJob("x", Counter(), 2)])
