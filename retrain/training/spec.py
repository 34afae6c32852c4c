"""What a training run is given and what it produces, as files: no torch, so the daemon reads them.

The parent (retrain.jobs) writes a `TrainingSpec`; the child (`python -m retrain.trainer`)
reads it, appends progress lines and writes one result JSON next to the adapter directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# The ranks a search tries stay at or under this (vLLM's default --max-lora-rank); `tunewatch
# up` starts the engine with room for it when a search is configured (retrain.hpo_trials).
MAX_LORA_RANK = 16


class TrainingError(RuntimeError):
    """A training run that cannot produce an adapter; the message is the recorded reason."""


class NonFiniteLossError(TrainingError):
    pass


@dataclass(frozen=True)
class TrainingConfig:
    """Every knob of a run. Continuing a parent adapter keeps the parent's LoRA shape
    (rank, alpha, dropout, target modules): only the optimisation settings apply to it."""

    rank: int = 8  # `up` starts vLLM with room for it; vLLM refuses ranks over --max-lora-rank
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 8  # per process: a distributed step takes batch_size x processes
    max_length: int = 256  # longer examples are dropped, never truncated
    seed: int = 0
    patience: int = 1  # epochs without a better validation loss before stopping
    threads: int | None = None  # for the whole job, split among its processes; None: all given
    eval_max_examples: int = 100  # held-out examples generated for the final evaluation; 0: none
    eval_max_new_tokens: int = 32
    # The share of the full run's steps to train, then validate and stop: the run's first steps
    # on the full run's learning-rate schedule, not a shorter run (HPO judges trials so).
    budget_fraction: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "rank >= 1": self.rank >= 1,
            "alpha > 0": self.alpha > 0,
            "0 <= dropout < 1": 0 <= self.dropout < 1,
            "target_modules not empty": bool(self.target_modules),
            "learning_rate > 0 and finite": 0 < self.learning_rate < math.inf,
            "epochs >= 1": self.epochs >= 1,
            "batch_size >= 1": self.batch_size >= 1,
            "max_length >= 8": self.max_length >= 8,
            "patience >= 1": self.patience >= 1,
            "threads >= 1": self.threads is None or self.threads >= 1,
            "eval_max_examples >= 0": self.eval_max_examples >= 0,
            "eval_max_new_tokens >= 1": self.eval_max_new_tokens >= 1,
            "0 < budget_fraction <= 1": 0 < self.budget_fraction <= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"training config: need {', '.join(failed)}")


@dataclass(frozen=True)
class TrainingSpec:
    """One training job: what the parent process writes, and the child reads, as JSON."""

    model_dir: Path
    parent_adapter: Path | None  # continue this adapter; None: a fresh LoRA on the base model
    train_file: Path  # JSONL of retrain.data.TrainingExample
    validation_file: Path
    output_dir: Path  # the adapter directory; must not exist yet
    config: TrainingConfig = field(default_factory=TrainingConfig)
    hpo_trials: int = 0  # > 0: search first (retrain.training.hpo), then train the winner in full


@dataclass(frozen=True)
class TrainingProgress:
    epoch: float
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None  # set on the steps that end an epoch


@dataclass(frozen=True)
class Evaluation:
    """The monitor's quality metrics of one model on the held-out examples."""

    model: str  # candidate | base | parent
    n: int
    exact_match: float | None
    chrf: float | None
    rouge_l: float | None


@dataclass(frozen=True)
class TrainingResult:
    """What a run produced. The held-out examples of `before` and `after` are the validation
    split: never trained on, though early stopping read its loss to pick the epoch."""

    adapter_dir: Path
    parent_adapter: Path | None
    config: TrainingConfig
    train_examples: int
    validation_examples: int
    dropped_too_long: int
    steps: int
    epochs_run: float
    stopped_early: bool
    best_val_loss: float | None  # of the epoch restored at the end
    last_val_loss: float | None  # at the last step (where a partial budget ended)
    train_seconds: float
    samples_per_second: float
    tokens_per_second: float  # non-padding tokens, all processes together
    device: str
    bf16: bool
    threads_per_process: int
    world_size: int
    before: Evaluation | None  # the starting point: the base model or the parent adapter
    after: Evaluation | None  # the new adapter


ProgressCallback = Callable[[TrainingProgress], None]


def progress_path(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + ".progress.jsonl")


def result_path(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + ".result.json")


def save_spec(spec: TrainingSpec, path: Path) -> None:
    """Write a spec for `python -m retrain.trainer --spec PATH`."""
    path.write_bytes(TypeAdapter(TrainingSpec).dump_json(spec, indent=2))


def load_spec(path: Path) -> TrainingSpec:
    try:
        return TypeAdapter(TrainingSpec).validate_json(path.read_bytes())
    except OSError as exc:
        raise TrainingError(f"cannot read spec {path}: {exc.strerror}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise TrainingError(f"invalid spec {path}: {problems}") from None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Written whole or not at all: a reader never sees half a result."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(partial, path)


def append_progress(path: Path) -> ProgressCallback:
    def write(update: TrainingProgress) -> None:
        line = {"time": datetime.now(UTC).isoformat(), **asdict(update)}
        with path.open("a") as sink:
            sink.write(json.dumps(line) + "\n")

    return write
