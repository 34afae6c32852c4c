"""The trainer's child process: `python -m retrain.trainer --job ID` or `--spec SPEC.json`.

It runs apart from the daemon so that a crash, an out-of-memory kill or a NaN cannot take the
daemon down: `--job ID` for a job of the daemon (the spec is read from the job's row in the
store, progress is written back to it) or `--spec SPEC.json` for a spec in a file. A database
that is down or locked as a job's child starts is waited for, up to `START_DEADLINE_S`. Either way
it writes two files next to the output directory: progress lines while it runs and one
result JSON at the end, which the parent reads. The same entry point runs under `torchrun`
(or `accelerate launch`); a search (`hpo_trials`) runs first, in one process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError
from pythonjsonlogger.json import JsonFormatter
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from retrain.training.hpo import tune
from retrain.training.lora import is_rank_zero, train
from retrain.training.spec import (
    ProgressCallback,
    TrainingError,
    TrainingProgress,
    TrainingSpec,
    append_progress,
    load_spec,
    progress_path,
    result_path,
    write_json,
)
from store import Store
from store.jobs import TrainingJob
from store.schema import DatabaseUnavailableError, unavailable

log = logging.getLogger("retrain.trainer")

# How long a job's child waits for its database at the start, when the daemon has just written
# the spec: 10 lease times to live at the default (30 s). An outage that short costs the
# controller its turn and nothing else (it leads again, and follows this child by its pid), so
# it must not cost the job either; past it, the job fails with the reason and the one training
# slot is free for the next the trigger asks for.
START_DEADLINE_S = 300.0
START_RETRY_MAX_S = 10.0  # the longest wait between two tries (doubling from 0.5 s)
# The database cannot be reached or is locked: nothing is wrong with the job, so try again.
UNAVAILABLE = (OperationalError, DatabaseUnavailableError)


def load_job(store: Store, job_id: int) -> TrainingSpec:
    """The spec the daemon wrote into a training job's row."""
    with store.session() as session:
        row = session.get(TrainingJob, job_id)
        if row is None:
            raise TrainingError(f"no training job {job_id} in the store")
        if not row.spec:
            raise TrainingError(f"training job {job_id} has no spec yet")
        try:
            return TypeAdapter(TrainingSpec).validate_python(row.spec)
        except ValidationError as exc:
            raise TrainingError(f"training job {job_id}: invalid spec: {exc}") from None


def open_job(url: str, job_id: int, deadline_s: float) -> tuple[Store, TrainingSpec]:
    """The store and the job's spec, tried again while the database is unavailable (each try
    logged) up to `deadline_s`; then a TrainingError naming the database."""
    started, wait_s, attempt = time.monotonic(), 0.5, 1
    store: Store | None = None
    while True:
        try:
            store = store or Store(url)
            return store, load_job(store, job_id)
        except UNAVAILABLE as exc:
            why = _unavailable(url, exc)
            waited_s = time.monotonic() - started
            if waited_s + wait_s > deadline_s:
                raise TrainingError(
                    f"{why}; unavailable for {waited_s:.0f} s from the trainer's start "
                    f"({attempt} tries)"
                ) from None
            log.warning(
                "the database is unavailable at the trainer's start; trying again",
                extra={"job": job_id, "attempt": attempt, "retry_in_s": wait_s, "error": why},
            )
            time.sleep(wait_s)
            wait_s, attempt = min(2 * wait_s, START_RETRY_MAX_S), attempt + 1


def _unavailable(url: str, exc: Exception) -> str:
    """One line naming the database, as a store that cannot start says it."""
    return str(exc if isinstance(exc, DatabaseUnavailableError) else unavailable(url, exc))


class StoreProgress:
    """Progress into the job's row, from a thread of its own: the training never waits on the
    database, and a database that is down or locked costs the row its updates, never the run.

    It writes the newest update at most every `every_s`; a write that fails is tried again
    with the newest one `retry_s` later. What the row misses the progress file beside the
    output has, and the result file is what the daemon settles the job from.
    """

    def __init__(
        self, store: Store, job_id: int, *, every_s: float = 1.0, retry_s: float = 5.0
    ) -> None:
        self.store, self.job_id = store, job_id
        self.every_s, self.retry_s = every_s, retry_s
        self._newest: TrainingProgress | None = None
        self._lock = threading.Lock()
        self._wake, self._closing = threading.Event(), threading.Event()
        self._failing = False
        self._writer = threading.Thread(target=self._write_each, name="progress", daemon=True)
        self._writer.start()

    def __call__(self, update: TrainingProgress) -> None:
        with self._lock:
            self._newest = update
        self._wake.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """The last update written if the database answers within `timeout_s`."""
        self._closing.set()
        self._wake.set()
        self._writer.join(timeout_s)

    def _write_each(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                update, self._newest = self._newest, None
                self._wake.clear()
            if update is None:
                if self._closing.is_set():
                    return
                continue
            try:
                self._write(update)
            except SQLAlchemyError as exc:
                with self._lock:
                    self._newest = self._newest or update
                    self._wake.set()
                if not self._failing:
                    print(f"retrain.trainer: progress not stored, retrying: {exc}", file=sys.stderr)
                self._failing = True
                if self._closing.wait(self.retry_s):
                    return  # closing: the result file has the outcome
                continue
            if self._failing:
                print("retrain.trainer: progress stored again", file=sys.stderr)
            self._failing = False
            self._closing.wait(self.every_s)

    def _write(self, update: TrainingProgress) -> None:
        with self.store.session() as session:
            row = session.get(TrainingJob, self.job_id)
            if row is not None:
                line = {"time": datetime.now(UTC).isoformat(), **asdict(update)}
                row.progress = {**(row.progress or {}), "phase": "training", **line}


def main(argv: list[str] | None = None) -> int:
    description = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m retrain.trainer", description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", type=Path, help="a TrainingSpec as a JSON file")
    source.add_argument("--job", type=int, help="a training job in the store: spec and progress")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="the job's output directory, where its result goes if the spec cannot be read",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TUNEWATCH_DATABASE_URL"),
        help="the store of --job (default: $TUNEWATCH_DATABASE_URL)",
    )
    args = parser.parse_args(argv)
    if args.job is not None and not args.database_url:
        parser.error("--job needs --database-url or TUNEWATCH_DATABASE_URL")
    _log_json()
    output_dir: Path | None = args.output_dir
    stored: StoreProgress | None = None
    try:
        if args.job is None:
            spec, reporters = load_spec(args.spec), []
        else:
            store, spec = open_job(args.database_url, args.job, START_DEADLINE_S)
            stored = StoreProgress(store, args.job)
            reporters = [stored]
        output_dir = spec.output_dir
        if is_rank_zero():
            reporters.append(append_progress(progress_path(output_dir)))
        search = None
        if spec.hpo_trials:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise TrainingError("hpo_trials: run the search in one process, not distributed")
            search = tune(spec, spec.hpo_trials)
            spec = replace(spec, config=search.best)
        result = train(spec, _each(reporters) if is_rank_zero() else None)
    except Exception as exc:  # the process boundary: every failure becomes one recorded reason
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if is_rank_zero() and output_dir is not None and not result_path(output_dir).exists():
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            failure = {"status": "failed", "reason": reason, "traceback": traceback.format_exc()}
            write_json(result_path(output_dir), failure)
        print(f"retrain.trainer: {reason}", file=sys.stderr)
        return 1
    else:
        if result is not None:
            hpo = {"hpo": asdict(search)} if search else {}
            write_json(
                result_path(result.adapter_dir), {"status": "succeeded", **asdict(result), **hpo}
            )
        return 0
    finally:  # after the result file: what the daemon settles from never waits on the database
        if stored is not None:
            stored.close()


def _log_json() -> None:
    """This module's lines as one JSON object each on stderr (the daemon's trainer.log)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{"))
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.INFO)


def _each(reporters: list[ProgressCallback]) -> ProgressCallback:
    def report(update: TrainingProgress) -> None:
        for reporter in reporters:
            reporter(update)

    return report


if __name__ == "__main__":
    sys.exit(main())
