"""Training jobs: from a queued row in `training_jobs` to a registered candidate adapter, or a
failure with its reason.

A job goes queued -> running -> succeeded | failed, or queued -> cancelled. Claiming a job
(queued -> running) is one conditional UPDATE, so the daemon's runner and a `tunewatch
retrain` by hand never run the same job twice. Running it:

1. the training set: the newest labelled live exchanges (feedback references), plus the
   golden set only when `use_goldens` is on: the golden set is the exam every adapter
   sits on a schedule, and an adapter trained on it would pass it by heart;
2. the trainer as a child process (`python -m retrain.trainer --job ID`, in its own
   session): a crash, an out-of-memory kill or a NaN ends the child, never the daemon. It
   reads its spec from the job row and writes its progress there;
3. its result file, once it exits: the adapter is registered as a candidate (`family-vN`)
   with its parent, hyperparameters, metrics and the exchanges it was trained on; a failed
   run records the trainer's own reason. Nothing is registered, so nothing is promoted.

The daemon may be killed while a child trains: the row keeps the child's pid, and the next
runner adopts the job (still running) or settles it from its result file (finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import TypeAdapter
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from transformers import AutoTokenizer

from monitor.goldens import load_golden_set
from monitor.traffic import labelled_exchanges
from registry.versions import AdapterVersion, family_of, register, versions
from retrain import metrics
from retrain.data import TrainingDataError, build_training_set, write_training_set
from retrain.training.spec import TrainingConfig, TrainingSpec, result_path
from store import Store
from store.jobs import TrainingJob

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UNFINISHED = ("queued", "running")


@dataclass(frozen=True)
class RetrainConfig:
    """What every training job of this daemon shares."""

    model_dir: Path
    jobs_dir: Path  # job-<id>/ holds the data, the spec, the trainer's log, the adapter
    database_url: str  # handed to the trainer child, which reports progress into the store
    training: TrainingConfig
    family: str  # adapters trained from the base model are named `family-vN`
    start_from: Literal["serving", "base"] = "serving"  # continue the primary adapter, or not
    use_goldens: bool = False
    golden_set: Path | None = None
    max_examples: int = 5000  # the newest labelled exchanges
    validation_fraction: float = 0.2
    start_delay_s: float = 0.0  # a queued job waits this long (a drift that clears cancels it)
    hpo_trials: int = 0  # > 0: an Optuna search judged at 20% of the budget picks the config
    launcher: Sequence[str] = (sys.executable,)  # e.g. ("torchrun", "--nproc_per_node", "2")


@dataclass(frozen=True)
class JobView:
    id: int
    status: str
    reason: str
    created_at: datetime
    parent_adapter: str | None
    adapter: str | None
    progress: dict[str, Any]
    error: str | None
    pid: int | None  # the trainer child while it runs

    @classmethod
    def of(cls, row: TrainingJob) -> JobView:
        return cls(
            row.id,
            row.status,
            row.reason,
            row.created_at,
            row.parent_adapter,
            row.adapter,
            dict(row.progress or {}),
            row.error,
            row.pid,
        )


def job_dir(config: RetrainConfig, job_id: int) -> Path:
    return config.jobs_dir / f"job-{job_id}"


def output_dir(config: RetrainConfig, job_id: int) -> Path:
    """The job's adapter directory; its result file lies beside it."""
    return job_dir(config, job_id) / "adapter"


def queue_job(
    store: Store, reason: str, parent_adapter: str | None, *, status: JobStatus = "queued"
) -> int:
    """A new job row (queued, or already claimed as running by whoever runs it now)."""
    with store.session() as session:
        job = TrainingJob(status=status, reason=reason, parent_adapter=parent_adapter)
        if status == "running":
            job.started_at = datetime.now(UTC)
        session.add(job)
        session.flush()
        job_id = job.id
    store.record_event("retrain.queued", reason, f"job-{job_id}", parent=parent_adapter)
    return job_id


def _transition(store: Store, job_id: int, before: str, after: JobStatus, **values: Any) -> bool:
    """Move a job from one status to another, only if it is still in the first: True if moved."""
    with store.session() as session:
        moved = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == before)
            .values(status=after, **values)
        )
        return moved.rowcount == 1


def claim(store: Store, job_id: int) -> bool:
    return _transition(store, job_id, "queued", "running", started_at=datetime.now(UTC))


def cancel(store: Store, job_id: int, reason: str) -> bool:
    """Cancel a job that has not started; False when it already has (or is gone)."""
    cancelled = _transition(
        store, job_id, "queued", "cancelled", finished_at=datetime.now(UTC), error=reason
    )
    if cancelled:
        store.record_event("retrain.cancelled", reason, f"job-{job_id}")
        metrics.TRAINING_JOBS.labels("cancelled").inc()
    return cancelled


def fail(store: Store, job_id: int, reason: str) -> None:
    """A running job ends without an adapter; the reason is the one a person reads."""
    if _transition(
        store, job_id, "running", "failed", finished_at=datetime.now(UTC), error=reason, pid=None
    ):
        store.record_event("retrain.failed", reason, f"job-{job_id}")
        metrics.TRAINING_JOBS.labels("failed").inc()
        log.error("training job failed: %s", reason, extra={"job": job_id})


def active_job(store: Store) -> JobView | None:
    """The oldest queued or running job, if any (one runs at a time)."""
    with store.session() as session:
        row = session.scalars(
            select(TrainingJob)
            .where(TrainingJob.status.in_(UNFINISHED))
            .order_by(TrainingJob.status.desc(), TrainingJob.id)  # running before queued
            .limit(1)
        ).first()
        return None if row is None else JobView.of(row)


def get_job(store: Store, job_id: int) -> JobView | None:
    with store.session() as session:
        row = session.get(TrainingJob, job_id)
        return None if row is None else JobView.of(row)


def prepare(store: Store, job_id: int, config: RetrainConfig) -> TrainingSpec:
    """Build and write the training set and the spec; raises TrainingDataError with the reason."""
    job = get_job(store, job_id)
    assert job is not None
    directory = job_dir(config, job_id)
    exchanges = labelled_exchanges(store, config.max_examples)
    goldens = load_golden_set(config.golden_set) if config.use_goldens and config.golden_set else []
    if not exchanges and not goldens:
        raise TrainingDataError("no labelled exchanges to train on (post feedback references)")
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    training_set = build_training_set(
        exchanges,
        goldens,
        tokenizer,
        max_length=config.training.max_length,
        validation_fraction=config.validation_fraction,
    )
    train_file, validation_file = write_training_set(training_set, directory / "data")
    parent_dir = _parent_dir(store, job.parent_adapter) if config.start_from == "serving" else None
    spec = TrainingSpec(
        model_dir=config.model_dir,
        parent_adapter=parent_dir,
        train_file=train_file,
        validation_file=validation_file,
        output_dir=output_dir(config, job_id),
        config=config.training,
        hpo_trials=config.hpo_trials,
    )
    used = {e.id: e for e in exchanges}
    lineage = training_set.lineage
    window = sorted(used[i].created_at for i in lineage.exchange_ids)
    with store.session() as session:
        row = session.get(TrainingJob, job_id)
        assert row is not None
        row.spec = json.loads(TypeAdapter(TrainingSpec).dump_json(spec))
        row.progress = {
            "phase": "data",
            "train_examples": len(training_set.train),
            "validation_examples": len(training_set.validation),
            "exchanges": len(lineage.exchange_ids),
            "golden": len(lineage.golden_prompts),
            "window": [window[0].isoformat(), window[-1].isoformat()] if window else None,
        }
    return spec


def _parent_dir(store: Store, parent: str | None) -> Path | None:
    if parent is None:
        return None
    record = next((a for a in store.adapters() if a.name == parent), None)
    if record is None:
        raise TrainingDataError(f"parent adapter {parent!r} is not registered")
    return Path(record.path)


def spawn(
    store: Store, job_id: int, config: RetrainConfig, *, stderr: IO[Any] | None = None
) -> subprocess.Popen[bytes]:
    """Start the trainer child for a claimed, prepared job; its output goes to trainer.log
    (or to `stderr`, a terminal, for a job run by hand). A database that fails once the child
    runs does not stop it: its pid is recorded when the database answers (`record_started`)."""
    directory = job_dir(config, job_id)
    env = dict(os.environ, TUNEWATCH_DATABASE_URL=config.database_url, HF_HUB_OFFLINE="1")
    command = [*config.launcher, "-m", "retrain.trainer", "--job", str(job_id)]
    # Where the spec puts the adapter: a child that cannot read the spec fails there too.
    command += ["--output-dir", str(output_dir(config, job_id))]
    with (directory / "trainer.log").open("ab") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=stderr or sink, start_new_session=True
        )
    metrics.TRAINING_RUNNING.set(1)
    try:
        record_started(store, job_id, config, process)
    except SQLAlchemyError as exc:
        log.warning("trainer started, its pid not recorded yet: %s", exc, extra={"job": job_id})
    return process


def record_started(
    store: Store, job_id: int, config: RetrainConfig, process: subprocess.Popen[bytes]
) -> None:
    """The child's pid on the job (what a later daemon adopts it by), and the event."""
    with store.session() as session:
        row = session.get(TrainingJob, job_id)
        assert row is not None
        row.pid = process.pid
    store.record_event(
        "retrain.started",
        f"trainer started (pid {process.pid})",
        f"job-{job_id}",
        command=list(map(str, process.args)),
        directory=str(job_dir(config, job_id)),
    )


def start_claimed(
    store: Store, job_id: int, config: RetrainConfig, *, stderr: IO[Any] | None = None
) -> subprocess.Popen[bytes] | None:
    """Prepare a claimed job and start its trainer; None when there is no training set to
    train on (the job is failed with the reason)."""
    try:
        prepare(store, job_id, config)
    except (TrainingDataError, OSError) as exc:
        fail(store, job_id, f"no training set: {exc}")
        return None
    return spawn(store, job_id, config, stderr=stderr)


def settle(store: Store, job_id: int, config: RetrainConfig, returncode: int | None) -> JobView:
    """The child is gone: register its adapter, or fail the job with the trainer's reason."""
    metrics.TRAINING_RUNNING.set(0)
    metrics.TRAINING_PROGRESS.set(0)
    try:
        result = json.loads(result_path(output_dir(config, job_id)).read_text())
    except (OSError, json.JSONDecodeError):
        how = "died while the daemon was down" if returncode is None else f"exited {returncode}"
        log_file = job_dir(config, job_id) / "trainer.log"
        fail(store, job_id, f"the trainer {how} without a result; see {log_file}")
    else:
        if result.get("status") == "succeeded":
            _register(store, job_id, config, result)
        else:
            fail(store, job_id, result.get("reason") or "the trainer failed without a reason")
    job = get_job(store, job_id)
    assert job is not None
    return job


def _register(store: Store, job_id: int, config: RetrainConfig, result: dict[str, Any]) -> None:
    """The job's adapter registered (once: a settle the database interrupted after it is done
    again, and finds it) and the job succeeded."""
    job = get_job(store, job_id)
    assert job is not None
    version = next((v for v in versions(store) if v.job_id == job_id), None) or _register_new(
        store, job, config, result
    )
    summary = {k: result.get(k) for k in ("train_examples", "steps", "train_seconds")}
    reason = f"adapter {version.name} registered as a candidate"
    _transition(
        store,
        job_id,
        "running",
        "succeeded",
        finished_at=datetime.now(UTC),
        adapter=version.name,
        result={**summary, "metrics": version.metrics},
        pid=None,
    )
    store.record_event(
        "retrain.succeeded",
        reason,
        f"job-{job_id}",
        adapter=version.name,
        **summary,
        metrics=version.metrics,
    )
    metrics.TRAINING_JOBS.labels("succeeded").inc()
    log.info(reason, extra={"job": job_id, "adapter": version.name})


def _register_new(
    store: Store, job: JobView, config: RetrainConfig, result: dict[str, Any]
) -> AdapterVersion:
    job_id = job.id
    family = family_of(job.parent_adapter) if job.parent_adapter else config.family
    lineage_file = job_dir(config, job_id) / "data" / "lineage.json"
    lineage = json.loads(lineage_file.read_text())
    after, before = result.get("after") or {}, result.get("before") or {}
    figures = {
        "exact_match": after.get("exact_match"),
        "chrf": after.get("chrf"),
        "rouge_l": after.get("rouge_l"),
        f"{before.get('model', 'before')}_exact_match": before.get("exact_match"),
        f"{before.get('model', 'before')}_chrf": before.get("chrf"),
        "val_loss": result.get("best_val_loss"),
    }
    return register(
        store,
        family,
        Path(result["adapter_dir"]),
        parent=job.parent_adapter,
        job_id=job_id,
        hyperparameters=result["config"],
        metrics={k: v for k, v in figures.items() if isinstance(v, int | float)},
        data={**job.progress, **lineage, "lineage_file": str(lineage_file)},
        reason=f"trained by job {job_id}: {job.reason}",
    )


def _alive(pid: int, job_id: int) -> bool:
    """Whether `pid` is still this job's trainer (a reused pid is someone else)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"retrain.trainer" in command and str(job_id).encode() in command


class TrainingRunner:
    """The scheduler's training job: one tick starts a queued job or follows the running one."""

    def __init__(self, store: Store, config: RetrainConfig) -> None:
        self.store, self.config = store, config
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    async def tick(self) -> None:
        job = await asyncio.to_thread(active_job, self.store)
        if job is None:
            return
        if job.status == "running":
            await asyncio.to_thread(self._follow, job)
        elif datetime.now(UTC) - job.created_at >= timedelta(seconds=self.config.start_delay_s):
            await asyncio.to_thread(self._start, job.id)

    def _start(self, job_id: int) -> None:
        if not claim(self.store, job_id):
            return  # cancelled, or claimed by someone else, since we looked
        child = start_claimed(self.store, job_id, self.config)
        if child is not None:
            self._children[job_id] = child

    def _follow(self, job: JobView) -> None:
        child = self._children.get(job.id)
        if child is not None:
            returncode = child.poll()
            if returncode is None:
                if job.pid != child.pid:  # the database failed as it started
                    record_started(self.store, job.id, self.config, child)
                self._publish(job)
                return
            settle(self.store, job.id, self.config, returncode)
            del self._children[job.id]  # settled: a settle the database failed is tried again
            return
        if job.pid is not None and _alive(job.pid, job.id):
            self._publish(job)  # adopted: started by a daemon that has since died
            return
        settle(self.store, job.id, self.config, None)

    def _publish(self, job: JobView) -> None:
        metrics.TRAINING_RUNNING.set(1)
        step, total = job.progress.get("step"), job.progress.get("total_steps")
        if step is not None and total:
            metrics.TRAINING_PROGRESS.set(step / total)

    def close(self) -> None:
        """The daemon stops: stop its trainers and fail their jobs with that reason."""
        for job_id, child in self._children.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=20)
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            fail(self.store, job_id, "stopped with the daemon")
        self._children.clear()


def run_in_foreground(
    store: Store, config: RetrainConfig, reason: str, parent: str | None
) -> JobView:
    """`tunewatch retrain`: one job, claimed at creation, its progress bar on this terminal."""
    job_id = queue_job(store, reason, parent, status="running")
    child = start_claimed(store, job_id, config, stderr=sys.stderr)
    if child is None:
        job = get_job(store, job_id)
        assert job is not None
        return job
    try:
        returncode = child.wait()
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        fail(store, job_id, "interrupted by hand")
        raise
    return settle(store, job_id, config, returncode)
