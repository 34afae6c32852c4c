"""The database fails under a running controller: a real PostgreSQL stopped for 15 s, or gone
silent behind a proxy (connections accepted, nothing answered, none closed: packets dropped,
or a pooler with nothing behind it), a real SQLite file locked by another connection past its
busy timeout. The daemon (the scheduler
with a training job runner, its trainer child training meanwhile) must survive, stop its
jobs while it cannot renew its lease, lead again once the database answers, and settle the
job the trainer finished during the outage. No engine and no stack, so among the unit
tests (PostgreSQL's, like the store's, marked slow). The figures are printed (run with -s)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

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
# Silence lasts at most this long, then the proxy closes what went silent: a daemon or a call
# that waits for the answer forever (what this file guards against) fails its test instead of
# hanging it.
SILENCE_MAX_S = 30.0


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return stack.prepare(load_settings())[0]


def seeded(url: str, wait_s: float | None = None) -> Store:
    """A store with labelled exchanges to train on."""
    store = Store(url, wait_s)
    store.record_exchanges([exchange_record(n, prompt=f"What is {n} plus 1?") for n in range(12)])
    for n in range(12):
        store.add_feedback(f"x{n:04d}", str(n + 1), None)
    return store


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `check()` holds; fails after `timeout_s`, also when it held at last but
    the loop, held up meanwhile, saw it late."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"not in {timeout_s} s: {what}"
        await asyncio.sleep(0.05)
    took = time.monotonic() - started
    assert took < timeout_s, f"{what} after {took:.2f} s, not in {timeout_s} s"
    return took


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
    ttl_s: float = TTL_S,
) -> None:
    """Run the daemon, fail the database once the trainer runs, recover it; check and print."""
    ticks, runner = Ticks(), TrainingRunner(store, config)
    scheduler = Scheduler(
        store,
        [PeriodicJob("tick", ticks, 0.2), PeriodicJob("training", runner.tick, 0.5)],
        holder="daemon",
        lease_ttl_s=ttl_s,
    )
    task = asyncio.create_task(scheduler.run())
    try:
        await until(lambda: scheduler.leading, 30, "leading")
        job_id = queue_job(store, "an outage test", None)
        log = config.jobs_dir / f"job-{job_id}" / "trainer.log"
        await until(lambda: log.exists() and "spec read" in log.read_text(), 60, "training")
        failed = time.monotonic()
        await fail()
        standby_s = await until(lambda: not scheduler.leading, ttl_s, "jobs stopped")
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
        f"\n{label}: outage {OUTAGE_S:.0f} s, lease ttl {ttl_s:.0f} s: jobs stopped "
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


class SilencingProxy:
    """A TCP proxy on 127.0.0.1 in front of a server that can go silent: while silent it
    accepts connections, forwards nothing either way (what it reads is lost) and closes
    none, as a network dropping packets or a pooler with no server behind it would."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._silent = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        """Silent until `forward()`, or SILENCE_MAX_S at most."""
        self._silent.set()
        self._limit = threading.Timer(SILENCE_MAX_S, self._give_up)
        self._limit.daemon = True
        self._limit.start()

    def forward(self) -> None:
        """New connections go through again; those that went silent stay so."""
        self._limit.cancel()
        self._silent.clear()

    def close(self) -> None:
        self._listener.close()
        self._close_connections()

    def _give_up(self) -> None:
        self._close_connections()
        self.forward()

    def _close_connections(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                client, _ = self._listener.accept()
                self._sockets.append(client)
                if self._silent.is_set():  # never connected upstream: answers nothing
                    threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
                    continue
                server = socket.create_connection(self.upstream)
                self._sockets.append(server)
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if sink is not None and not self._silent.is_set():
                    sink.sendall(data)
        if sink is not None and not self._silent.is_set():
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def silenceable_postgres() -> Iterator[tuple[str, SilencingProxy]]:
    """A private PostgreSQL cluster and the URL to reach it through a SilencingProxy."""
    with postgres_cluster() as cluster:
        server = make_url(cluster.url)
        proxy = SilencingProxy((server.host, server.port))
        try:
            yield server.set(port=proxy.port).render_as_string(hide_password=False), proxy
        finally:
            proxy.close()


def seconds_to_fail(call: Callable[[], object], limit_s: float) -> float:
    """Seconds until `call()` raises a database error; fails if it waits past `limit_s`."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    started = time.monotonic()
    waiter = threading.Thread(target=run, daemon=True)  # left behind if it never returns
    waiter.start()
    waiter.join(limit_s)
    elapsed = time.monotonic() - started
    assert outcome, f"still waiting for the database after {limit_s} s"
    assert isinstance(outcome[0], SQLAlchemyError), f"expected a database error: {outcome[0]!r}"
    return elapsed


WAIT_S = 2.0  # the store's bound on one wait in the silent-server tests


@pytest.mark.slow
def test_a_silent_postgresql_fails_each_call_within_its_bound_and_serves_again_after() -> None:
    with silenceable_postgres() as (url, proxy):
        store = Store(url, wait_s=WAIT_S)
        try:
            assert store.acquire_lease("probe", "me", 60)  # a pooled connection, then silence
            proxy.silence()
            # A call waits at most twice its bound: the pooled connection's check, then a
            # new connection (the OS would wait minutes, psycopg's connect 130 s).
            limit_s = 2 * WAIT_S + 1.0
            lease_s = seconds_to_fail(lambda: store.acquire_lease("probe", "me", 60), limit_s)
            write_s = seconds_to_fail(lambda: store.record_event("test.silent", "a write"), limit_s)
            proxy.forward()
            assert store.acquire_lease("probe", "me", 60)  # the same store, no restart
            store.record_event("test.answered", "a write")
            assert [e.kind for e in store.events(kind_prefix="test.")] == ["test.answered"]
        finally:
            store.close()
    print(f"\nPostgreSQL silent, bound {WAIT_S:g} s: lease call failed in {lease_s:.2f} s, "
          f"a write in {write_s:.2f} s")  # fmt: skip


@pytest.mark.slow
async def test_postgresql_gone_silent_for_a_while_kills_nothing_and_the_leader_resumes(
    config: Callable[[Store], RetrainConfig],
) -> None:
    # The lease's calls are abandoned after a third of it, but their threads wait for the
    # store's bound: a look's, so that few are left waiting at once. The job store's engine
    # waits for a new connection on the event loop for libpq's 2 s at least: the lease is
    # long enough for that stall and an abandoned renewal (a third of it) on top of a look.
    ttl_s = 12.0
    with silenceable_postgres() as (url, proxy):
        store = seeded(url, wait_s=ttl_s / 3)
        try:
            await survive(
                store,
                config(store),
                lambda: asyncio.to_thread(proxy.silence),
                lambda: asyncio.to_thread(proxy.forward),
                "PostgreSQL silent behind a proxy (nothing forwarded, nothing closed)",
                ttl_s,
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
