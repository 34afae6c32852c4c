"""Drift thresholds fitted on an adapter's own reference, for the deployment's window sizes.

The shipped thresholds were calibrated for a reference of 1,200 and windows of 200 on the
benchmark's corpus; at other sizes, or on other prompts, they alarm more or less often than
they say. So once an adapter's reference window is full, the monitor splits it many times
into a pretend reference and a pretend current window (A/A: no drift exists, every alarm is
false) and fits each column's threshold to a stated false-alarm rate, as `tunewatch drift
calibrate` proposes them (monitor.drift.calibrate, the same code). The dataset verdict
alarms when any column does, so each column gets the target divided by the number of
columns (a union bound): the verdict's rate is at most the target. Columns the settings pin
keep their threshold.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

from monitor.drift import Calibration, Column, DriftConfig, EmbedFn, calibrate
from monitor.window import Window


@dataclass(frozen=True)
class FittingConfig:
    """How thresholds are fitted: the dataset verdict's false-alarm rate per check, the
    number of A/A splits (at least columns/target - 1: 799 for 8 columns at 1%), and the
    columns whose thresholds the settings pin."""

    target_false_alarm: float = 0.01
    runs: int = 799
    pinned: frozenset[Column] = frozenset()
    seed: int = 0

    def column_target(self, config: DriftConfig) -> float:
        return self.target_false_alarm / len(config.tests)

    def check(self, config: DriftConfig) -> None:
        """Raise ValueError, naming the fix, when the runs cannot state the target."""
        if not 0 < self.target_false_alarm < 1:
            raise ValueError(f"target_false_alarm must be in (0, 1), got {self.target_false_alarm}")
        needed = math.ceil(len(config.tests) / self.target_false_alarm) - 1
        if self.runs < needed:
            raise ValueError(
                f"{self.runs} A/A runs cannot state a {self.target_false_alarm:g} false-alarm "
                f"rate over {len(config.tests)} columns; at least {needed} are needed"
            )


def splits_config(config: DriftConfig, reference_size: int, current_size: int) -> DriftConfig:
    """The configuration the A/A splits are judged under.

    A split's reference is the real one less a current window, so a column is judged there
    with as few reference rows as the split has (at most the configured minimum): the
    thresholds it fits hold for the smaller reference, and so conservatively for the full
    one the monitor judges against.
    """
    split_reference = reference_size - current_size
    return replace(config, min_reference=max(1, min(config.min_reference, split_reference)))


def fit_thresholds(
    reference: Window,
    embed: EmbedFn,
    config: DriftConfig,
    fitting: FittingConfig,
    current_size: int,
) -> Calibration:
    """A/A splits of `reference` with windows of `current_size`; ValueError, saying why, when
    the reference is too small to split (it must exceed the window)."""
    if len(reference) <= current_size:
        raise ValueError(
            f"a reference of {len(reference)} exchanges cannot be split into windows of "
            f"{current_size}: make monitor.reference_size larger than monitor.window_size"
        )
    return calibrate(
        reference,
        embed,
        splits_config(config, len(reference), current_size),
        current_size=current_size,
        target_false_alarm=fitting.column_target(config),
        runs=fitting.runs,
        seed=fitting.seed,
    )


def judging_config(
    config: DriftConfig, calibration: Calibration, pinned: Collection[Column] = ()
) -> DriftConfig:
    """`config` with the fitted thresholds, except on the pinned columns."""
    fitted = {c.column: c.proposed_threshold for c in calibration.columns if c.column not in pinned}
    return config.with_thresholds(fitted)
