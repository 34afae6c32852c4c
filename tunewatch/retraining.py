"""Assembles the controller's parts from the settings: the retrain trigger, training jobs,
rollouts and retention.

Bad values are refused here, at start, with the setting's name: a typo in
`retrain.training` must not surface hours later as a failed training job.
"""

from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from controller.retention import RetentionConfig
from monitor.goldens import DEFAULT_GOLDEN_SET
from retrain.jobs import RetrainConfig
from retrain.policy import TriggerConfig
from retrain.training.spec import TrainingConfig
from retrain.trigger import QualitySignal
from rollout.guards.types import GuardConfig
from rollout.machine import RolloutConfig
from rollout.runner import RunnerConfig
from tunewatch.settings import Settings, SettingsError


def trigger_config(settings: Settings) -> TriggerConfig:
    options = settings.retrain
    try:
        return TriggerConfig(
            consecutive_checks=options.consecutive_checks,
            min_new_labelled=options.min_new_labelled,
            cooldown=timedelta(seconds=options.cooldown_s),
            daily_budget=options.daily_budget,
            enter_share=options.enter_share,
            exit_share=options.exit_share,
            quality_drop=options.quality_drop,
            quality_metric=options.quality_metric,
        )
    except ValueError as exc:
        raise SettingsError(f"retrain: {exc}") from None


def quality_signal(settings: Settings) -> QualitySignal:
    return QualitySignal(settings.retrain.quality_metric, settings.monitor.window_size)


def training_config(settings: Settings) -> TrainingConfig:
    given = settings.retrain.training
    known = {field.name for field in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise SettingsError(
            f"retrain.training: unknown fields {unknown}; known are {sorted(known)}"
        )
    try:
        return TypeAdapter(TrainingConfig).validate_python(
            {"threads": settings.retrain.threads, **given}
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(f"retrain.training: {problems}") from None


def runner_config(settings: Settings) -> RunnerConfig:
    options = settings.rollout
    try:
        guards = GuardConfig(
            alpha=options.alpha,
            quality_margin=options.quality_margin,
            latency_max_ratio=options.latency_max_ratio,
            error_margin=options.error_margin,
            min_samples=options.min_samples,
            planned_samples=options.planned_samples,
            guards=tuple(options.guards),
        )
        rollout = RolloutConfig(
            steps=tuple(options.steps),
            shadow_fraction=options.shadow_fraction,
            shadow_min_pairs=options.shadow_min_pairs,
            step_min_samples=options.step_min_samples,
            stage_min_s=options.stage_min_s,
            stage_deadline_s=options.stage_deadline_s,
            step_target_s=options.step_target_s,
            require_pass=options.require_pass,
            guards=guards,
        )
    except ValueError as exc:
        raise SettingsError(f"rollout: {exc}") from None
    return RunnerConfig(rollout, options.metric, options.auto_start, options.drain_s)


def retrain_config(settings: Settings, model_dir: Path) -> RetrainConfig:
    options = settings.retrain
    return RetrainConfig(
        model_dir=model_dir,
        jobs_dir=settings.state_dir / "training",
        database_url=settings.store_url,
        training=training_config(settings),
        family=options.family or f"{settings.engine.served_model_name}-ft",
        start_from=options.start_from,
        use_goldens=options.use_goldens,
        golden_set=settings.monitor.golden_set or DEFAULT_GOLDEN_SET,
        max_examples=options.max_examples,
        validation_fraction=options.validation_fraction,
        start_delay_s=options.start_delay_s,
        hpo_trials=options.hpo_trials,
        launcher=tuple(options.launcher) or (sys.executable,),
    )


def retention_config(settings: Settings, base_adapter: str | None) -> RetentionConfig | None:
    """None when neither limit is set: every exchange is kept."""
    options = settings.store
    if options.retention_days is None and options.retention_max_exchanges is None:
        return None
    return RetentionConfig(
        max_age=None if options.retention_days is None else timedelta(days=options.retention_days),
        max_exchanges=options.retention_max_exchanges,
        batch=options.retention_batch,
        base_adapter=base_adapter,
        reference_size=settings.monitor.reference_size,
        window_size=settings.monitor.window_size,
        max_examples=settings.retrain.max_examples,
    )
