"""What the trainer costs: retrain.trainer against a plain PEFT + torch loop on the same data;
and, asked for, how well HPO's 20% scores predict the final ones. Prints figures; asserts nothing.

trainer   `retrain.training.lora.train` as the daemon runs it, minus the final generation: the
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

hpo       with --hpo-trials N (default 0: none), `retrain.training.hpo.tune` searches N trials
          on the same data and config (--epochs), each judged at --hpo-budget (0.2) of its steps;
          then every trial is trained to the full budget, to see whether the early ranking
          was the final one: a table of the trials (params, early and final validation loss,
          both ranks), Spearman's rho between the two with its p-value, whether the early
          pick is the final best, its regret (its final loss minus the best final loss), how
          many of the early top 3 (and 5) stay in the final top 3 (5), and the time of the
          search against that of training every trial in full. --rounds 0 skips the throughput
          comparison.

    .venv/bin/python -m bench.retrain [--rounds R] [--epochs E] [--threads T]
                                      [--hpo-trials N] [--hpo-budget F]

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
from retrain.training.hpo import TrialResult, finish, rank_agreement, tune
from retrain.training.lora import train
from retrain.training.spec import TrainingConfig, TrainingSpec
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
        "trainer",
        result.train_seconds,
        result.samples_per_second,
        result.tokens_per_second,
        time.process_time() - cpu,
    )


def run_plain(model_dir: Path, data: tuple[Path, Path], config: TrainingConfig) -> Throughput:
    cpu = time.process_time()
    torch.set_num_threads(config.threads or torch.get_num_threads())
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
    train_set, validation_set = (
        [render(e, tokenizer).features() for e in read_examples(path)] for path in data
    )
    batches = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )
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
    parser.add_argument("--hpo-trials", type=int, default=0, help="HPO trials (default 0: none)")
    parser.add_argument("--hpo-budget", type=float, default=0.2, help="of a trial's steps")
    args = parser.parse_args()
    config = replace(
        TrainingConfig(),
        epochs=args.epochs,
        threads=args.threads,
        max_length=64,
        batch_size=8,
        eval_max_examples=0,
        patience=args.epochs,
    )
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
        if runs:
            summarise(runs)
        if args.hpo_trials:
            run_hpo(model_dir, data, config, args.hpo_trials, args.hpo_budget)


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


def run_hpo(
    model_dir: Path, data: tuple[Path, Path], config: TrainingConfig, trials: int, budget: float
) -> None:
    def row(trial: TrialResult) -> str:
        params = trial.config
        return (
            f"trial {trial.number:2d}  lr {params.learning_rate:8.2e}  rank {params.rank:2d}  "
            f"alpha {params.alpha:2d}  dropout {params.dropout:4.2f}"
        )

    def searched(trial: TrialResult) -> None:
        loss = "failed" if trial.val_loss is None else f"val loss {trial.val_loss:.4f}"
        print(f"{row(trial)}  {budget:.0%}: {loss}  {trial.seconds:5.1f} s")

    def finished(trial: TrialResult) -> None:
        loss = "failed" if trial.val_loss is None else f"val loss {trial.val_loss:.4f}"
        print(f"{row(trial)}  full: {loss}  {trial.seconds:5.1f} s")

    print(f"\nHPO: {trials} trials (TPE, seed {config.seed}), each judged at {budget:.0%}")
    with tempfile.TemporaryDirectory(prefix="bench-retrain-hpo-") as scratch:
        spec = TrainingSpec(model_dir, None, data[0], data[1], Path(scratch) / "adapter", config)
        search = tune(spec, trials, budget_fraction=budget, seed=config.seed, progress=searched)
        print("finishing every trial to the full budget")
        started = time.perf_counter()
        full = finish(spec, search.trials, progress=finished)
        finish_seconds = time.perf_counter() - started
    early = {t.number: t for t in search.trials if t.val_loss is not None}
    both = [t for t in full if t.val_loss is not None]
    summarise_hpo(search.best_trial, early, both, search.seconds, finish_seconds)


def summarise_hpo(
    pick: int,
    early: dict[int, TrialResult],
    final: list[TrialResult],
    search_seconds: float,
    finish_seconds: float,
) -> None:
    early_losses = [early[t.number].val_loss for t in final]
    final_losses = [t.val_loss for t in final]
    early_rank = {t.number: 1 + sorted(early_losses).index(early[t.number].val_loss) for t in final}
    final_rank = {t.number: 1 + sorted(final_losses).index(t.val_loss) for t in final}
    print(
        f"\n{'trial':>5s} {'lr':>8s} {'rank':>4s} {'alpha':>5s} {'drop':>4s} "
        f"{'early loss':>10s} {'final loss':>10s} {'early #':>7s} {'final #':>7s}"
    )
    for trial in sorted(final, key=lambda t: early_rank[t.number]):
        c = trial.config
        print(
            f"{trial.number:5d} {c.learning_rate:8.2e} {c.rank:4d} {c.alpha:5d} {c.dropout:4.2f} "
            f"{early[trial.number].val_loss:10.4f} {trial.val_loss:10.4f} "
            f"{early_rank[trial.number]:7d} {final_rank[trial.number]:7d}"
        )
    if len(final) < 2:
        print("fewer than two trials finished: no rank correlation")
        return
    agreement = rank_agreement(early_losses, final_losses, top_k=3)
    top_5 = rank_agreement(early_losses, final_losses, top_k=5)  # the paper's figure: 4 of 5
    best = min(final, key=lambda t: t.val_loss)
    pick_seconds = next((t.seconds for t in final if t.number == pick), 0.0)
    print(
        f"Spearman rho (early vs final val loss) {agreement.spearman_rho:+.3f} "
        f"(p = {agreement.p_value:.3g}, n = {agreement.n})\n"
        f"early pick: trial {pick}; final best: trial {best.number}; the pick is the final best: "
        f"{'yes' if agreement.early_pick_is_final_best else 'no'}; regret "
        f"{agreement.regret:.4f} (val loss)\n"
        f"early top k kept in the final top k: {agreement.top_k_kept} of {agreement.top_k}, "
        f"{top_5.top_k_kept} of {top_5.top_k} (arXiv 2407.13906: 4 of 5)\n"
        f"time: the search {search_seconds:.0f} s + the pick in full {pick_seconds:.0f} s = "
        f"{search_seconds + pick_seconds:.0f} s; every trial in full {finish_seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
