"""The monitor sidecar: reads the recorded traffic on a schedule and exports what it finds.

It runs in its own process (`tunewatch monitor`, started by `tunewatch up`), so a crash or
a slow drift check never touches serving. The daemon's scheduler (controller/scheduler.py)
runs each check on a worker thread, one instance at a time; a check that fails is logged
and counted, its figures go stale (`tunewatch_monitor_check_ok` = 0), and the next run
tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from monitor import exporter
from monitor.calibration import calibration
from monitor.drift import Column, DriftConfig, DriftDetector, DriftResult, EmbedFn
from monitor.goldens import load_golden_set, run_golden_set
from monitor.quality import Quality, quality
from monitor.signals import signals
from monitor.thresholds import FittingConfig, fit_thresholds, judging_config
from monitor.traffic import adapter_labels, baseline_window, read_window, with_goldens
from monitor.window import Window
from serving.engine import EngineClient
from store import Store
from store.adapters import RoutingTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorConfig:
    window_size: int = 200
    quality_interval_s: float = 30.0
    golden_interval_s: float = 600.0
    golden_set: Path | None = None  # None: no golden runs
    golden_max_tokens: int = 32
    correct_rouge_l: float = 0.5  # ROUGE-L F at or above which an answer counts as correct
    calibration_bins: int = 10
    drift_interval_s: float = 60.0
    reference_size: int = 1000  # an adapter's first exchanges: its drift reference
    drift: DriftConfig = field(default_factory=DriftConfig)
    fitting: FittingConfig | None = None  # fit thresholds on each full reference; None: don't


class Monitor:
    """The checks, each one pass over every adapter; `run` schedules them."""

    def __init__(
        self,
        store: Store,
        config: MonitorConfig,
        engine: EngineClient,
        base_adapter: str,
        embed: EmbedFn,
    ) -> None:
        self.store, self.config, self.engine = store, config, engine
        self.base_adapter = base_adapter  # the identity adapter's engine name
        self.embed = embed
        self._detectors: dict[str, DriftDetector] = {}
        self._verdicts: dict[str, bool | None] = {}
        self._baselines: dict[str, Quality] = {}

    def adapters(self) -> list[str]:
        """Adapter labels to judge: the base model and every registered adapter (a bounded set)."""
        return adapter_labels(self.store, self.base_adapter)

    def check_quality(self) -> None:
        """Label-free signals, quality and calibration of each adapter's current window."""
        for adapter in self.adapters():
            live = read_window(self.store, adapter, self.config.window_size)
            exporter.publish_signals(adapter, signals(live))
            self._publish_labelled(adapter, live)

    def _publish_labelled(self, adapter: str, live: Window) -> None:
        labelled = with_goldens(self.store, live, self.config.window_size)
        scores = quality(labelled)
        exporter.publish_quality(adapter, scores)
        exporter.publish_baseline(adapter, self._baseline(adapter))
        exporter.publish_calibration(
            adapter,
            calibration(
                labelled,
                threshold=self.config.correct_rouge_l,
                bins=self.config.calibration_bins,
                pairs=scores.pairs,
            ),
        )

    def _baseline(self, adapter: str) -> Quality:
        """The quality of the adapter's first labelled window, scored again only while it fills."""
        size = self.config.window_size
        known = self._baselines.get(adapter)
        if known is None or known.n < size:
            known = quality(baseline_window(self.store, adapter, size))
            self._baselines[adapter] = known
        return known

    def check_drift(self) -> None:
        """Each adapter's current window against its reference; a changed verdict is an event."""
        for adapter in self.adapters():
            result = self._detector(adapter).check(
                read_window(self.store, adapter, self.config.window_size)
            )
            exporter.publish_drift(adapter, result)
            self._record_verdict(adapter, result)

    def _detector(self, adapter: str) -> DriftDetector:
        """The adapter's detector, made again only while its reference window is still filling;
        once it is full, judged at thresholds fitted on it (when configured)."""
        detector = self._detectors.get(adapter)
        if detector is None or len(detector.reference) < self.config.reference_size:
            reference = read_window(self.store, adapter, self.config.reference_size, newest=False)
            if detector is None or len(reference) != len(detector.reference):
                detector = DriftDetector(reference, self.embed, self._judging(reference))
                self._detectors[adapter] = detector
        return detector

    def _judging(self, reference: Window) -> DriftConfig:
        """The configured thresholds, or those fitted on a full reference (fitted once per
        reference: the fit is kept in the store, so a restart does not fit again)."""
        fitting = self.config.fitting
        if fitting is None or len(reference) < self.config.reference_size:
            return self.config.drift
        key = f"drift.thresholds.{reference.adapter}"
        fitted_on = {
            "first": reference.exchanges[0].id,
            "last": reference.exchanges[-1].id,
            "window": self.config.window_size,
            "target": fitting.target_false_alarm,
            "runs": fitting.runs,
            "pinned": sorted(map(str, fitting.pinned)),
        }
        kept = self.store.load_state(key)
        if kept is not None and kept.get("fitted_on") == fitted_on:
            fitted = {Column(c): t for c, t in (kept.get("thresholds") or {}).items()}
            return self.config.drift.with_thresholds(fitted)
        try:
            calibration = fit_thresholds(
                reference, self.embed, self.config.drift, fitting, self.config.window_size
            )
        except ValueError as exc:
            self.store.save_state(key, {"fitted_on": fitted_on, "thresholds": {}})
            self.store.record_event(
                "drift.thresholds", f"not fitted, configured ones kept: {exc}", reference.adapter
            )
            return self.config.drift
        judging = judging_config(self.config.drift, calibration, fitting.pinned)
        thresholds = {
            str(c.column): c.proposed_threshold
            for c in calibration.columns
            if c.column not in fitting.pinned
        }
        self.store.save_state(key, {"fitted_on": fitted_on, "thresholds": thresholds})
        self.store.record_event(
            "drift.thresholds",
            f"fitted on {calibration.runs} A/A splits of the reference "
            f"({calibration.reference_size} exchanges, windows of {calibration.current_size}): "
            f"dataset false alarms {calibration.dataset_false_alarm_rate:.1%} at the configured "
            f"thresholds, {calibration.proposed_dataset_false_alarm_rate:.1%} at the fitted "
            f"ones (target {fitting.target_false_alarm:.1%})",
            reference.adapter,
            thresholds=thresholds,
            pinned=fitted_on["pinned"],
            false_alarms={
                str(c.column): {"configured": c.false_alarm_rate, "runs": c.runs}
                for c in calibration.columns
            },
            dataset_false_alarms=calibration.dataset_false_alarm_rate,
            dataset_false_alarms_fitted=calibration.proposed_dataset_false_alarm_rate,
        )
        log.info("drift thresholds fitted", extra={"adapter": reference.adapter, **thresholds})
        return judging

    def _record_verdict(self, adapter: str, result: DriftResult) -> None:
        """Every check goes to the store (the retrain trigger judges them one by one); a
        change of verdict is also an event."""
        if result.drifted is None:
            reason = f"not judged: {result.reason}"
        else:
            drifted = ", ".join(result.drifted_columns) or "no column"
            reason = (
                f"{'drift' if result.drifted else 'no drift'}: {drifted} drifted "
                f"(share {result.drift_share:.2f}; reference {result.reference_size}, "
                f"current {result.current_size})"
            )
        columns = {str(c.column): c.score for c in result.columns}
        self.store.record_drift_check(adapter, result.drift_share, result.drifted, reason, columns)
        if adapter in self._verdicts and self._verdicts[adapter] == result.drifted:
            return
        self._verdicts[adapter] = result.drifted
        self.store.record_event(
            "drift.verdict",
            reason,
            adapter,
            drifted=result.drifted,
            share=result.drift_share,
            columns=columns,
        )

    async def _check_drift_async(self) -> None:
        await asyncio.to_thread(self.check_drift)

    async def _check_quality_async(self) -> None:
        await asyncio.to_thread(self.check_quality)

    async def run_goldens(self) -> None:
        if self.config.golden_set is None:
            return
        examples = load_golden_set(self.config.golden_set)
        table = self.store.routing_table() or RoutingTable()
        targets = {table.primary: table.primary or self.base_adapter}
        targets.update({a: a for a in (table.canary, table.shadow) if a is not None})
        await run_golden_set(
            self.engine, self.store, examples, targets, max_tokens=self.config.golden_max_tokens
        )

    def checks(self) -> dict[str, tuple[Callable[[], Awaitable[None]], float]]:
        """Each check as a coroutine to schedule, timed and failure-proof, and its interval
        (published: staleness is judged against it)."""
        checks = {
            "quality": (
                _timed("quality", self._check_quality_async),
                self.config.quality_interval_s,
            ),
            "golden": (_timed("golden", self.run_goldens), self.config.golden_interval_s),
            "drift": (_timed("drift", self._check_drift_async), self.config.drift_interval_s),
        }
        for check, (_, interval_s) in checks.items():
            exporter.CHECK_INTERVAL.labels(check).set(interval_s)
        return checks


def _timed(check: str, job: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """Run a check, time it, and keep the sidecar alive whatever it raises."""

    async def wrapper() -> None:
        started = time.perf_counter()
        try:
            await job()
        except Exception:
            log.exception("monitor check failed", extra={"check": check})
            exporter.record_run(check, time.perf_counter() - started, time.time(), ok=False)
            return
        exporter.record_run(check, time.perf_counter() - started, time.time(), ok=True)

    return wrapper
