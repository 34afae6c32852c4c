"""The PEFT trainer: a LoRA adapter from a training set, judged with the monitor's own metrics.

It runs as a child process so that a crash, an out-of-memory kill or a NaN cannot take the
daemon down: `python -m retrain.trainer --job ID` for a job of the daemon (the spec is read
from the job's row in the store, progress is written back to it) or `--spec SPEC.json` for
a spec in a file. Either way it writes two files next to the output directory: progress
lines while it runs and one result JSON at the end, which the parent reads. The
same entry point runs under `torchrun` (or `accelerate launch`): transformers' Trainer does
the distributed part (DDP; gloo on CPU), rank 0 alone saves and evaluates.

The Trainer is used rather than a loop of our own because it already has what a retrain
needs: per-epoch validation, early stopping that restores the best epoch, bf16 autocast,
DDP, and callbacks. What it lacks is added as callbacks: a loss that turns NaN or infinite
aborts the run (its default is to paper over it in the logged average), progress goes to
the caller and to a rich bar on a terminal, and a partial budget (the trials of retrain.hpo)
ends the run after its share of the steps.

Threads are explicit: on a shared CPU, torch's default (every core) fights the engine and
slows both several-fold (DESIGN.md), so a job gets a thread count, split among the
processes of a distributed run, never more than the cores it was given. bf16 is used only
where the hardware does it natively (CUDA with bf16, or a CPU with AMX or AVX512-BF16);
elsewhere it would be emulated, slower than float32.

The adapter appears all at once: it is written to a staging directory and renamed into
place only after training and evaluation succeeded, so a failed run leaves no adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from monitor.quality import quality
from monitor.window import ExchangeView, Window
from retrain.data import (
    TrainingDataError,
    TrainingExample,
    prompt_messages,
    read_examples,
    render,
)
from store import Store
from store.jobs import TrainingJob

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class TrainingError(RuntimeError):
    """A training run that cannot produce an adapter; the message is the recorded reason."""


class NonFiniteLossError(TrainingError):
    pass


@dataclass(frozen=True)
class TrainingConfig:
    """Every knob of a run. Continuing a parent adapter keeps the parent's LoRA shape
    (rank, alpha, dropout, target modules): only the optimisation settings apply to it."""

    rank: int = 8  # vLLM's server refuses adapters over its --max-lora-rank (16 by default)
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
    hpo_trials: int = 0  # > 0: search first (retrain.hpo), then train the winner in full


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


def train(spec: TrainingSpec, progress: ProgressCallback | None = None) -> TrainingResult | None:
    """Train, save and evaluate an adapter. Returns the result on rank 0, None on other ranks.

    Raises TrainingError (or TrainingDataError) with the reason when no adapter can be made;
    nothing is left at `spec.output_dir` then.
    """
    if spec.output_dir.exists():
        raise TrainingError(f"output directory {spec.output_dir} already exists")
    spec.output_dir.parent.mkdir(parents=True, exist_ok=True)
    config = spec.config
    threads = configure_threads(config.threads)
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    train_set, dropped = load_split(spec.train_file, tokenizer, config.max_length)
    validation_set, dropped_too = load_split(spec.validation_file, tokenizer, config.max_length)
    model = load_model(spec.model_dir, spec.parent_adapter, config)
    reporters: list[TrainerCallback] = [ReportProgress(progress)] if progress else []
    bar = RichProgressBar() if sys.stderr.isatty() and is_rank_zero() else None
    if bar is not None:
        reporters.append(bar)
    work_dir = spec.output_dir.with_name(f".{spec.output_dir.name}.work")
    trainer = build_trainer(
        model, tokenizer, train_set, validation_set, config, work_dir, reporters
    )
    with bar.bar if bar else contextlib.nullcontext():
        outcome = fit_save_evaluate(trainer, tokenizer, validation_set, spec, work_dir)
    if outcome is None:
        return None
    seconds, before, after = outcome
    state, args = trainer.state, trainer.args
    epochs = state.epoch or 0.0
    return TrainingResult(
        adapter_dir=spec.output_dir,
        parent_adapter=spec.parent_adapter,
        config=config,
        train_examples=len(train_set),
        validation_examples=len(validation_set),
        dropped_too_long=dropped + dropped_too,
        steps=state.global_step,
        epochs_run=epochs,
        stopped_early=state.global_step < budget_steps(state.max_steps, config.budget_fraction),
        best_val_loss=state.best_metric,
        last_val_loss=next(
            (log["eval_loss"] for log in reversed(state.log_history) if "eval_loss" in log), None
        ),
        train_seconds=seconds,
        samples_per_second=epochs * len(train_set) / seconds,
        tokens_per_second=state.num_input_tokens_seen / seconds,
        device=str(args.device),
        bf16=args.bf16,
        threads_per_process=threads,
        world_size=args.world_size,
        before=before,
        after=after,
    )


def fit_save_evaluate(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    validation_set: Sequence[TrainingExample],
    spec: TrainingSpec,
    work_dir: Path,
) -> tuple[float, Evaluation | None, Evaluation | None] | None:
    """Train; on rank 0, stage the adapter, evaluate it, then move it into place.

    Returns the training seconds and the before/after evaluations (None on other ranks).
    """
    staging = spec.output_dir.with_name(f".{spec.output_dir.name}.partial")
    try:
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        if not trainer.is_world_process_zero():
            return None
        trainer.model.save_pretrained(staging)
        before, after = compare(trainer.model, tokenizer, validation_set, spec, trainer.args.bf16)
        os.replace(staging, spec.output_dir)
        return seconds, before, after
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(work_dir, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)


def is_rank_zero() -> bool:
    """The first (or only) process of the job, before and after torch.distributed starts."""
    return os.environ.get("RANK", "0") == "0"


def configure_threads(requested: int | None) -> int:
    """Set torch's thread count: the job's share for this process, within the cores given."""
    cores = len(os.sched_getaffinity(0))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_process = max(1, min(requested or cores, cores) // processes)
    torch.set_num_threads(per_process)
    return per_process


def bf16_supported() -> bool:
    """Native bf16 only: on other hardware autocast emulates it, slower than float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # torch's own CPU feature probes (what its oneDNN bf16 kernels check); no public name yet.
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def load_split(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[TrainingExample], int]:
    """The examples of one split that fit max_length, and how many did not."""
    examples = read_examples(path)
    fitting = [e for e in examples if len(render(e, tokenizer).input_ids) <= max_length]
    if not fitting:
        raise TrainingDataError(
            f"{path}: no examples to train on ({len(examples)} read, "
            f"{len(examples) - len(fitting)} over max_length={max_length} tokens)"
        )
    return fitting, len(examples) - len(fitting)


def load_model(model_dir: Path, parent_adapter: Path | None, config: TrainingConfig) -> PeftModel:
    """The base model with a trainable LoRA: the parent adapter's weights, or PEFT's fresh init
    (B = 0, so training starts exactly at the base model)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if parent_adapter is not None:
        return PeftModel.from_pretrained(base, parent_adapter, is_trainable=True)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def build_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Sequence[TrainingExample],
    validation_set: Sequence[TrainingExample],
    config: TrainingConfig,
    work_dir: Path,
    reporters: list[TrainerCallback],
) -> Trainer:
    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = TrainingArguments(
        output_dir=str(work_dir),  # per-epoch checkpoints, so the best epoch can be restored
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=1,
        logging_nan_inf_filter=False,  # its default hides a NaN step in the logged average
        include_num_input_tokens_seen="non_padding",
        bf16=bf16_supported(),
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and distributed else None,
        ddp_find_unused_parameters=False,
        report_to="none",
        disable_tqdm=True,
    )
    callbacks = [
        EarlyStoppingCallback(early_stopping_patience=config.patience),
        AbortOnNonFiniteLoss(),  # before the reporters: a NaN is never reported as progress
        *([StopAtBudget(config.budget_fraction)] if config.budget_fraction < 1 else []),
        *reporters,
    ]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[render(e, tokenizer).features() for e in train_set],
        eval_dataset=[render(e, tokenizer).features() for e in validation_set],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the raw log dicts; progress goes to the callbacks
    return trainer


class AbortOnNonFiniteLoss(TrainerCallback):
    """Stop the run with a reason the moment a logged loss is NaN or infinite.

    The logged loss is gathered over all processes, so every rank raises at the same step.
    """

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{key} is {value} at step {state.global_step} (epoch {state.epoch:.2f}): "
                    "training aborted, no adapter saved"
                )


def budget_steps(total_steps: int, fraction: float) -> int:
    """The steps of a partial budget: the nearest whole step, at least one."""
    return max(1, round(fraction * total_steps))


class StopAtBudget(TrainerCallback):
    """End the run once it has trained its share of the full run's steps.

    The Trainer still plans the full run (its learning-rate schedule spans every step), so a
    partial run is exactly the first steps of the full one. Stopping ends the epoch early, and
    the epoch's end validates (and checkpoints): the last step always has a validation loss.
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step >= budget_steps(state.max_steps, self.fraction):
            control.should_training_stop = True


class ReportProgress(TrainerCallback):
    """Hands the caller a TrainingProgress for every logged step and validation (rank 0)."""

    def __init__(self, progress: ProgressCallback) -> None:
        self.progress = progress
        self.train_loss: float | None = None

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero or ("loss" not in logs and "eval_loss" not in logs):
            return
        self.train_loss = logs.get("loss", self.train_loss)
        self.progress(
            TrainingProgress(
                epoch=state.epoch or 0.0,
                step=state.global_step,
                total_steps=state.max_steps,
                train_loss=self.train_loss,
                val_loss=logs.get("eval_loss"),
            )
        )


class RichProgressBar(TrainerCallback):
    """Steps and the latest losses on a rich bar, for a person at a terminal.

    `bar` is a rich Progress: the caller enters it around training, so the terminal is
    restored however training ends.
    """

    def __init__(self) -> None:
        self.bar = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), "{task.fields[losses]}",
            console=Console(stderr=True),
        )  # fmt: skip
        self.task = self.bar.add_task("training", total=None, losses="")
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.bar.update(self.task, total=state.max_steps)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        names = {"loss": "loss", "eval_loss": "val loss"}
        self.latest.update({name: logs[key] for key, name in names.items() if key in (logs or {})})
        losses = "  ".join(f"{name} {value:.4f}" for name, value in self.latest.items())
        self.bar.update(self.task, completed=state.global_step, losses=losses)


def compare(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Sequence[TrainingExample],
    spec: TrainingSpec,
    bf16: bool,
) -> tuple[Evaluation | None, Evaluation | None]:
    """The starting point and the new adapter on the same held-out examples."""
    examples = held_out[: spec.config.eval_max_examples]
    if not examples:
        return None, None
    max_new_tokens = spec.config.eval_max_new_tokens
    after = evaluate(model, tokenizer, examples, "candidate", max_new_tokens, bf16=bf16)
    if spec.parent_adapter is None:
        with model.disable_adapter():
            before = evaluate(model, tokenizer, examples, "base", max_new_tokens, bf16=bf16)
    else:
        model.load_adapter(spec.parent_adapter, adapter_name="parent")
        model.set_adapter("parent")
        before = evaluate(model, tokenizer, examples, "parent", max_new_tokens, bf16=bf16)
    return before, after


def evaluate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    label: str,
    max_new_tokens: int,
    *,
    bf16: bool,
    batch_size: int = 16,
) -> Evaluation:
    """Greedy answers to the examples' prompts, scored by the monitor's `quality`."""
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        answers += generate(model, tokenizer, [e.prompt for e in batch], max_new_tokens, bf16)
    now = datetime.now(UTC)
    views = tuple(
        ExchangeView(
            id=e.source_id,
            created_at=now,
            adapter=label,
            route="evaluation",
            prompt=e.prompt,
            response=answer,
            completion_tokens=None,
            mean_logprob=None,
            latency_seconds=0.0,
            status="ok",
            reference=e.reference,
        )
        for e, answer in zip(examples, answers, strict=True)
    )
    scores = quality(Window(label, views))
    return Evaluation(
        label, scores.n, scores.exact_match_ratio, scores.chrf, scores.rouge["rougeL"]
    )


@torch.inference_mode()
def generate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    bf16: bool,
) -> list[str]:
    texts = [
        tokenizer.apply_chat_template(
            prompt_messages(p), add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    inputs = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(model.device)
    model.eval()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# The child process: spec in, progress lines and one result JSON out, next to the adapter.


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
        "--database-url", default=os.environ.get("TUNEWATCH_DATABASE_URL"),
        help="the store of --job (default: $TUNEWATCH_DATABASE_URL)",
    )  # fmt: skip
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
            from retrain.hpo import tune  # retrain.hpo builds on this module

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
