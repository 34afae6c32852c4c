"""The HPO search without a model: the search space, the study around a stand-in for training,
failed trials, and the rank agreement of early and final scores.

A real search (two trials of SmolLM2) is in tests/integration/test_trainer.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrain.training import hpo
from retrain.training.hpo import (
    MAX_LORA_RANK,
    SearchSpace,
    TrialResult,
    finish,
    rank_agreement,
    tune,
)
from retrain.training.spec import NonFiniteLossError, TrainingConfig, TrainingError, TrainingSpec

BASE = TrainingConfig(epochs=2, batch_size=4, max_length=64, threads=1)


def spec(tmp_path: Path, *, parent: Path | None = None) -> TrainingSpec:
    return TrainingSpec(
        model_dir=tmp_path / "model",
        parent_adapter=parent,
        train_file=tmp_path / "train.jsonl",
        validation_file=tmp_path / "validation.jsonl",
        output_dir=tmp_path / "adapters" / "support-v2",
        config=BASE,
    )


class FakeTraining:
    """Stands in for hpo.partial_val_loss: a loss from the config, remembering every call."""

    def __init__(self, diverges=lambda config: False) -> None:
        self.calls: list[tuple[TrainingConfig, float]] = []
        self.diverges = diverges

    def __call__(self, spec, config, budget_fraction, scratch) -> float:
        self.calls.append((config, budget_fraction))
        if self.diverges(config):
            raise NonFiniteLossError("loss is nan at step 1 (epoch 0.10): training aborted")
        return abs(math.log10(config.learning_rate) + 3) + config.rank / 100


@pytest.fixture
def training(monkeypatch) -> FakeTraining:
    fake = FakeTraining()
    monkeypatch.setattr(hpo, "partial_val_loss", fake)
    return fake


def test_the_default_search_space_stays_within_vllms_rank_limit():
    assert max(SearchSpace().ranks) <= MAX_LORA_RANK == 16


def test_a_search_space_over_vllms_rank_limit_is_refused():
    with pytest.raises(ValueError, match=r"ranks <= 16 \(vLLM's --max-lora-rank\)"):
        SearchSpace(ranks=(8, 32))


def test_a_bad_search_space_names_every_broken_rule():
    with pytest.raises(ValueError, match=r"learning_rate low < high.*0 <= dropouts < 1"):
        SearchSpace(learning_rate=(1e-2, 1e-5), dropouts=(1.0,))


def test_every_trial_samples_inside_the_space_with_alpha_a_multiple_of_rank(
    tmp_path: Path, training: FakeTraining
):
    result = tune(spec(tmp_path), 12)
    space = SearchSpace()
    for trial in result.trials:
        config = trial.config
        assert config.rank in space.ranks
        assert config.alpha == config.rank * trial.params["alpha_multiple"]
        assert config.dropout in space.dropouts
        assert space.learning_rate[0] <= config.learning_rate <= space.learning_rate[1]


def test_each_trial_trains_a_fifth_of_the_budget_and_skips_nothing_else_of_the_spec(
    tmp_path: Path, training: FakeTraining
):
    tune(spec(tmp_path), 3)
    assert [fraction for _, fraction in training.calls] == [0.2, 0.2, 0.2]
    for config, _ in training.calls:
        assert (config.epochs, config.batch_size, config.max_length) == (2, 4, 64)


def test_the_best_config_is_the_lowest_scoring_trials_at_the_full_budget(
    tmp_path: Path, training: FakeTraining
):
    result = tune(spec(tmp_path), 6)
    best = min(result.trials, key=lambda t: t.val_loss)
    assert (result.best_trial, result.best) == (best.number, best.config)
    assert result.best.budget_fraction == 1.0
    assert [t.number for t in result.trials] == list(range(6))
    assert result.budget_fraction == 0.2 and result.seconds >= 0


def test_the_same_seed_samples_the_same_trials(tmp_path: Path, training: FakeTraining):
    first = tune(spec(tmp_path), 4, seed=7)
    again = tune(spec(tmp_path), 4, seed=7)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]


def test_continuing_a_parent_adapter_searches_the_learning_rate_only(
    tmp_path: Path, training: FakeTraining
):
    result = tune(spec(tmp_path, parent=tmp_path / "parent"), 3)
    assert all(set(t.params) == {"learning_rate"} for t in result.trials)
    assert all(replace(t.config, learning_rate=BASE.learning_rate) == BASE for t in result.trials)


def test_a_diverging_trial_is_recorded_with_its_reason_and_the_search_goes_on(
    tmp_path: Path, monkeypatch, caplog
):
    fake = FakeTraining(diverges=lambda config: config.learning_rate > 1e-3)
    monkeypatch.setattr(hpo, "partial_val_loss", fake)
    result = tune(spec(tmp_path), 8)
    failed = [t for t in result.trials if t.val_loss is None]
    assert failed and len(result.trials) == 8
    assert all(t.failure.startswith("loss is nan at step 1") for t in failed)
    assert result.best.learning_rate <= 1e-3
    assert any("failed: loss is nan" in r.getMessage() for r in caplog.records)


def test_a_search_where_every_trial_diverges_fails_with_the_reasons(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(hpo, "partial_val_loss", FakeTraining(diverges=lambda config: True))
    with pytest.raises(TrainingError, match=r"every HPO trial failed: trial 0: loss is nan"):
        tune(spec(tmp_path), 2)


def test_a_search_refuses_an_output_directory_that_exists(tmp_path: Path, training: FakeTraining):
    spec(tmp_path).output_dir.mkdir(parents=True)
    with pytest.raises(TrainingError, match="already exists"):
        tune(spec(tmp_path), 2)
    assert training.calls == []


def test_progress_hears_of_every_trial_as_it_ends(tmp_path: Path, training: FakeTraining):
    seen: list[TrialResult] = []
    result = tune(spec(tmp_path), 3, progress=seen.append)
    assert seen == list(result.trials)


def test_optuna_logs_through_standard_logging_and_is_quiet_by_default(
    tmp_path: Path, training: FakeTraining, caplog
):
    optuna_logger = logging.getLogger("optuna")
    assert optuna_logger.propagate and optuna_logger.handlers == []
    tune(spec(tmp_path), 2)
    assert [r for r in caplog.records if r.name.startswith("optuna")] == []


def test_finishing_trains_every_completed_trial_in_full_and_records_divergence(
    tmp_path: Path, monkeypatch
):
    configs = [replace(BASE, learning_rate=lr) for lr in (1e-4, 1e-3, 1e-2)]
    trials = [
        TrialResult(0, {"learning_rate": 1e-4}, configs[0], 1.5, 1.0),
        TrialResult(1, {"learning_rate": 1e-3}, configs[1], None, 1.0, "loss is nan"),
        TrialResult(2, {"learning_rate": 1e-2}, configs[2], 1.2, 1.0),
    ]
    trained: list[TrainingConfig] = []

    def full_run(spec, config, scratch):
        trained.append(config)
        if config.learning_rate > 1e-3:
            raise NonFiniteLossError("loss is inf at step 7")
        return SimpleNamespace(best_val_loss=0.9, last_val_loss=1.0)

    monkeypatch.setattr(hpo, "scored_run", full_run)
    finished = finish(spec(tmp_path), trials)
    assert trained == [configs[0], configs[2]]  # the failed trial is not finished
    assert all(config.budget_fraction == 1.0 for config in trained)
    assert [(t.number, t.val_loss, t.failure) for t in finished] == [
        (0, 0.9, None),
        (2, None, "loss is inf at step 7"),
    ]


def test_rankings_that_agree_have_rho_one_and_no_regret():
    agreement = rank_agreement([1.0, 2.0, 3.0, 4.0], [0.5, 0.6, 0.7, 0.8])
    assert agreement.spearman_rho == pytest.approx(1.0)
    assert agreement.early_pick_is_final_best and agreement.regret == 0
    assert (agreement.n, agreement.top_k, agreement.top_k_kept) == (4, 3, 3)


def test_reversed_rankings_have_rho_minus_one_and_the_whole_spread_as_regret():
    agreement = rank_agreement([1.0, 2.0, 3.0], [0.9, 0.7, 0.5])
    assert agreement.spearman_rho == pytest.approx(-1.0)
    assert not agreement.early_pick_is_final_best
    assert agreement.regret == pytest.approx(0.4)


def test_one_swap_at_the_top_gives_spearmans_rho_and_the_regret_of_the_early_pick():
    agreement = rank_agreement([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 3.0, 4.0], top_k=2)
    assert agreement.spearman_rho == pytest.approx(1 - 6 * 2 / (4 * (4**2 - 1)))  # 0.8
    assert 0 < agreement.p_value < 1
    assert not agreement.early_pick_is_final_best
    assert agreement.regret == pytest.approx(1.0)
    assert agreement.top_k_kept == 2  # the same two trials, in the other order


def test_rank_agreement_needs_two_trials_with_both_scores():
    with pytest.raises(ValueError, match="two or more trials"):
        rank_agreement([1.0], [1.0])
    with pytest.raises(ValueError, match="two or more trials"):
        rank_agreement([1.0, 2.0], [1.0])
