"""Assembles the monitor sidecar from the settings (`tunewatch monitor`, `tunewatch drift`): the
monitor's checks and the controller's jobs (retrain trigger, training, rollouts) on one
scheduler.

Apart from tunewatch/stack.py so that the gateway's process never imports Evidently and
the analysis libraries (about 10 s and several hundred MB): the CLI imports this module
only for the commands that need it.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import start_http_server

from controller.retention import Retention
from controller.scheduler import PeriodicJob, Scheduler
from monitor.drift import Column, DriftConfig
from monitor.embeddings import PromptEmbedder
from monitor.goldens import DEFAULT_GOLDEN_SET, load_golden_set
from monitor.sidecar import Monitor, MonitorConfig
from monitor.thresholds import FittingConfig
from retrain.jobs import TrainingRunner
from retrain.trigger import Trigger
from rollout.runner import RolloutRunner
from serving.engine import EngineClient
from store import Store
from tunewatch.retraining import (
    quality_signal,
    retention_config,
    retrain_config,
    runner_config,
    trigger_config,
)
from tunewatch.settings import Settings, SettingsError
from tunewatch.stack import identity_adapter_name, prepare

log = logging.getLogger("tunewatch")


def fitting_config(settings: Settings, drift: DriftConfig) -> FittingConfig | None:
    """How thresholds are fitted on each full reference; None when the settings say not to."""
    options = settings.monitor
    if not options.fit_thresholds:
        return None
    fitting = FittingConfig(
        target_false_alarm=options.target_false_alarm,
        runs=options.fitting_runs,
        pinned=frozenset(Column(name) for name in options.drift_thresholds),
    )
    try:
        fitting.check(drift)
    except ValueError as exc:
        raise SettingsError(f"monitor.fitting_runs: {exc}") from None
    return fitting


def drift_config(settings: Settings) -> DriftConfig:
    """Evidently's methods as monitor/drift.py sets them, with any thresholds from calibration."""
    known = {str(column) for column in Column}
    unknown = sorted(set(settings.monitor.drift_thresholds) - known)
    if unknown:
        raise SettingsError(
            f"monitor.drift_thresholds: unknown columns {unknown}; known are {sorted(known)}"
        )
    thresholds = {Column(name): value for name, value in settings.monitor.drift_thresholds.items()}
    return DriftConfig(threads=settings.monitor.embedding_threads).with_thresholds(thresholds)


async def monitor(settings: Settings, engine_url: str) -> None:
    """The monitor sidecar: checks and the controller's jobs on one scheduler, figures on its
    own /metrics."""
    model_dir, identity_dir = await asyncio.to_thread(prepare, settings)
    options = settings.monitor
    golden_set = options.golden_set or DEFAULT_GOLDEN_SET
    drift = drift_config(settings)
    config = MonitorConfig(
        window_size=options.window_size,
        quality_interval_s=options.quality_interval_s,
        golden_interval_s=options.golden_interval_s,
        golden_set=golden_set if options.golden_enabled else None,
        correct_rouge_l=options.correct_rouge_l,
        drift_interval_s=options.drift_interval_s,
        reference_size=options.reference_size,
        drift=drift,
        fitting=fitting_config(settings, drift),
    )
    if config.golden_set is not None:
        load_golden_set(config.golden_set)  # a broken file is refused at start, not at 3 a.m.
    store = Store(settings.store_url)
    engine = EngineClient(engine_url, request_timeout_s=settings.engine.request_timeout_s)
    embedder = PromptEmbedder(threads=options.embedding_threads)
    sidecar = Monitor(
        store, config, engine, identity_adapter_name(identity_dir), embed=embedder.embed_exchanges
    )
    jobs = [
        PeriodicJob(name, body, interval) for name, (body, interval) in sidecar.checks().items()
    ]
    runner: TrainingRunner | None = None
    if settings.retrain.enabled:
        trigger = Trigger(store, trigger_config(settings), quality_signal(settings))
        runner = TrainingRunner(store, retrain_config(settings, model_dir))
        jobs += [
            PeriodicJob(
                "trigger",
                lambda: asyncio.to_thread(trigger.evaluate),
                settings.retrain.trigger_interval_s,
            ),
            PeriodicJob("training", runner.tick, settings.retrain.training_interval_s),
        ]
    if settings.rollout.enabled:
        rollouts = RolloutRunner(
            store,
            engine,
            runner_config(settings),
            golden=sidecar.run_goldens if config.golden_set is not None else None,
        )
        jobs.append(PeriodicJob("rollout", rollouts.tick, settings.rollout.interval_s))
    retention = retention_config(settings, identity_adapter_name(identity_dir))
    if retention is not None:
        prune = Retention(store, retention).run
        jobs.append(
            PeriodicJob(
                "retention",
                lambda: asyncio.to_thread(prune),
                settings.store.retention_interval_s,
            )
        )
    start_http_server(options.port, addr=options.host)
    log.info("monitor listening", extra={"url": f"http://{options.host}:{options.port}/metrics"})
    try:
        await Scheduler(store, jobs, lease_ttl_s=options.lease_ttl_s).run()
    finally:
        if runner is not None:
            await asyncio.to_thread(runner.close)
