"""The PEFT trainer: a LoRA adapter from a training set, judged with the monitor's own metrics.

It runs in a child process (retrain/trainer.py, the entry point). It runs under `torchrun`
(or `accelerate launch`) too: transformers' Trainer does the distributed part (DDP; gloo on
CPU), rank 0 alone saves and evaluates.

The Trainer is used rather than a loop of our own because it already has what a retrain
needs: per-epoch validation, early stopping that restores the best epoch, bf16 autocast,
DDP, and callbacks. What it lacks is added as callbacks: a loss that turns NaN or infinite
aborts the run (its default is to paper over it in the logged average), progress goes to
the caller and to a rich bar on a terminal, and a partial budget (the trials of
retrain.training.hpo) ends the run after its share of the steps.

Threads are explicit: on a shared CPU, torch's default (every core) fights the engine and
slows both several-fold (docs/design.md), so a job gets a thread count, split among the
processes of a distributed run, never more than the cores it was given. bf16 is used only
where the hardware does it natively (CUDA with bf16, or a CPU with AMX or AVX512-BF16);
elsewhere it would be emulated, slower than float32.

The adapter appears all at once: it is written to a staging directory and renamed into
place only after training and evaluation succeeded, so a failed run leaves no adapter.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
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
from retrain.data import TrainingDataError, TrainingExample, prompt_messages, read_examples, render
from retrain.training.spec import (
    Evaluation,
    NonFiniteLossError,
    ProgressCallback,
    TrainingConfig,
    TrainingError,
    TrainingProgress,
    TrainingResult,
    TrainingSpec,
)


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
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            "{task.fields[losses]}",
            console=Console(stderr=True),
        )
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
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
