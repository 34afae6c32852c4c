"""What the trainer costs: retrain.trainer against a plain PEFT + torch loop on the same data.
Prints figures; asserts nothing.

trainer   `retrain.trainer.train` as the daemon runs it, minus the final generation: the
          transformers Trainer with per-epoch validation, a checkpoint per epoch, the best
          epoch restored at the end, the NaN guard and the progress callback.
plain     the least a LoRA fine-tune has to do: the same model, LoRA config, collator,
          batch size (shuffled, seeded), AdamW and learning rate; forward, backward, step;
          one validation pass per epoch. No checkpoints, no callbacks, no scheduler.

Both run in this one process with the same torch thread count, rounds alternating (ABAB)
so a machine that drifts favours neither; model loading is outside the timed part.
Throughput: training samples per second, and non-padding tokens per second. On 2 shared
cores the wall times follow whoever else wants the cores: compare figures of one run only;
the process CPU time of each whole run (loading included, the same for both) is steadier.

    .venv/bin/python -m bench.retrain [--rounds R] [--epochs E] [--threads T]

(as a module: run as a script, bench/monitor.py would shadow the monitor package)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from monitor.goldens import DEFAULT_GOLDEN_SET, load_golden_set
from retrain.data import build_training_set, read_examples, render, write_training_set
from retrain.trainer import TrainingConfig, TrainingSpec, train
from tunewatch import stack
from tunewatch.settings import load_settings


@dataclass(frozen=True)
class Throughput:
    contender: str
    seconds: float
    samples_per_second: float
    tokens_per_second: float
    cpu_seconds: float  # the whole run, model loading included (the same for both)

    def __str__(self) -> str:
        return (
            f"{self.contender:8s} {self.seconds:7.1f} s {self.samples_per_second:6.2f} samples/s "
            f"{self.tokens_per_second:7.1f} tokens/s  {self.cpu_seconds:6.1f} CPU s"
        )


def write_data(model_dir: Path, root: Path, max_length: int) -> tuple[Path, Path]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    goldens = load_golden_set(DEFAULT_GOLDEN_SET)
    training_set = build_training_set([], goldens, tokenizer, max_length=max_length)
    return write_training_set(training_set, root)


def run_trainer(model_dir: Path, data: tuple[Path, Path], config: TrainingConfig) -> Throughput:
    cpu = time.process_time()
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as scratch:
        spec = TrainingSpec(model_dir, None, data[0], data[1], Path(scratch) / "adapter", config)
        result = train(spec)
    if result is None:
        raise SystemExit("run the benchmark as one process, not under torchrun")
    return Throughput(
        "trainer", result.train_seconds, result.samples_per_second, result.tokens_per_second,
        time.process_time() - cpu,
    )  # fmt: skip


def run_plain(model_dir: Path, data: tuple[Path, Path], config: TrainingConfig) -> Throughput:
    cpu = time.process_time()
    torch.set_num_threads(config.threads or torch.get_num_threads())
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
            target_modules=list(config.target_modules), task_type="CAUSAL_LM",
        ),
    )  # fmt: skip
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
    train_set, validation_set = (
        [render(e, tokenizer).features() for e in read_examples(path)] for path in data
    )
    batches = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    validation = DataLoader(validation_set, batch_size=config.batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    tokens = 0
    started = time.perf_counter()
    for _ in range(config.epochs):
        model.train()
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
        model.eval()
        with torch.no_grad():
            for batch in validation:
                model(**batch)
    seconds = time.perf_counter() - started
    samples = config.epochs * len(train_set)
    cpu = time.process_time() - cpu
    return Throughput("plain", seconds, samples / seconds, tokens / seconds, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="ABAB rounds (default 2)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    config = replace(
        TrainingConfig(), epochs=args.epochs, threads=args.threads, max_length=64,
        batch_size=8, eval_max_examples=0, patience=args.epochs,
    )  # fmt: skip
    model_dir, _ = stack.prepare(load_settings())
    runs: list[Throughput] = []
    with tempfile.TemporaryDirectory(prefix="bench-retrain-data-") as scratch:
        data = write_data(model_dir, Path(scratch), config.max_length)
        print(
            f"{len(read_examples(data[0]))} training, {len(read_examples(data[1]))} validation "
            f"examples (capitals golden set); {config.epochs} epoch(s), batch {config.batch_size}, "
            f"rank {config.rank}, {config.threads} thread(s)"
        )
        for round_ in range(1, args.rounds + 1):
            for contender in (run_trainer, run_plain):
                runs.append(contender(model_dir, data, config))
                print(f"round {round_} {runs[-1]}")
    summarise(runs)


def summarise(runs: list[Throughput]) -> None:
    def median(contender: str) -> Throughput:
        mine = [r for r in runs if r.contender == contender]
        figures = ("seconds", "samples_per_second", "tokens_per_second", "cpu_seconds")
        return Throughput(
            contender, *(statistics.median(getattr(r, f) for r in mine) for f in figures)
        )

    trainer, plain = median("trainer"), median("plain")
    print(f"median  {trainer}\nmedian  {plain}")
    throughput = trainer.samples_per_second / plain.samples_per_second
    cpu = trainer.cpu_seconds / plain.cpu_seconds
    print(f"trainer / plain: throughput {throughput:.2f}, CPU time {cpu:.2f}")


if __name__ == "__main__":
    main()
