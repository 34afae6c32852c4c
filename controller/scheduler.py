"""The daemon's clock: every periodic job (monitor checks, the retrain trigger, training jobs,
rollout steps) on one APScheduler, its job store in the tunewatch database, one leader per
database.

Why each setting is what it is:

- Persistent job store (APScheduler's SQLAlchemyJobStore, table `apscheduler_jobs` in the
  same database): a restart keeps each job's next run time instead of running everything at
  once, and a job is stored once under its name (`replace_existing`), so restarts never
  duplicate it. The store holds only a job's name; its body is looked up in this process
  (`run_job`), so nothing but a name is pickled into the database.
- Misfire grace = the job's interval: APScheduler's default (1 s) silently drops a run that
  starts late, which a busy event loop or a slow check makes routine. A run late by up to one
  interval still runs; later than that it is due again anyway.
- Coalescing on: runs missed while the daemon was down collapse into one run, not a burst.
- One instance per job: a check that outlasts its interval is not started twice.
- The lease: APScheduler does not support two schedulers sharing a job store (both would run
  the jobs). A daemon starts its scheduler only while it holds the `scheduler` lease in the
  database, renews it every third of its time to live, and stops the scheduler the moment a
  renewal fails; a second daemon on the same database waits, and takes over when the first
  stops renewing. Expiry is the database's clock (store/events.py).
- The database may fail: a lease call that raises or does not answer within a third of the
  time to live means "not leader now" (jobs stopped, the loop keeps trying), never a dead
  daemon; the events it could not record are recorded once the database answers again. A
  call is bounded by a third of the time to live, so a holder always stops before its lease
  can have expired in the database (docs/design.md, "When the database fails"). Jobs are not
  fenced beyond that: a job body already in a worker thread finishes its run, which is why a
  rollout transition checks the version it read (rollout/runner.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.job import Job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from controller import metrics
from store import Store
from store.base import create_db_engine

log = logging.getLogger(__name__)

JobBody = Callable[[], Awaitable[None]]
LEASE = "scheduler"

# The bodies of this process's jobs, by name: what the job store's `run_job` calls.
_BODIES: dict[str, JobBody] = {}


@dataclass(frozen=True)
class PeriodicJob:
    name: str
    body: JobBody
    interval_s: float


async def run_job(name: str) -> None:
    """What every stored job runs: the body registered under its name, failures contained.

    A failing job is logged and counted; the scheduler and the other jobs go on.
    """
    body = _BODIES.get(name)
    if body is None:
        log.error("scheduled job has no body in this process", extra={"job": name})
        return
    started = time.perf_counter()
    try:
        await body()
    except Exception:
        log.exception("scheduled job failed", extra={"job": name})
        metrics.JOB_RUNS.labels(name, "failed").inc()
    else:
        metrics.JOB_RUNS.labels(name, "ok").inc()
    finally:
        metrics.JOB_DURATION.labels(name).set(time.perf_counter() - started)


def default_holder() -> str:
    """This daemon, as the lease names it: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _AsyncIOScheduler(AsyncIOScheduler):
    """APScheduler's, but a job store that fails after the due jobs were read (writing their
    next run times) is retried like one that fails at the read: APScheduler lets that error
    out of its timer callback, and then never wakes again while the daemon looks alive."""

    def _process_jobs(self) -> float | None:
        try:
            return super()._process_jobs()
        except SQLAlchemyError as exc:
            log.warning("job store failed; retrying", extra={"error": _describe(exc)})
            return self.jobstore_retry_interval


class Scheduler:
    """Runs the jobs while this daemon holds the lease; waits for it otherwise."""

    def __init__(
        self,
        store: Store,
        jobs: Sequence[PeriodicJob],
        *,
        holder: str | None = None,
        lease_ttl_s: float = 30.0,
    ) -> None:
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique, got {names}")
        self.store, self.jobs = store, list(jobs)
        self.holder = holder or default_holder()
        self.lease_ttl_s = lease_ttl_s
        self._scheduler: AsyncIOScheduler | None = None
        self._unrecorded: list[tuple[str, str, dict[str, object]]] = []  # the database was down
        self._failing_since: float | None = None  # monotonic, while lease calls fail

    @property
    def leading(self) -> bool:
        return self._scheduler is not None

    @property
    def renew_every_s(self) -> float:
        return self.lease_ttl_s / 3

    async def run(self) -> None:
        """Until cancelled: take the lease, run the jobs, renew; on losing it (or the
        database), stop and keep trying."""
        try:
            while True:
                await self._look()
                metrics.LEADER.set(int(self.leading))
                await asyncio.sleep(self.renew_every_s)
        finally:
            if self.leading:
                self._stop()
                try:
                    await asyncio.to_thread(self.store.release_lease, LEASE, self.holder)
                except SQLAlchemyError as exc:  # it expires by itself
                    log.warning("lease not released", extra={"error": _describe(exc)})
            metrics.LEADER.set(0)

    async def _look(self) -> None:
        """One lease call, and what follows from its answer; a failed call is "not held"."""
        try:
            held = await asyncio.wait_for(
                asyncio.to_thread(self.store.acquire_lease, LEASE, self.holder, self.lease_ttl_s),
                timeout=self.renew_every_s,
            )
        except (SQLAlchemyError, TimeoutError) as exc:
            self._database_failed(exc)
            return
        if self._failing_since is not None:
            down_s = time.monotonic() - self._failing_since
            log.warning("database answers again", extra={"after_s": round(down_s, 1)})
            self._failing_since = None
        if held and not self.leading:
            self._start()
        elif not held and self.leading:
            self._stop()
            log.warning("scheduler lease lost; jobs stopped", extra={"holder": self.holder})
            self._record("scheduler.standby", "lease lost")
        try:
            await asyncio.to_thread(self._record_unrecorded)
        except SQLAlchemyError as exc:  # kept for the next look
            log.warning("scheduler events not recorded yet", extra={"error": _describe(exc)})

    def _database_failed(self, exc: BaseException) -> None:
        why = _describe(exc)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("lease call failed: not leading now", extra={"error": why})
        if self.leading:
            self._stop()
            log.warning("scheduler jobs stopped: the lease cannot be renewed", extra={"error": why})
            self._record("scheduler.standby", f"the lease could not be renewed: {why}")

    def _start(self) -> None:
        scheduler = _AsyncIOScheduler(timezone=UTC, jobstore_retry_interval=self.renew_every_s)
        try:
            self._reconcile(scheduler)
        except SQLAlchemyError as exc:
            if scheduler.running:
                scheduler.shutdown(wait=False)
            why = _describe(exc)
            log.warning("scheduler not started: the job store failed", extra={"error": why})
            return
        self._scheduler = scheduler
        log.info("scheduler leading", extra={"holder": self.holder, "jobs": sorted(_BODIES)})
        self._record(
            "scheduler.leading",
            "took the scheduler lease",
            jobs={job.name: job.interval_s for job in self.jobs},
        )

    def _reconcile(self, scheduler: AsyncIOScheduler) -> None:
        """The stored jobs made this version's, then the scheduler running them."""
        scheduler.add_jobstore(SQLAlchemyJobStore(engine=self._job_store_engine()), "default")
        scheduler.start(paused=True)  # the stored jobs are reconciled before any runs
        stored = {job.id: job for job in scheduler.get_jobs()}
        for job in self.jobs:
            _BODIES[job.name] = job.body
            scheduler.add_job(
                run_job,
                IntervalTrigger(seconds=job.interval_s, timezone=UTC),
                args=[job.name],
                id=job.name,
                name=job.name,
                replace_existing=True,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, round(job.interval_s)),
                next_run_time=_next_run(stored.get(job.name), job.interval_s),
            )
        for name in stored.keys() - {job.name for job in self.jobs}:
            scheduler.remove_job(name)  # a job this version no longer has
        scheduler.resume()

    def _job_store_engine(self) -> Engine:
        """An engine of its own for APScheduler's job store, whose calls run on the event loop:
        each waits for the database at most a tenth of the renewal interval (SQLite's busy
        timeout, PostgreSQL's every bound but a new connection's, at least libpq's 2 s), so a
        locked or silent database holds the loop, and the lease's timing, for no longer."""
        url = self.store.engine.url.render_as_string(hide_password=False)
        return create_db_engine(url, wait_s=self.renew_every_s / 10)

    def _stop(self) -> None:
        assert self._scheduler is not None
        self._scheduler.shutdown(wait=False)
        self._scheduler = None

    def _record(self, kind: str, reason: str, **data: object) -> None:
        """An event of the scheduler's, recorded after this look, or once the database answers;
        `at` says when it happened."""
        self._unrecorded.append((kind, reason, {**data, "at": datetime.now(UTC).isoformat()}))

    def _record_unrecorded(self) -> None:
        while self._unrecorded:
            kind, reason, data = self._unrecorded[0]
            self.store.record_event(kind, reason, self.holder, **data)
            self._unrecorded.pop(0)


def _describe(exc: BaseException) -> str:
    """An error in one line: its type and its first line (SQLAlchemy's carry the SQL after)."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError: no answer in time"
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


def _next_run(stored: Job | None, interval_s: float) -> datetime:
    """The stored next run time if the job keeps its interval, else now."""
    now = datetime.now(UTC)
    if stored is None or stored.next_run_time is None:
        return now
    if stored.trigger.interval.total_seconds() != interval_s:
        return now
    return stored.next_run_time
