"""Optional hyperparameter search for a retrain: Optuna trials judged at a fifth of their budget.

The method of Oliver & Wang, "Crafting Efficient Fine-Tuning Strategies for Large Language
Models" (arXiv 2407.13906): a Bayesian search (Optuna's TPE sampler, seeded) in which every
trial trains for only `budget_fraction` (20%) of the full run's steps and is scored by its
validation loss at that point; only the winner is then trained in full, by the caller, with
the ordinary `retrain.training.lora.train`. A partial run is the first steps of the full run (the
same seed, data order and learning-rate schedule; see `TrainingConfig.budget_fraction`), so
the 20% score is the full run's own early score, not that of a different, shorter run.

The search space is LoRA's usual one: the learning rate (log-uniform), the rank (never over
16, vLLM's default --max-lora-rank: a larger adapter would train and then fail to load),
alpha as a multiple of the rank (the multiple is LoRA's scale, alpha / rank), and dropout.
Continuing a parent adapter keeps the parent's shape, so only the learning rate is searched.

Trials leave nothing behind (each trains into a temporary directory) and skip the slow
generate-based evaluation. A trial whose loss turns NaN or infinite is recorded with its
reason and marked pruned, not failed: TPE counts pruned trials among the bad ones (it ignores
failed ones), so the search steers away from settings that diverge.

Whether the early ranking predicts the final one is measured, not assumed: `finish` trains
every trial to the full budget and `rank_agreement` compares the two rankings (Spearman's
rho, whether the early pick is the final best, its regret). bench/retrain.py reports them.

Optuna logs through the standard logging module (logger "optuna"), at WARNING by default:
a failed trial is a warning, the per-trial INFO lines appear only when asked for.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from scipy.stats import rankdata, spearmanr

from retrain.training.lora import train
from retrain.training.spec import (
    MAX_LORA_RANK,
    NonFiniteLossError,
    TrainingConfig,
    TrainingError,
    TrainingResult,
    TrainingSpec,
)

optuna.logging.disable_default_handler()  # Optuna's own stderr handler: logging's handlers decide
optuna.logging.enable_propagation()
optuna.logging.set_verbosity(logging.WARNING)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    learning_rate: tuple[float, float] = (1e-5, 1e-2)  # log-uniform between these
    ranks: tuple[int, ...] = (4, 8, 16)
    alpha_multiples: tuple[int, ...] = (1, 2, 4)  # alpha = rank x this
    dropouts: tuple[float, ...] = (0.0, 0.05, 0.1)

    def __post_init__(self) -> None:
        low, high = self.learning_rate
        checks = {
            "0 < learning_rate low < high": 0 < low < high,
            "ranks not empty": bool(self.ranks),
            f"1 <= ranks <= {MAX_LORA_RANK} (vLLM's --max-lora-rank)": all(
                1 <= r <= MAX_LORA_RANK for r in self.ranks
            ),
            "alpha_multiples > 0": bool(self.alpha_multiples)
            and all(m > 0 for m in self.alpha_multiples),
            "0 <= dropouts < 1": bool(self.dropouts) and all(0 <= d < 1 for d in self.dropouts),
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"search space: need {', '.join(failed)}")


@dataclass(frozen=True)
class TrialResult:
    number: int
    params: dict[str, float | int]  # what the sampler chose
    config: TrainingConfig  # the full-budget config these params make
    val_loss: float | None  # at budget_fraction of the steps; None: the trial failed
    seconds: float
    failure: str | None = None  # why it failed (a NaN or infinite loss)


@dataclass(frozen=True)
class HpoResult:
    best: TrainingConfig  # the winner's full-budget config: train it with lora.train
    best_trial: int
    trials: tuple[TrialResult, ...]  # every trial, in the order run
    budget_fraction: float
    seconds: float  # the whole search


@dataclass(frozen=True)
class RankAgreement:
    """How well the early (partial-budget) scores ranked the trials, against their final scores."""

    n: int  # trials with both scores
    spearman_rho: float
    p_value: float
    early_pick_is_final_best: bool
    regret: float  # final loss of the trial the early scores picked, minus the best final loss
    top_k: int
    top_k_kept: int  # of the k best early trials, how many are among the k best final ones


TrialProgress = Callable[[TrialResult], None]


def tune(
    spec: TrainingSpec,
    trials: int,
    *,
    budget_fraction: float = 0.2,
    seed: int = 0,
    space: SearchSpace | None = None,
    progress: TrialProgress | None = None,
) -> HpoResult:
    """Search `trials` configurations, each trained for `budget_fraction` of the full budget
    (spec.config's epochs x steps per epoch). spec.config supplies everything not searched.

    Writes nothing at spec.output_dir (which must not exist yet: the caller trains the winner
    there). Raises TrainingError when every trial failed, and the trainer's errors that no
    choice of hyperparameters can mend (no data, a bad spec).
    """
    if trials < 1 or not 0 < budget_fraction <= 1:
        raise ValueError("tune: need trials >= 1 and 0 < budget_fraction <= 1")
    if spec.output_dir.exists():
        raise TrainingError(f"output directory {spec.output_dir} already exists")
    space = space or SearchSpace()
    continuing = spec.parent_adapter is not None
    base = replace(spec.config, budget_fraction=1.0)  # the full budget
    results: list[TrialResult] = []

    def record(result: TrialResult) -> None:
        results.append(result)
        if progress:
            progress(result)

    def objective(trial: optuna.Trial, scratch: Path) -> float:
        config = suggest(trial, space, base, continuing=continuing)
        started = time.perf_counter()
        try:
            loss = partial_val_loss(spec, config, budget_fraction, scratch)
        except NonFiniteLossError as exc:
            seconds = time.perf_counter() - started
            log.warning("HPO trial %d %s failed: %s", trial.number, trial.params, exc)
            trial.set_user_attr("failure", str(exc))
            record(TrialResult(trial.number, trial.params, config, None, seconds, str(exc)))
            raise optuna.TrialPruned(str(exc)) from None
        record(TrialResult(trial.number, trial.params, config, loss, time.perf_counter() - started))
        return loss

    # Half the trials sample at random before TPE models the rest (Optuna's default is 10,
    # which would leave a short search random throughout).
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, trials // 2)))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunewatch-hpo-") as scratch:
        study.optimize(lambda trial: objective(trial, Path(scratch)), n_trials=trials)
    seconds = time.perf_counter() - started
    if all(r.val_loss is None for r in results):
        reasons = "; ".join(f"trial {r.number}: {r.failure}" for r in results)
        raise TrainingError(f"every HPO trial failed: {reasons}")
    best = study.best_trial.number
    return HpoResult(
        best=next(r.config for r in results if r.number == best),
        best_trial=best,
        trials=tuple(results),
        budget_fraction=budget_fraction,
        seconds=seconds,
    )


def suggest(
    trial: optuna.Trial, space: SearchSpace, base: TrainingConfig, *, continuing: bool
) -> TrainingConfig:
    """The full-budget config of one trial: the base config with the sampled hyperparameters."""
    learning_rate = trial.suggest_float("learning_rate", *space.learning_rate, log=True)
    if continuing:  # the parent adapter's shape is kept: only the optimisation applies
        return replace(base, learning_rate=learning_rate)
    rank = trial.suggest_categorical("rank", space.ranks)
    multiple = trial.suggest_categorical("alpha_multiple", space.alpha_multiples)
    dropout = trial.suggest_categorical("dropout", space.dropouts)
    return replace(
        base, learning_rate=learning_rate, rank=rank, alpha=rank * multiple, dropout=dropout
    )


def partial_val_loss(
    spec: TrainingSpec, config: TrainingConfig, budget_fraction: float, scratch: Path
) -> float:
    """Train `config` for a share of its budget in `scratch`, delete the adapter, return the
    validation loss at the last step."""
    return scored_run(spec, replace(config, budget_fraction=budget_fraction), scratch).last_val_loss


def scored_run(spec: TrainingSpec, config: TrainingConfig, scratch: Path) -> TrainingResult:
    """One run without the generate-based evaluation, into a throwaway directory."""
    with tempfile.TemporaryDirectory(prefix="trial-", dir=scratch) as trial_dir:
        trial_spec = replace(
            spec,
            output_dir=Path(trial_dir) / "adapter",
            config=replace(config, eval_max_examples=0),
        )
        result = train(trial_spec)
    if result is None:
        raise TrainingError("HPO runs in one process: not under torchrun")
    if result.last_val_loss is None or result.best_val_loss is None:
        raise TrainingError("the run ended without a validation loss")
    return result


def finish(
    spec: TrainingSpec, trials: Sequence[TrialResult], progress: TrialProgress | None = None
) -> tuple[TrialResult, ...]:
    """Train every completed trial to its full budget (throwaway adapters, no generation).

    Returns them with val_loss the full run's best validation loss (the loss of the adapter
    `train` would keep) and seconds the full run's; a run that diverges has a failure.
    """
    finished: list[TrialResult] = []
    with tempfile.TemporaryDirectory(prefix="tunewatch-hpo-finish-") as scratch:
        for trial in (t for t in trials if t.val_loss is not None):
            started = time.perf_counter()
            try:
                loss, failure = scored_run(spec, trial.config, Path(scratch)).best_val_loss, None
            except NonFiniteLossError as exc:
                loss, failure = None, str(exc)
            seconds = time.perf_counter() - started
            finished.append(replace(trial, val_loss=loss, seconds=seconds, failure=failure))
            if progress:
                progress(finished[-1])
    return tuple(finished)


def rank_agreement(early: Sequence[float], final: Sequence[float], top_k: int = 3) -> RankAgreement:
    """Compare the trials' early scores with their final ones (losses: lower is better).

    `early[i]` and `final[i]` are one trial's; trials missing either are left out by the caller.
    """
    if len(early) != len(final) or len(early) < 2:
        raise ValueError("rank_agreement: need two or more trials, each with both scores")
    rho, p_value = spearmanr(early, final)
    pick = min(range(len(early)), key=lambda i: early[i])
    k = min(top_k, len(early))
    early_ranks, final_ranks = rankdata(early, method="ordinal"), rankdata(final, method="ordinal")
    kept = sum(1 for e, f in zip(early_ranks, final_ranks, strict=True) if e <= k and f <= k)
    return RankAgreement(
        n=len(early),
        spearman_rho=float(rho),
        p_value=float(p_value),
        early_pick_is_final_best=final[pick] == min(final),
        regret=final[pick] - min(final),
        top_k=k,
        top_k_kept=kept,
    )
