"""The trainer's child process: `python -m retrain.trainer --job ID` or `--spec SPEC.json`.

It runs apart from the daemon so that a crash, an out-of-memory kill or a NaN cannot take the
daemon down: `--job ID` for a job of the daemon (the spec is read from the job's row in the
store, progress is written back to it) or `--spec SPEC.json` for a spec in a file. Either way
it writes two files next to the output directory: progress lines while it runs and one
result JSON at the end, which the parent reads. The same entry point runs under `torchrun`
(or `accelerate launch`); a search (`hpo_trials`) runs first, in one process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

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


def store_progress(store: Store, job_id: int, every_s: float = 1.0) -> ProgressCallback:
    """Progress into the job's row: at most once a second, and at every validation and the end."""
    last = -math.inf

    def write(update: TrainingProgress) -> None:
        nonlocal last
        final = update.val_loss is not None or update.step >= update.total_steps
        if not final and time.monotonic() - last < every_s:
            return
        last = time.monotonic()
        with store.session() as session:
            row = session.get(TrainingJob, job_id)
            if row is not None:
                line = {"time": datetime.now(UTC).isoformat(), **asdict(update)}
                row.progress = {**(row.progress or {}), "phase": "training", **line}

    return write


def main(argv: list[str] | None = None) -> int:
    description = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m retrain.trainer", description=description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", type=Path, help="a TrainingSpec as a JSON file")
    source.add_argument("--job", type=int, help="a training job in the store: spec and progress")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TUNEWATCH_DATABASE_URL"),
        help="the store of --job (default: $TUNEWATCH_DATABASE_URL)",
    )
    args = parser.parse_args(argv)
    if args.job is not None and not args.database_url:
        parser.error("--job needs --database-url or TUNEWATCH_DATABASE_URL")
    output_dir: Path | None = None
    try:
        if args.job is None:
            spec, reporters = load_spec(args.spec), []
        else:
            store = Store(args.database_url)
            spec = load_job(store, args.job)
            reporters = [store_progress(store, args.job)]
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
            failure = {"status": "failed", "reason": reason, "traceback": traceback.format_exc()}
            write_json(result_path(output_dir), failure)
        print(f"retrain.trainer: {reason}", file=sys.stderr)
        return 1
    if result is not None:
        hpo = {"hpo": asdict(search)} if search else {}
        write_json(
            result_path(result.adapter_dir), {"status": "succeeded", **asdict(result), **hpo}
        )
    return 0


def _each(reporters: list[ProgressCallback]) -> ProgressCallback:
    def report(update: TrainingProgress) -> None:
        for reporter in reporters:
            reporter(update)

    return report


if __name__ == "__main__":
    sys.exit(main())
