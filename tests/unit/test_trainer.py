"""The trainer's parts that need no model: config checks, the spec, threads, the callbacks, the CLI.

The real runs (training SmolLM2, NaN, torchrun) are in tests/integration/test_trainer.py.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState

from retrain.jobs import get_job, queue_job
from retrain.trainer import StoreProgress, main
from retrain.training.lora import (
    AbortOnNonFiniteLoss,
    ReportProgress,
    StopAtBudget,
    budget_steps,
    configure_threads,
)
from retrain.training.spec import (
    DEFAULT_TARGET_MODULES,
    NonFiniteLossError,
    TrainingConfig,
    TrainingError,
    TrainingProgress,
    load_spec,
    result_path,
    save_spec,
)
from store import Store
from store.jobs import TrainingJob


def spec_json(tmp_path: Path, **overrides) -> Path:
    spec = {
        "model_dir": str(tmp_path / "model"),
        "parent_adapter": None,
        "train_file": str(tmp_path / "train.jsonl"),
        "validation_file": str(tmp_path / "validation.jsonl"),
        "output_dir": str(tmp_path / "adapters" / "support-v2"),
        "config": {"rank": 4, "target_modules": ["q_proj", "v_proj"], "epochs": 2},
        **overrides,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def state(step: int = 3, *, rank_zero: bool = True) -> TrainerState:
    return TrainerState(epoch=0.75, global_step=step, max_steps=8, is_world_process_zero=rank_zero)


def test_the_defaults_make_an_adapter_vllm_serves_by_default():
    config = TrainingConfig()
    assert config.rank <= 16  # vLLM's default --max-lora-rank
    assert (
        config.target_modules == DEFAULT_TARGET_MODULES == ("q_proj", "k_proj", "v_proj", "o_proj")
    )


def test_a_bad_config_names_every_broken_rule():
    with pytest.raises(ValueError, match=r"rank >= 1.*learning_rate > 0 and finite"):
        TrainingConfig(rank=0, learning_rate=math.nan)


@pytest.mark.parametrize("fraction", [0.0, -0.2, 1.5, math.nan])
def test_a_budget_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"0 < budget_fraction <= 1"):
        TrainingConfig(budget_fraction=fraction)


@pytest.mark.parametrize(("total", "fraction", "steps"), [(10, 0.2, 2), (8, 0.2, 2), (3, 0.2, 1)])
def test_a_partial_budget_is_the_nearest_whole_step_and_at_least_one(total, fraction, steps):
    assert budget_steps(total, fraction) == steps


def test_a_partial_budget_stops_the_run_at_its_share_of_the_full_runs_steps():
    stop = StopAtBudget(0.25)  # of 8 steps: 2
    control = TrainerControl()
    stop.on_step_end(None, state(1), control)
    assert not control.should_training_stop
    stop.on_step_end(None, state(2), control)
    assert control.should_training_stop


def test_a_spec_reads_from_json_with_its_nested_config(tmp_path: Path):
    spec = load_spec(spec_json(tmp_path))
    assert spec.output_dir == tmp_path / "adapters" / "support-v2"
    assert spec.parent_adapter is None
    assert spec.config == TrainingConfig(rank=4, target_modules=("q_proj", "v_proj"), epochs=2)


def test_a_saved_spec_loads_back_equal(tmp_path: Path):
    spec = load_spec(spec_json(tmp_path))
    save_spec(spec, tmp_path / "again.json")
    assert load_spec(tmp_path / "again.json") == spec


def test_a_bad_config_in_a_spec_is_refused_with_the_rule(tmp_path: Path):
    with pytest.raises(TrainingError, match=r"invalid spec .*config: .*need batch_size >= 1"):
        load_spec(spec_json(tmp_path, config={"batch_size": 0}))


def test_a_spec_without_a_field_is_refused_naming_it(tmp_path: Path):
    path = spec_json(tmp_path)
    spec = json.loads(path.read_text())
    del spec["train_file"]
    path.write_text(json.dumps(spec))
    with pytest.raises(TrainingError, match=r"invalid spec .*train_file: Field required"):
        load_spec(path)


def test_threads_are_split_among_the_processes_within_the_cores_given(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        assert configure_threads(8) == 1  # 2 cores given, 2 processes: 1 thread each
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert configure_threads(None) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("logs", [{"loss": math.nan}, {"loss": math.inf}, {"eval_loss": -math.inf}])
def test_a_non_finite_loss_aborts_the_run_with_the_step(logs):
    with pytest.raises(NonFiniteLossError, match=r"is (nan|inf|-inf) at step 3 \(epoch 0.75\)"):
        AbortOnNonFiniteLoss().on_log(None, state(), TrainerControl(), logs=logs)


def test_a_finite_loss_goes_on():
    AbortOnNonFiniteLoss().on_log(None, state(), TrainerControl(), logs={"loss": 0.5})


def test_progress_carries_the_last_training_loss_into_the_validation_update():
    seen: list[TrainingProgress] = []
    report = ReportProgress(seen.append)
    report.on_log(None, state(3), TrainerControl(), logs={"loss": 0.9, "grad_norm": 1.0})
    report.on_log(None, state(4), TrainerControl(), logs={"eval_loss": 0.7})
    report.on_log(None, state(4), TrainerControl(), logs={"train_runtime": 12.0})
    assert seen == [
        TrainingProgress(epoch=0.75, step=3, total_steps=8, train_loss=0.9, val_loss=None),
        TrainingProgress(epoch=0.75, step=4, total_steps=8, train_loss=0.9, val_loss=0.7),
    ]


def test_only_rank_zero_reports_progress():
    seen: list[TrainingProgress] = []
    ReportProgress(seen.append).on_log(
        None, state(rank_zero=False), TrainerControl(), logs={"loss": 0.9}
    )
    assert seen == []


def test_the_cli_fails_with_one_line_and_keeps_an_existing_adapters_record(tmp_path: Path, capsys):
    spec = load_spec(spec_json(tmp_path))
    spec.output_dir.mkdir(parents=True)
    record = result_path(spec.output_dir)
    record.write_text('{"status": "succeeded"}\n')
    assert main(["--spec", str(tmp_path / "spec.json")]) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert stderr.startswith("retrain.trainer: TrainingError: output directory ")
    assert json.loads(record.read_text()) == {"status": "succeeded"}


def test_the_cli_records_why_a_run_failed_next_to_the_output(tmp_path: Path, capsys):
    spec = load_spec(spec_json(tmp_path))
    spec.output_dir.mkdir(parents=True)
    assert main(["--spec", str(tmp_path / "spec.json")]) == 1
    failure = json.loads(result_path(spec.output_dir).read_text())
    assert failure["status"] == "failed"
    assert failure["reason"].startswith("TrainingError: output directory ")
    assert "Traceback" in failure["traceback"]


def test_a_locked_database_costs_the_job_row_its_progress_never_the_training(
    tmp_path: Path, capsys
):
    """Another connection holds SQLite's write lock past its busy timeout (5 s): reporting
    never waits on it nor raises, and the newest update reaches the row once it is free."""
    database = tmp_path / "jobs.db"
    store = Store(f"sqlite:///{database}")
    job_id = queue_job(store, "a test", None, status="running")
    progress = StoreProgress(store, job_id, every_s=0.05, retry_s=0.2)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        for step in range(1, 6):
            progress(TrainingProgress(step / 10, step, 10, 1.0, None))
            time.sleep(0.01)
        assert time.monotonic() - started < 0.5  # the training went on
        time.sleep(6.0)  # the writer's attempt outlasts the busy timeout and fails
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    deadline = time.monotonic() + 10
    while (get_job(store, job_id).progress or {}).get("step") != 5:
        assert time.monotonic() < deadline, "the newest update never reached the row"
        time.sleep(0.05)
    progress(TrainingProgress(1.0, 10, 10, 0.5, 0.4))
    progress.close()
    assert get_job(store, job_id).progress["val_loss"] == 0.4
    assert "database is locked" in capsys.readouterr().err  # said once in the trainer's log
    store.close()


def stored_job(tmp_path: Path, url: str) -> tuple[int, Path]:
    """A running job whose row holds its spec, as the daemon leaves it for the child."""
    store = Store(url)
    job_id = queue_job(store, "a test", None, status="running")
    spec = json.loads(spec_json(tmp_path).read_text())
    with store.session() as session:
        session.get(TrainingJob, job_id).spec = spec
    store.close()
    return job_id, Path(spec["output_dir"])


def test_a_job_whose_database_is_locked_as_its_child_starts_trains_once_it_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """Another connection holds SQLite's lock (readers too) past its busy timeout (5 s) as the
    child starts: the child tries again, each try logged, and trains once the lock goes."""
    database = tmp_path / "jobs.db"
    job_id, output_dir = stored_job(tmp_path, f"sqlite:///{database}")
    trained: list[Path] = []
    monkeypatch.setattr("retrain.trainer.train", lambda spec, _: trained.append(spec.output_dir))
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # kept to the close, and readers wait
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE training_jobs SET reason = reason")
    release = threading.Timer(6.0, holder.close)
    release.start()
    try:
        argv = ["--job", str(job_id), "--database-url", f"sqlite:///{database}"]
        assert main([*argv, "--output-dir", str(output_dir)]) == 0
    finally:
        release.join()
    assert trained == [output_dir]
    [retry] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert retry["job"] == job_id and retry["attempt"] == 1
    assert retry["error"] == f"the database sqlite:///{database}: database is locked"


def test_a_job_whose_database_stays_down_past_the_deadline_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """PostgreSQL refusing connections (nothing listens on port 1) for longer than the
    deadline: the child fails with one reason naming the database, in its result file."""
    job_id, output_dir = stored_job(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    monkeypatch.setattr("retrain.trainer.START_DEADLINE_S", 2.0)
    down = "postgresql+psycopg://tunewatch:secret@127.0.0.1:1/tunewatch"
    argv = ["--job", str(job_id), "--database-url", down, "--output-dir", str(output_dir)]
    assert main(argv) == 1
    failure = json.loads(result_path(output_dir).read_text())
    assert failure["status"] == "failed"
    reason = failure["reason"]
    assert reason.startswith(
        "TrainingError: the database postgresql+psycopg://tunewatch:***@127.0.0.1:1/tunewatch: "
    )
    assert re.search(r"Connection refused; unavailable for \d s from the trainer's start", reason)
    assert "secret" not in reason
