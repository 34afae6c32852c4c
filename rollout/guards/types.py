"""What the rollout's guards take and give: evidence, configuration, results, verdicts.

Plain values and numpy only (no scipy): the rollout's state machine, its control and the
admin API (mounted on the gateway) need these types, never the statistics behind them.
The guards themselves are in rollout/guards/sequences.py, the one-shot paired tests in
rollout/guards/paired.py.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from monitor.window import AnswerMetric

Verdict = Literal["pass", "fail", "inconclusive"]


class Guard(StrEnum):
    """A guard's identity: metrics label it, recorded looks key their verdicts by it."""

    QUALITY = "quality"
    LATENCY = "latency"
    ERRORS = "errors"


ALPHA = 0.05
QUALITY_MARGIN = 0.02  # non-inferiority: the candidate may be at most 2 points worse
LATENCY_MAX_RATIO = 1.2  # geometric-mean latency at most 1.2x the primary's
ERROR_MARGIN = 0.01  # error rate at most 1 point above the primary's
MIN_SAMPLES = 30  # per side (pairs in shadow) before any verdict
PLANNED_SAMPLES = 200  # effective samples where the CS is tightest (~ a 10-minute CPU rollout)


@dataclass(frozen=True)
class Summary:
    """Sufficient statistics of one side's outcomes: what a guard needs, O(1) to keep.

    The rollout can keep one per side and metric and `merge` each interval's into it, rather
    than re-read every exchange. `log` marks a summary of log values (latencies: the guard
    judges log seconds). `invalid` counts the values left out as non-finite (or <= 0 for a
    log): any of them makes a guard inconclusive, since a NaN is a bug upstream, not a score.
    """

    n: int
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    low: float = math.inf  # smallest value seen
    high: float = -math.inf  # largest value seen
    invalid: int = 0
    log: bool = False

    def __post_init__(self) -> None:
        if self.n < 0 or self.invalid < 0:
            raise ValueError(f"counts must not be negative, got n={self.n}, invalid={self.invalid}")

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray, *, log: bool = False) -> Summary:
        """Summarise raw values (of their logarithms with `log`, e.g. latency in seconds)."""
        x = np.asarray(values, dtype=float).ravel()
        ok = np.isfinite(x)
        if log:
            ok &= x > 0
        x = x[ok]
        invalid = int(ok.size - x.size)
        if log:
            x = np.log(x)
        if x.size == 0:
            return cls(0, invalid=invalid, log=log)
        mean = float(x.mean())
        return cls(
            n=int(x.size),
            mean=mean,
            m2=float(((x - mean) ** 2).sum()),
            low=float(x.min()),
            high=float(x.max()),
            invalid=invalid,
            log=log,
        )

    def merge(self, other: Summary) -> Summary:
        """The summary of both samples together (Chan et al.'s parallel update)."""
        if self.log != other.log:
            raise ValueError("cannot merge a summary of log values with one of plain values")
        n = self.n + other.n
        if n == 0:
            return Summary(0, invalid=self.invalid + other.invalid, log=self.log)
        delta = other.mean - self.mean
        return Summary(
            n=n,
            mean=self.mean + delta * other.n / n,
            m2=self.m2 + other.m2 + delta * delta * self.n * other.n / n,
            low=min(self.low, other.low),
            high=max(self.high, other.high),
            invalid=self.invalid + other.invalid,
            log=self.log,
        )

    @property
    def variance(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else math.nan


Values = Sequence[float] | np.ndarray | Summary


@dataclass(frozen=True)
class GuardResult:
    """One guard at one look: the verdict, the figures behind it, and why, for people.

    `estimate`, `lower` and `upper` are the difference candidate - primary and its confidence
    sequence at this look (for latency: the ratio of geometric means and its CS); None when
    the guard could not compute them. Each bound is one-sided at `alpha`. For the paired
    guard `n_candidate` and `n_primary` are both the number of pairs.
    """

    name: Guard
    guard: str  # its label for people: "quality (chrf, paired)"
    verdict: Verdict
    estimate: float | None
    lower: float | None
    upper: float | None
    n_candidate: int
    n_primary: int
    alpha: float
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)  # JSON-ready, for the event


@dataclass(frozen=True)
class PairedTest:
    """A one-shot paired test from scipy, for the shadow report: a figure, not a verdict.

    Its p-value holds at one look planned in advance; looked at again and again it is not
    valid (use `quality_paired`'s CS for verdicts). None when there is nothing to test.
    """

    test: str
    statistic: float | None
    p_value: float | None
    n_pairs: int
    n_informative: int  # pairs that differ (the ones these tests use)
    reason: str


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, numbers.Real) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def check_parameters(alpha: float, min_samples: int, planned_samples: float) -> None:
    check_alpha(alpha)
    if min_samples < 2:
        raise ValueError(f"min_samples must be at least 2, got {min_samples!r}")
    if not planned_samples >= 1:
        raise ValueError(f"planned_samples must be at least 1, got {planned_samples!r}")


@dataclass(frozen=True)
class GuardConfig:
    """The guards' thresholds and their error budget for one rollout.

    The defaults fit a small CPU box (about 1 request/s: a 10-minute rollout gathers ~150
    effective samples). A bigger engine should raise `planned_samples` to the effective
    samples its rollout gathers (bench/rollout.py prints them and what the targets need).
    """

    alpha: float = ALPHA  # false-rollback rate of the whole rollout, all guards and looks
    quality_margin: float = QUALITY_MARGIN  # passes when not worse by more than this
    latency_max_ratio: float = LATENCY_MAX_RATIO  # fails when credibly slower than this
    error_margin: float = ERROR_MARGIN  # fails when credibly more errors than primary + this
    min_samples: int = MIN_SAMPLES  # per side (pairs in shadow) before any verdict
    planned_samples: float = PLANNED_SAMPLES  # effective samples where the CS is tightest
    guards: tuple[Guard, ...] = tuple(Guard)  # the ones alpha is split on

    def __post_init__(self) -> None:
        check_parameters(self.alpha, self.min_samples, self.planned_samples)
        if not self.quality_margin >= 0:
            raise ValueError(f"quality_margin must not be negative, got {self.quality_margin!r}")
        if not self.error_margin >= 0:
            raise ValueError(f"error_margin must not be negative, got {self.error_margin!r}")
        if not self.latency_max_ratio >= 1:
            raise ValueError(
                f"latency_max_ratio must be at least 1, got {self.latency_max_ratio!r}"
            )
        if not self.guards or len(set(self.guards)) != len(self.guards):
            raise ValueError(f"guards must name each guard once, got {self.guards!r}")
        unknown = set(self.guards) - set(Guard)
        if unknown:
            raise ValueError(f"unknown guards {sorted(unknown)}")

    @property
    def alpha_per_guard(self) -> float:
        """Bonferroni: each guard that can fail gets an equal share of the rollout's alpha."""
        return self.alpha / len(self.guards)


@dataclass(frozen=True)
class Evidence:
    """Everything gathered so far in the rollout, per request, for each side.

    Raw values or `Summary`s (latency: of log seconds). With `paired_quality` (shadow), the
    quality scores are aligned pairs on the same prompts, raw values only.
    """

    quality_candidate: Values = ()  # scores in [0, 1]
    quality_primary: Values = ()
    latency_candidate: Values = ()  # seconds
    latency_primary: Values = ()
    errors_candidate: Values = ()  # 1: the request failed, 0: it did not
    errors_primary: Values = ()
    paired_quality: bool = False
    quality_metric: AnswerMetric = "exact_match"  # what the quality scores are


@dataclass(frozen=True)
class Judgement:
    """All guards at one look: fail if any fails, pass if all pass, else inconclusive."""

    verdict: Verdict
    results: tuple[GuardResult, ...]
    alpha: float
    alpha_per_guard: float
    reason: str

    def result(self, guard: Guard) -> GuardResult:
        """The result of one guard, by its name."""
        for r in self.results:
            if r.name == guard:
                return r
        raise KeyError(guard)
