"""What the rollout guards are worth against per-interval checks. Prints figures only.

Simulated rollouts, judged four ways on the same simulated requests (common random numbers):

tunewatch    `rollout.guards.judge` on ALL the evidence of the rollout so far, after every
             interval (confidence sequences; alpha 0.05 over the whole rollout, split over
             the three guards). Rows for the defaults and, on the gpu profile, for a
             configuration scaled to its traffic (`planned_samples`).
fixed        Flagger/Argo style: after every interval, a check fails when that interval's
             canary is worse than its primary by more than a fixed threshold on any of:
             exact match lower by > 0.05, p95 latency ratio > 1.5, error rate higher by
             > 0.02 (what a user writes for "5 points", "1.5x", "2 points"). Rolled back
             at the first failed check (Flagger's `threshold: 1`) or at the fifth (the
             `threshold: 5` of Flagger's tutorials; failed checks count up, never reset).
mann-whitney Kayenta style: after every interval, `scipy.stats.mannwhitneyu` (two-sided)
             of that interval's canary vs primary samples for each metric; roll back when
             one is significantly different at 0.05 in the harmful direction.
An interval without canary samples is skipped by the per-interval judges (no data, no
check). At 100% there is no primary traffic: the per-interval judges compare the canary's
interval with the primary's last interval; tunewatch keeps what it gathered.

The rollout, as tunewatch runs it: canary steps of 5%, 25%, 50%, 100% of a request stream,
each held for a minimum number of intervals (and canary samples), advancing unless a judge
rolls back. After the last step's minimum, tunewatch promotes on "pass", else keeps the
candidate at 100% until a deadline and then promotes it on "no guard failed" (counted as
"promoted at deadline": not proven; the rollout may instead hand it to a person); the
per-interval judges promote at the end of the schedule. Two profiles:
  cpu   a small CPU box: 1 request/s, 60 s intervals; steps of 2, 2, 3, 3 intervals:
        a 10-minute rollout (600 requests), deadline 15 minutes.
  gpu   20 requests/s, 30 s intervals; steps of 4 intervals each (at least 100 canary
        samples): 8 minutes (9,600 requests), deadline 12 minutes.
Per request: primary exact match ~ Bernoulli(0.6), latency ~ lognormal (median 1 s,
sigma 0.4), errors ~ Bernoulli(0.01); the split per interval is exact (weight x requests).
Scenarios: A/A (the candidate is the primary: every rollback is false; target <= 5%);
exact match 5 points lower (target: rolled back >= 95%); 1.5x latency (the same);
exact match 5 points higher (promotion rate). Rates carry Wilson 95% intervals; the
requests to a rollback count every request of the rollout (all) and the canary's.

A last table gives the effective samples (1 / (1/n_candidate + 1/n_primary)) that one look
needs for 95% power on each effect, and the requests and minutes that gather them.

    .venv/bin/python -m bench.rollout [--rollouts 1000] [--seed 0]

About 30 s on one core at the default 1,000 rollouts per scenario.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import stats

from rollout.guards.sequences import boundary, judge
from rollout.guards.types import Evidence, Guard, GuardConfig, Summary

P_EXACT = 0.6
LATENCY_SIGMA = 0.4  # log-sd; median 1 s
P_ERROR = 0.01
FIXED_EXACT_DROP = 0.05
FIXED_P95_RATIO = 1.5
FIXED_ERROR_RISE = 0.02
MW_ALPHA = 0.05
TARGET_FALSE = 0.05
TARGET_POWER = 0.95


@dataclass(frozen=True)
class Profile:
    name: str
    rate: float  # requests per second
    interval_s: float
    steps: tuple[tuple[float, int, int], ...]  # (weight, min intervals, min canary samples)
    deadline: int  # intervals in all, at most

    @property
    def per_interval(self) -> int:
        return round(self.rate * self.interval_s)

    def schedule(self) -> tuple[np.ndarray, int]:
        """Canary requests per interval up to the deadline, and the minimum schedule's length."""
        counts: list[int] = []
        for weight in self.weights():
            counts.append(round(weight * self.per_interval))
        minimum = len(counts)
        counts += [counts[-1]] * (self.deadline - minimum)
        return np.array(counts), minimum

    def weights(self) -> list[float]:
        """The canary weight of each interval of the minimum schedule."""
        out: list[float] = []
        for weight, intervals, min_canary in self.steps:
            per = round(weight * self.per_interval)
            out += [weight] * max(intervals, math.ceil(min_canary / per) if per else intervals)
        return out

    def step_ends(self) -> list[int]:
        """The last interval of each step."""
        w = self.weights()
        return [i for i in range(len(w)) if i == len(w) - 1 or w[i + 1] != w[i]]


CPU = Profile("cpu", 1.0, 60.0, ((0.05, 2, 0), (0.25, 2, 0), (0.5, 3, 0), (1.0, 3, 0)), 15)
GPU = Profile("gpu", 20.0, 30.0, ((0.05, 4, 100), (0.25, 4, 0), (0.5, 4, 0), (1.0, 4, 0)), 24)


@dataclass(frozen=True)
class Scenario:
    name: str
    exact_shift: float = 0.0
    latency_ratio: float = 1.0
    goal: str = "false"  # false: every rollback is false; catch: should roll back; promote


SCENARIOS = (
    Scenario("A/A: candidate identical", goal="false"),
    Scenario("exact match 5 points lower", exact_shift=-0.05, goal="catch"),
    Scenario("latency 1.5x", latency_ratio=1.5, goal="catch"),
    Scenario("exact match 5 points higher", exact_shift=0.05, goal="promote"),
)


@dataclass(frozen=True)
class Interval:
    """One interval's requests in every rollout: (candidate, primary), arrays (rollouts, n)."""

    exact: tuple[np.ndarray, np.ndarray]
    log_latency: tuple[np.ndarray, np.ndarray]
    errors: tuple[np.ndarray, np.ndarray]


def simulate(
    scenario: Scenario, counts: np.ndarray, per_interval: int, rollouts: int, seed: int
) -> list[Interval]:
    rng = np.random.default_rng(seed)
    out = []
    for c in counts:
        shape_c, shape_p = (rollouts, c), (rollouts, per_interval - c)
        out.append(
            Interval(
                exact=(
                    (rng.random(shape_c) < P_EXACT + scenario.exact_shift).astype(float),
                    (rng.random(shape_p) < P_EXACT).astype(float),
                ),
                log_latency=(
                    rng.normal(math.log(scenario.latency_ratio), LATENCY_SIGMA, shape_c),
                    rng.normal(0.0, LATENCY_SIGMA, shape_p),
                ),
                errors=(
                    (rng.random(shape_c) < P_ERROR).astype(float),
                    (rng.random(shape_p) < P_ERROR).astype(float),
                ),
            )
        )
    return out


@dataclass
class Outcome:
    """Per rollout: how it ended, and when (the interval it ended in)."""

    rolled_back: np.ndarray
    proven: np.ndarray  # promoted on "pass" (tunewatch only)
    stop: np.ndarray
    cause: np.ndarray  # the metric whose guard or check failed ("": none)
    undecided: dict[str, int] = field(default_factory=dict)  # guards inconclusive at the deadline


@dataclass
class Running:
    """Running sums of one metric for one side, across rollouts (vectorised Chan updates)."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    low: np.ndarray
    high: np.ndarray
    log: bool = False

    @classmethod
    def empty(cls, rollouts: int, log: bool = False) -> Running:
        z = np.zeros(rollouts)
        return cls(z.copy(), z.copy(), z.copy(), z + np.inf, z - np.inf, log)

    def add(self, x: np.ndarray) -> None:
        k = x.shape[1]
        if k == 0:
            return
        mean_b = x.mean(axis=1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(axis=1)
        n = self.n + k
        delta = mean_b - self.mean
        self.mean = self.mean + delta * k / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * k / n
        self.n = n
        self.low = np.minimum(self.low, x.min(axis=1))
        self.high = np.maximum(self.high, x.max(axis=1))

    def summary(self, r: int) -> Summary:
        return Summary(
            int(self.n[r]),
            float(self.mean[r]),
            float(self.m2[r]),
            float(self.low[r]),
            float(self.high[r]),
            log=self.log,
        )


def run_tunewatch(data: list[Interval], minimum: int, config: GuardConfig) -> Outcome:
    """`judge` on everything gathered so far, after every interval, as the rollout calls it."""
    rollouts = data[0].exact[1].shape[0]
    metrics = {"exact": False, "log_latency": True, "errors": False}
    sums = {
        m: (Running.empty(rollouts, log), Running.empty(rollouts, log))
        for m, log in metrics.items()
    }
    rolled = np.zeros(rollouts, bool)
    proven = np.zeros(rollouts, bool)
    stop = np.full(rollouts, len(data) - 1)
    cause = np.full(rollouts, "", dtype=object)
    undecided: dict[str, int] = {}
    live = np.ones(rollouts, bool)
    for k, interval in enumerate(data):
        for metric in metrics:
            for side in (0, 1):
                sums[metric][side].add(getattr(interval, metric)[side])
        for r in np.flatnonzero(live):
            (qc, qp), (lc, lp), (ec, ep) = (
                (sums[m][0].summary(r), sums[m][1].summary(r)) for m in metrics
            )
            judgement = judge(Evidence(qc, qp, lc, lp, ec, ep), config)
            if judgement.verdict == "fail":
                rolled[r], live[r], stop[r] = True, False, k
                failed = next(g.name for g in judgement.results if g.verdict == "fail")
                cause[r] = "exact match" if failed == Guard.QUALITY else str(failed)
            elif judgement.verdict == "pass" and k >= minimum - 1:
                proven[r], live[r], stop[r] = True, False, k
            elif k == len(data) - 1:
                for g in judgement.results:
                    if g.verdict == "inconclusive":
                        name = g.name
                        undecided[name] = undecided.get(name, 0) + 1
        if not live.any():
            break
    return Outcome(rolled, proven, stop, cause, undecided)


def per_interval(
    data: list[Interval],
    minimum: int,
    check: Callable[[Interval, Interval], dict[str, np.ndarray]],
    threshold: int = 1,
) -> Outcome:
    """A judge that looks at each interval alone (the primary's last interval at 100%).

    An interval with any failing metric is one failed check; the `threshold`-th failed
    check rolls back.
    """
    rollouts = data[0].exact[1].shape[0]
    failures = np.zeros(rollouts, int)
    rolled = np.zeros(rollouts, bool)
    stop = np.full(rollouts, minimum - 1)
    cause = np.full(rollouts, "", dtype=object)
    last_primary: Interval | None = None
    for k, interval in enumerate(data[:minimum]):
        if interval.exact[1].shape[1]:
            last_primary = interval
        if interval.exact[0].shape[1] == 0 or last_primary is None:
            continue
        first = np.full(rollouts, "", dtype=object)
        for name, failed in reversed(check(interval, last_primary).items()):
            first[failed] = name
        failed_now = (first != "") & ~rolled
        failures += failed_now
        back = failed_now & (failures >= threshold)
        rolled |= back
        stop[back] = k
        cause[back] = first[back]
    return Outcome(rolled, np.zeros(rollouts, bool), stop, cause)


def fixed_check(now: Interval, primary: Interval) -> dict[str, np.ndarray]:
    p95_c = np.percentile(np.exp(now.log_latency[0]), 95, axis=1)
    p95_p = np.percentile(np.exp(primary.log_latency[1]), 95, axis=1)
    return {
        "exact match": now.exact[0].mean(axis=1) < primary.exact[1].mean(axis=1) - FIXED_EXACT_DROP,
        "latency": p95_c > FIXED_P95_RATIO * p95_p,
        "errors": now.errors[0].mean(axis=1) > primary.errors[1].mean(axis=1) + FIXED_ERROR_RISE,
    }


def mann_whitney_check(now: Interval, primary: Interval) -> dict[str, np.ndarray]:
    bad = {}
    for name, metric, worse in (
        ("exact match", "exact", -1),
        ("latency", "log_latency", 1),
        ("errors", "errors", 1),
    ):
        c, p = getattr(now, metric)[0], getattr(primary, metric)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # identical samples (no error anywhere): p is NaN
            pvalue = stats.mannwhitneyu(c, p, alternative="two-sided", axis=1).pvalue
        direction = np.sign(c.mean(axis=1) - p.mean(axis=1)) == worse
        bad[name] = (pvalue < MW_ALPHA) & direction
    return bad


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:.1%} [{lo:.1%}, {hi:.1%}]"


@dataclass
class Row:
    judge: str
    outcome: Outcome


def requests_to(outcome: Outcome, counts: np.ndarray, per_interval: int) -> tuple[str, str]:
    """Median and 90th percentile of requests (all; canary) up to each rollback."""
    stops = outcome.stop[outcome.rolled_back]
    if stops.size == 0:
        return "-", "-"
    canary = np.cumsum(counts)[stops]
    total = (stops + 1) * per_interval
    return (
        f"{np.median(total):,.0f} / {np.percentile(total, 90):,.0f}",
        f"{np.median(canary):,.0f} / {np.percentile(canary, 90):,.0f}",
    )


def print_scenario(
    console: Console,
    profile: Profile,
    scenario: Scenario,
    rows: list[Row],
    counts: np.ndarray,
) -> list[tuple[str, float, bool | None]]:
    """Print the scenario's table; return (judge, rollback rate, target met) per row."""
    n = rows[0].outcome.rolled_back.size
    verdicts: list[tuple[str, float, bool | None]] = []
    title = (
        f"{profile.name} profile, {scenario.name}: {n:,} rollouts, {profile.rate:g} req/s, "
        f"{profile.interval_s:g} s intervals"
    )
    table = Table(title=title)
    table.add_column("judge")
    table.add_column("rolled back [Wilson 95%]", justify="right")
    table.add_column("promoted: proven", justify="right")
    table.add_column("promoted: at end / deadline", justify="right")
    table.add_column("requests to rollback\nmedian / p90: all", justify="right")
    table.add_column("... canary", justify="right")
    table.add_column("target", justify="left")
    for row in rows:
        o = row.outcome
        back = int(o.rolled_back.sum())
        proven = int(o.proven.sum())
        other = n - back - proven
        total, canary = requests_to(o, counts, profile.per_interval)
        if scenario.goal == "false":
            met = back / n <= TARGET_FALSE
            target = f"<= {TARGET_FALSE:.0%}: " + ("met" if met else "MISSED")
        elif scenario.goal == "catch":
            met = back / n >= TARGET_POWER
            target = f">= {TARGET_POWER:.0%}: " + ("met" if met else "MISSED")
        else:
            met = None
            target = "(promotion rate)"
        verdicts.append((row.judge, back / n, met))
        table.add_row(
            row.judge,
            rate(back, n),
            rate(proven, n) if row.judge.startswith("tunewatch") else "-",
            rate(other, n),
            total,
            canary,
            target,
        )
    console.print(table)
    causes = []
    for row in rows:
        o = row.outcome
        back = int(o.rolled_back.sum())
        if back:
            names, tally = np.unique(o.cause[o.rolled_back].astype(str), return_counts=True)
            split = ", ".join(
                f"{name} {c / back:.0%}" for name, c in zip(names, tally, strict=True)
            )
            causes.append(f"{row.judge}: {split}")
    if causes:
        console.print("  rollbacks by the metric that failed first: " + "; ".join(causes))
    for row in rows:
        waited = n - int(row.outcome.rolled_back.sum()) - int(row.outcome.proven.sum())
        if row.outcome.undecided and waited:
            split = ", ".join(
                f"{name} {c / waited:.0%}" for name, c in sorted(row.outcome.undecided.items())
            )
            console.print(f"  {row.judge}, guards still inconclusive at the deadline: {split}")
    return verdicts


def effective(counts: np.ndarray, per_interval: int) -> np.ndarray:
    """Effective samples 1 / (1/n_c + 1/n_p) after each interval (equal variances)."""
    nc = np.cumsum(counts).astype(float)
    npri = np.cumsum(per_interval - counts).astype(float)
    with np.errstate(divide="ignore"):
        return np.where((nc > 0) & (npri > 0), 1 / (1 / nc + 1 / npri), 0.0)


def needed(effect: float, sigma: float, alpha: float, planned: float | None) -> float:
    """Effective samples at which one look has 95% power (normal approximation).

    planned None: a one-shot z test at alpha; else the CS bound tuned to `planned`.
    """
    z_power = stats.norm.ppf(TARGET_POWER)

    def short(tau: float) -> float:
        z = stats.norm.isf(alpha) if planned is None else boundary(tau, alpha, planned)
        return (z + z_power) * sigma / math.sqrt(tau) - effect

    lo, hi = 1.0, 1e7
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if short(mid) > 0 else (lo, mid)
    return hi


def print_needs(
    console: Console, configs: dict[str, GuardConfig]
) -> dict[str, tuple[float, float]]:
    """Print what each effect needs; return effect -> (CS effective samples, one-shot's)."""
    base = GuardConfig()
    a = base.alpha_per_guard

    def sigma(shift: float) -> float:
        """The per-request standard deviation, averaged over the two sides' variances."""
        q = P_EXACT + shift
        return math.sqrt((P_EXACT * (1 - P_EXACT) + q * (1 - q)) / 2)

    effects = (
        ("exact match 5 points lower: upper bound < 0", 0.05, sigma(-0.05)),
        (
            f"latency 1.5x: lower bound > log {base.latency_max_ratio:g}",
            math.log(1.5) - math.log(base.latency_max_ratio),
            LATENCY_SIGMA,
        ),
        (
            "exact match 5 points higher: lower bound > -margin",
            0.05 + base.quality_margin,
            sigma(0.05),
        ),
    )
    table = Table(
        title=(
            f"Effective samples one look needs for {TARGET_POWER:.0%} power "
            f"(alpha {a:.3g} per guard), and where the schedules gather them"
        )
    )
    needs: dict[str, tuple[float, float]] = {}
    table.add_column("effect: verdict")
    table.add_column("one-shot z test", justify="right")
    for name in configs:
        table.add_column(f"CS, {name}", justify="right")
    table.add_column("requests at 50/50 (4 x)", justify="right")
    table.add_column("minutes at 1 req/s", justify="right")
    table.add_column("minutes at 20 req/s", justify="right")
    for label, effect, sigma in effects:
        cells = [label, f"{needed(effect, sigma, a, None):,.0f}"]
        taus = [needed(effect, sigma, a, c.planned_samples) for c in configs.values()]
        cells += [f"{t:,.0f}" for t in taus]
        best = min(taus)
        cells += [f"{4 * best:,.0f}", f"{4 * best / 60:,.0f}", f"{4 * best / 20 / 60:,.1f}"]
        table.add_row(*cells)
        needs[label.split(":")[0]] = (best, needed(effect, sigma, a, None))
    console.print(table)
    console.print(
        "The last three columns: the fewest requests (the better CS) an even split needs; "
        "a 5% step gathers about 1 effective sample per 20 requests."
    )
    return needs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=1000, help="rollouts per scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=160)
    started = time.perf_counter()
    default = GuardConfig()
    scaled = GuardConfig(planned_samples=1500)
    configs = {"defaults": default, f"planned_samples {scaled.planned_samples:g}": scaled}
    console.print(
        f"tunewatch defaults: alpha {default.alpha:g} ({default.alpha_per_guard:.3g} per guard), "
        f"quality margin {default.quality_margin:g}, latency max ratio "
        f"{default.latency_max_ratio:g}, error margin {default.error_margin:g}, min samples "
        f"{default.min_samples}, planned samples {default.planned_samples:g}"
    )
    targets: list[tuple[Profile, Scenario, str, float, bool]] = []
    for profile in (CPU, GPU):
        counts, minimum = profile.schedule()
        eff = effective(counts, profile.per_interval)
        console.print(
            f"{profile.name} profile: canary per interval {counts[:minimum].tolist()} then "
            f"{counts[-1]} to the deadline; effective samples at the end of each step: "
            + ", ".join(f"{eff[i]:,.0f}" for i in profile.step_ends())
            + f"; at the deadline {eff[-1]:,.0f}"
        )
        judges = {"tunewatch (defaults)": default}
        if profile is GPU:
            judges[f"tunewatch (planned_samples {scaled.planned_samples:g})"] = scaled
        for s, scenario in enumerate(SCENARIOS):
            data = simulate(scenario, counts, profile.per_interval, args.rollouts, args.seed + s)
            rows = [Row(name, run_tunewatch(data, minimum, c)) for name, c in judges.items()]
            rows.append(Row("fixed threshold", per_interval(data, minimum, fixed_check)))
            rows.append(
                Row("fixed threshold, 5 failed checks", per_interval(data, minimum, fixed_check, 5))
            )
            rows.append(
                Row("per-interval Mann-Whitney", per_interval(data, minimum, mann_whitney_check))
            )
            for judge_name, share, met in print_scenario(console, profile, scenario, rows, counts):
                if judge_name.startswith("tunewatch") and met is not None:
                    targets.append((profile, scenario, judge_name, share, met))
    needs = print_needs(console, configs)
    console.print("Targets, tunewatch:")
    for profile, scenario, judge_name, share, met in targets:
        line = f"  {profile.name} profile, {scenario.name}, {judge_name}: {share:.1%} rolled back"
        if met:
            console.print(f"{line}: met")
            continue
        tau, one_shot = needs.get(scenario.name, (math.nan, math.nan))
        eff = effective(*profile.schedule()[:1], profile.per_interval)[-1]
        console.print(
            f"{line}: MISSED. 95% power needs ~{tau:,.0f} effective samples at best "
            f"(~{4 * tau:,.0f} requests at an even split; a one-shot z test, valid at one "
            f"look only, {one_shot:,.0f}); this rollout gathers {eff:,.0f} by its deadline. "
            "No default makes up for missing samples: lengthen the rollout or raise its traffic."
        )
    console.print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
