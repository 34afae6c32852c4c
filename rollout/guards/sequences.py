"""The statistical guards of a rollout: is the candidate adapter credibly worse than the primary?

Pure statistics: no store, no clock, no I/O. The rollout calls `judge(evidence, config)` at
every scheduler interval with ALL the evidence gathered so far (per-request quality scores,
latencies and errors of the candidate and of the primary) and acts on the verdict: "fail"
rolls the candidate back at once, "pass" lets it be promoted, "inconclusive" keeps it where
it is. Each guard is also a function of its own (`quality_noninferiority`, `quality_paired`,
`latency_ratio`, `error_rate`) returning a `GuardResult` with its figures and a reason.

Why not a test per interval. Flagger and Argo compare an interval's metric with a fixed
threshold, Kayenta runs a Mann-Whitney test per interval: every look is a fresh chance of a
false alarm, so over a rollout of 20 looks the false-rollback rate is several times the
nominal alpha (bench/rollout.py measures it). tunewatch's guards control the error over the
WHOLE rollout instead, however many looks the rollout takes, at whatever moments: each guard
is a confidence sequence (CS), a sequence of intervals that covers the true difference at
every look simultaneously with probability >= 1 - alpha. A guard fails only when its CS
excludes "no harm", so P(a guard ever fails a candidate that is in truth not worse) <= alpha,
even if the rollout looks after every single request. No number of looks is planned, and no
alpha is spent per look: the price is a wider interval than a one-shot test's (about 1.5x
the width at the planned sample size, see below), paid once.

The method: asymptotic confidence sequences (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas,
"Time-uniform central limit theory and asymptotic confidence sequences", arXiv:2103.06476,
2021; Annals of Statistics, 2024), with Robbins' normal-mixture boundary (H. Robbins,
"Statistical methods related to the law of the iterated logarithm", Ann. Math. Statist. 41,
1970) in its one-sided form (Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49, 2021). If S(t) is a
standard Brownian motion, mixing exp(l S - l^2 t / 2) over l >= 0 with a half-normal weight
of variance r gives the nonnegative martingale 2 Phi(S sqrt(r / (t r + 1))) exp(r S^2 /
(2 (t r + 1))) / sqrt(t r + 1); Ville's inequality bounds the chance that it ever reaches
1 / alpha, and with 1 - Phi(z) <= exp(-z^2 / 2) / 2 the crossing is conservatively at

    P(exists t: S(t) >= sqrt(2 (t + 1/r) log(1 + sqrt(t r + 1) / (2 alpha)))) <= alpha.

For a difference of means the process is S(I) = I (estimate - difference) in information
time I = 1 / Var(estimate): the running difference of two sample means has independent
increments in I whatever the share of requests each side gets, as long as that share is not
chosen from the outcomes (the canonical joint distribution of Jennison & Turnbull, "Group
Sequential Methods with Applications to Clinical Trials", 2000; the same two-sample
normal-mixture test is Optimizely's mSPRT: Johari, Koomen, Pekelis & Walsh, "Always valid
inference: continuous monitoring of A/B tests", Operations Research 70, 2022). So a canary
whose weight goes 5% -> 25% -> 50% -> 100% keeps one valid CS across its steps. Dividing the
boundary by I, each one-sided bound at a look is

    estimate -/+ sqrt(V) * sqrt(2 (1 + 1/x) log(1 + sqrt(1 + x) / (2 alpha))),

V = s_c^2 / n_c + s_p^2 / n_p (plug-in variances), x = r * tau, tau = s_p^2 / V the
effective sample size: information time in units of the primary's variance (a constant once
estimated), i.e. the number of primary requests as informative as the evidence, about n_c
while the canary is small, n / 4 at an even split, n for paired shadow differences. The
asymptotic CS replaces the unknown variances by running estimates: the coverage is that of
the normal limit, reached as the samples grow (the AsympCS theorem). The mixture weight r
is chosen so that the bound is tightest at `planned_samples` (x minimises the boundary
there; numerically, as the paper's closed form does approximately): at the planned size the
half-width is 3.18 standard errors for alpha 0.0167 (a one-shot test: 2.13); ten times
later 3.39, ten times earlier 3.95. The choice moves the width little; it is no commitment
to stop there.

Why this and not an exact CS. Betting CSs for bounded outcomes (Waudby-Smith & Ramdas,
"Estimating means of bounded random variables by betting", JRSS B 86, 2024) are
nonasymptotic and often tighter, but latency is unbounded, and the two-sample comparison
with a changing split would need a betting scheme of its own; one formula serves every
guard here. The cost of asymptotic validity is at small samples, so: no verdict below
`min_samples` per side; for bounded outcomes (scores, errors) the variance is estimated as
if one worst and one best outcome had been seen too (after Agresti & Caffo's "add one
success and one failure", The American Statistician 54, 2000, applied to the variance only:
an error rate of 0 in 40 requests does not pass as certainty; the effect vanishes as n
grows); and the A/A simulations in tests/unit/test_guards.py and bench/rollout.py check the
false-fail rate over whole rollouts at these sizes.

Assumptions, to know when the guarantee holds:
- Requests are independent. Sticky routing sends a user's requests to one side; a few heavy
  users with correlated outcomes make the true variance larger than the per-request estimate
  and the CS too narrow. Where that matters, feed one outcome per user (their mean).
- The traffic does not change over the rollout. The canary's requests come mostly from the
  later steps, the primary's from the earlier: a shift of the traffic mix between them is
  read as a difference of adapters.
- The split is decided by the router, never by the outcomes.
- Validity is asymptotic (see above); the one-sided bounds each hold at level 1 - alpha per
  guard, so [lower, upper] is a (1 - 2 alpha) two-sided CS.
- One guarantee per evidence stream: pass the whole rollout's evidence at each look (steps
  included) to keep the rollout's error <= alpha. A stream restarted per step, or shadow and
  canary judged as two streams, gets alpha each; split `alpha` between them for one budget.

The guards and their verdicts (each guard at alpha / number of guards: Bonferroni, so the
false-rollback rate of the whole rollout, all guards and all looks together, is <= alpha):
- quality, unpaired (canary: different users on each side), per-request scores in [0, 1]
  (exact match 0/1, chrF / 100, ROUGE-L): fail when the CS of candidate - primary lies
  entirely below 0 (credibly worse at all); pass when its lower bound is above -margin
  (credibly not worse by more than the margin: one-sided non-inferiority); else
  inconclusive. Fail is checked first.
- quality, paired (shadow: the candidate answers the primary's prompts): the same on the
  mean per-prompt difference in [-1, 1], tau = the number of pairs. `paired_test` adds the
  one-shot paired tests of scipy (Wilcoxon signed-rank; exact sign test on the discordant
  pairs, i.e. exact McNemar, for pass/fail scores) as REPORTED FIGURES: their p-values hold
  at one look planned in advance (the shadow report at its planned number of pairs), not at
  repeated looks, so no verdict comes from them.
- latency, on log seconds: the CS of the difference of mean log latency is the CS of the
  ratio of geometric means. Fail when its lower bound is above log(max_ratio) (credibly
  slower than max_ratio times the primary); pass when its upper bound is below it. A
  tolerance above 1 (default 1.2) because an adapter may cost a little latency and a large
  rollout would otherwise roll back a 3% slower candidate; 1.5x slower is still caught
  within ~80 effective samples at the log-sd of 0.4 of LLM latencies. Why not the p95
  ratio the issue names: a sequential test on a quantile needs a CS for a quantile
  (Howard & Ramdas, "Sequential estimation of quantiles with applications to A/B-testing
  and best-arm identification", Bernoulli 2022) and, for a ratio of two p95s, needs far
  more samples, the tail being 5% of them. When latencies come whole (not as a
  `Summary`), the empirical p95 ratio is reported as a figure, never judged.
- errors, 0/1 per request: fail when the CS of candidate - primary error rate lies above
  `margin` (credibly more errors than the primary plus the margin); pass when its upper
  bound is below it.
No data, too little (below min_samples), or non-finite values: inconclusive, with the
reason; never pass. Arguments that cannot be right (alpha outside (0, 1), a negative margin,
scores outside their range) raise ValueError naming the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import optimize

from rollout.guards.types import (
    ALPHA,
    ERROR_MARGIN,
    LATENCY_MAX_RATIO,
    MIN_SAMPLES,
    PLANNED_SAMPLES,
    QUALITY_MARGIN,
    Evidence,
    Guard,
    GuardConfig,
    GuardResult,
    Judgement,
    Summary,
    Values,
    Verdict,
    check_parameters,
)


def _bounded_variance(s: Summary, low: float, high: float) -> float:
    """The variance as if one worst and one best outcome had been seen besides the sample.

    Asymptotically the sample variance; at small n it keeps a run of identical outcomes (no
    error in 40 requests, every pair tied) from passing for certainty.
    """
    mean2, m2_2 = (low + high) / 2, (high - low) ** 2 / 2
    n = s.n + 2
    delta = mean2 - s.mean
    m2 = s.m2 + m2_2 + delta * delta * s.n * 2 / n
    return m2 / (n - 1)


# --- The confidence sequence ----------------------------------------------------------------


@lru_cache(maxsize=64)
def _tightest(alpha: float) -> float:
    """x = r * tau at which the one-sided boundary, in standard errors, is smallest."""

    def width(log_x: float) -> float:
        x = math.exp(log_x)
        return (1 + 1 / x) * math.log1p(math.sqrt(1 + x) / (2 * alpha))

    found = optimize.minimize_scalar(width, bounds=(-5.0, 12.0), method="bounded")
    return math.exp(found.x)


def boundary(tau: float, alpha: float, planned_samples: float) -> float:
    """Half-width of a one-sided bound, in standard errors, at effective sample size `tau`.

    Robbins' one-sided normal mixture, tuned to be tightest at `planned_samples`; valid at
    every tau at once (see the module docstring).
    """
    x = tau * _tightest(alpha) / planned_samples
    return math.sqrt(2 * (1 + 1 / x) * math.log1p(math.sqrt(1 + x) / (2 * alpha)))


@dataclass(frozen=True)
class _Interval:
    estimate: float
    lower: float
    upper: float
    stderr: float
    tau: float


def _two_sample(
    cand: Summary,
    prim: Summary,
    variance: tuple[float, float],
    alpha: float,
    planned: float,
) -> _Interval | None:
    var_c, var_p = variance
    v = var_c / cand.n + var_p / prim.n
    if not v > 0:
        return None
    reference = var_p if var_p > 0 else var_c
    tau = reference / v
    radius = math.sqrt(v) * boundary(tau, alpha, planned)
    estimate = cand.mean - prim.mean
    return _Interval(estimate, estimate - radius, estimate + radius, math.sqrt(v), tau)


# --- Input checks shared by the guards ------------------------------------------------------


def _summary(values: Values, *, log: bool = False, what: str) -> Summary:
    if isinstance(values, Summary):
        if values.log != log:
            kind = "log values" if log else "plain values"
            raise ValueError(f"{what}: expected a Summary of {kind}")
        return values
    return Summary.of(values, log=log)


def _check_range(s: Summary, low: float, high: float, what: str) -> None:
    if s.n and (s.low < low or s.high > high):
        bad = s.low if s.low < low else s.high
        raise ValueError(f"{what} must lie in [{low:g}, {high:g}], got {bad!r}")


def _refusal(cand: Summary, prim: Summary, min_samples: int, paired: bool = False) -> str | None:
    """Why no verdict can be given on these samples, or None."""
    sides = (
        (("pairs", cand),) if paired else (("candidate samples", cand), ("primary samples", prim))
    )
    for side, s in sides:
        if s.invalid:
            kinds = "NaN, inf or <= 0" if s.log else "NaN or inf"
            return f"{s.invalid} non-finite values among the {side} ({kinds})"
    for side, s in sides:
        if s.n == 0:
            return f"no {side}"
    for side, s in sides:
        if s.n < min_samples:
            return f"{s.n} {side} < {min_samples} needed"
    return None


def _inconclusive(
    name: Guard,
    label: str,
    why: str,
    cand: Summary,
    prim: Summary,
    alpha: float,
    estimate: float | None = None,
    figures: dict[str, Any] | None = None,
) -> GuardResult:
    return GuardResult(
        name,
        label,
        "inconclusive",
        estimate,
        None,
        None,
        cand.n,
        prim.n,
        alpha,
        f"{label}: {why} -> inconclusive",
        {**(figures or {}), "refusal": why},
    )


def _pct(alpha: float) -> str:
    return f"{100 * (1 - alpha):.4g}%"


def _f(x: float) -> str:
    return f"{x:.3g}"


def _d(x: float) -> str:
    return f"{x:+.3f}"


def _bounded_comparison(
    name: Guard,
    label: str,
    candidate: Values,
    primary: Values,
    what: str,
    alpha: float,
    min_samples: int,
    planned_samples: float,
    figures: dict[str, Any],
) -> tuple[Summary, Summary, _Interval] | GuardResult:
    """What the unpaired guards on outcomes in [0, 1] share: the checked summaries and the CS of
    candidate - primary, or the inconclusive result when there is too little to judge."""
    cand = _summary(candidate, what=f"candidate {what}")
    prim = _summary(primary, what=f"primary {what}")
    _check_range(cand, 0.0, 1.0, f"candidate {what}")
    _check_range(prim, 0.0, 1.0, f"primary {what}")
    why = _refusal(cand, prim, min_samples)
    if why is not None:
        estimate = cand.mean - prim.mean if cand.n and prim.n else None
        return _inconclusive(name, label, why, cand, prim, alpha, estimate, figures)
    variances = (_bounded_variance(cand, 0, 1), _bounded_variance(prim, 0, 1))
    iv = _two_sample(cand, prim, variances, alpha, planned_samples)
    assert iv is not None  # bounded variances are > 0
    return cand, prim, iv


def _judged(
    name: Guard,
    label: str,
    verdict: Verdict,
    iv: _Interval,
    n_candidate: int,
    n_primary: int,
    alpha: float,
    reason: str,
    figures: dict[str, Any],
) -> GuardResult:
    """The result of a guard judged on a difference's CS."""
    return GuardResult(
        name,
        label,
        verdict,
        iv.estimate,
        iv.lower,
        iv.upper,
        n_candidate,
        n_primary,
        alpha,
        reason,
        figures,
    )


def _noninferiority_verdict(iv: _Interval, margin: float) -> tuple[Verdict, str]:
    lo, hi = _d(iv.lower), _d(iv.upper)
    if iv.upper < 0:
        return "fail", f"upper bound {hi} < 0: credibly worse -> fail"
    if iv.lower > -margin:
        return (
            "pass",
            f"lower bound {lo} > -{_f(margin)}: not worse by more than the margin -> pass",
        )
    return (
        "inconclusive",
        f"CS reaches above 0 and below -{_f(margin)} (the margin) -> inconclusive",
    )


def _above_verdict(lower: float, upper: float, limit: str, value: float) -> tuple[Verdict, str]:
    """Verdict for a guard that fails when the quantity is credibly above `value`."""
    if lower > value:
        return "fail", f"lower bound above {limit}: credibly over it -> fail"
    if upper < value:
        return "pass", f"upper bound below {limit}: credibly under it -> pass"
    return "inconclusive", f"CS contains {limit} -> inconclusive"


# --- The guards -----------------------------------------------------------------------------


def quality_noninferiority(
    candidate: Values,
    primary: Values,
    *,
    margin: float = QUALITY_MARGIN,
    alpha: float = ALPHA,
    min_samples: int = MIN_SAMPLES,
    planned_samples: float = PLANNED_SAMPLES,
    metric: str = "quality",
) -> GuardResult:
    """Unpaired non-inferiority on per-request scores in [0, 1] (canary: other users each side).

    Fails when the CS of mean(candidate) - mean(primary) lies below 0; passes when its lower
    bound is above -margin; else inconclusive.
    """
    check_parameters(alpha, min_samples, planned_samples)
    if not margin >= 0:
        raise ValueError(f"margin must not be negative, got {margin!r}")
    label = "quality" if metric == "quality" else f"quality ({metric})"
    figures: dict[str, Any] = {"metric": metric, "margin": margin, "paired": False}
    compared = _bounded_comparison(
        Guard.QUALITY,
        label,
        candidate,
        primary,
        f"{metric} scores",
        alpha,
        min_samples,
        planned_samples,
        figures,
    )
    if isinstance(compared, GuardResult):
        return compared
    cand, prim, iv = compared
    verdict, rule = _noninferiority_verdict(iv, margin)
    reason = (
        f"{metric} candidate {_f(cand.mean)} vs primary {_f(prim.mean)} "
        f"(n {cand.n} vs {prim.n}): difference {_d(iv.estimate)}, "
        f"CS [{_d(iv.lower)}, {_d(iv.upper)}] (each bound {_pct(alpha)}, all looks); {rule}"
    )
    figures |= {
        "candidate_mean": cand.mean,
        "primary_mean": prim.mean,
        "stderr": iv.stderr,
        "effective_samples": iv.tau,
    }
    return _judged(Guard.QUALITY, label, verdict, iv, cand.n, prim.n, alpha, reason, figures)


def quality_paired(
    candidate: Sequence[float] | np.ndarray,
    primary: Sequence[float] | np.ndarray,
    *,
    margin: float = QUALITY_MARGIN,
    alpha: float = ALPHA,
    min_samples: int = MIN_SAMPLES,
    planned_samples: float = PLANNED_SAMPLES,
    metric: str = "quality",
) -> GuardResult:
    """Paired non-inferiority (shadow): candidate[i] and primary[i] score the same prompt.

    The same verdicts as `quality_noninferiority`, on the mean per-prompt difference; the
    CS is one-sample, in [-1, 1]. `min_samples` counts pairs. The one-shot scipy tests for
    the report are in `paired_test`.
    """
    check_parameters(alpha, min_samples, planned_samples)
    if not margin >= 0:
        raise ValueError(f"margin must not be negative, got {margin!r}")
    c = np.asarray(candidate, dtype=float).ravel()
    p = np.asarray(primary, dtype=float).ravel()
    if c.shape != p.shape:
        raise ValueError(f"paired scores need one primary per candidate, got {c.size} vs {p.size}")
    diff = _summary(c - p, what=f"paired {metric} differences")
    _check_range(Summary.of(c), 0.0, 1.0, f"candidate {metric} scores")
    _check_range(Summary.of(p), 0.0, 1.0, f"primary {metric} scores")
    label = "quality (paired)" if metric == "quality" else f"quality ({metric}, paired)"
    figures: dict[str, Any] = {
        "metric": metric,
        "margin": margin,
        "paired": True,
        "n_pairs": c.size,
    }
    why = _refusal(diff, diff, min_samples, paired=True)
    if why is not None:
        estimate = diff.mean if diff.n else None
        return _inconclusive(Guard.QUALITY, label, why, diff, diff, alpha, estimate, figures)
    var = _bounded_variance(diff, -1.0, 1.0)
    stderr = math.sqrt(var / diff.n)
    radius = stderr * boundary(diff.n, alpha, planned_samples)
    iv = _Interval(diff.mean, diff.mean - radius, diff.mean + radius, stderr, diff.n)
    verdict, rule = _noninferiority_verdict(iv, margin)
    finite = np.isfinite(c) & np.isfinite(p)
    cm, pm = float(c[finite].mean()), float(p[finite].mean())
    reason = (
        f"{metric} candidate {_f(cm)} vs primary {_f(pm)} on the same {diff.n} prompts: "
        f"mean difference {_d(iv.estimate)}, CS [{_d(iv.lower)}, {_d(iv.upper)}] "
        f"(each bound {_pct(alpha)}, all looks); {rule}"
    )
    figures |= {"candidate_mean": cm, "primary_mean": pm, "stderr": stderr}
    return _judged(Guard.QUALITY, label, verdict, iv, diff.n, diff.n, alpha, reason, figures)


def latency_ratio(
    candidate: Values,
    primary: Values,
    *,
    max_ratio: float = LATENCY_MAX_RATIO,
    alpha: float = ALPHA,
    min_samples: int = MIN_SAMPLES,
    planned_samples: float = PLANNED_SAMPLES,
) -> GuardResult:
    """Latency: the ratio of geometric-mean latencies, candidate over primary.

    Raw latencies in seconds, or a `Summary.of(seconds, log=True)`. Fails when the CS of the
    ratio lies above `max_ratio`; passes when it lies below; else inconclusive. With raw
    latencies the empirical p95 ratio is reported as a figure (not judged: see the module
    docstring).
    """
    check_parameters(alpha, min_samples, planned_samples)
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be at least 1, got {max_ratio!r}")
    cand = _summary(candidate, log=True, what="candidate latency")
    prim = _summary(primary, log=True, what="primary latency")
    label = "latency"
    figures: dict[str, Any] = {"max_ratio": max_ratio}
    p95 = ""
    if not isinstance(candidate, Summary) and not isinstance(primary, Summary):
        c, p = np.asarray(candidate, dtype=float), np.asarray(primary, dtype=float)
        c, p = c[np.isfinite(c) & (c > 0)], p[np.isfinite(p) & (p > 0)]
        if c.size and p.size:
            c95, p95_ = float(np.percentile(c, 95)), float(np.percentile(p, 95))
            figures |= {"candidate_p95_s": c95, "primary_p95_s": p95_, "p95_ratio": c95 / p95_}
            p95 = (
                f"; p95 {_f(c95)} s vs {_f(p95_)} s: ratio {c95 / p95_:.2f} (a figure, not judged)"
            )
    why = _refusal(cand, prim, min_samples)
    if why is not None:
        estimate = math.exp(cand.mean - prim.mean) if cand.n and prim.n else None
        return _inconclusive(Guard.LATENCY, label, why, cand, prim, alpha, estimate, figures)
    iv = _two_sample(cand, prim, (cand.variance, prim.variance), alpha, planned_samples)
    if iv is None:
        return _inconclusive(
            Guard.LATENCY, label, "every latency identical: no spread", cand, prim, alpha
        )
    ratio, lower, upper = math.exp(iv.estimate), math.exp(iv.lower), math.exp(iv.upper)
    verdict, rule = _above_verdict(iv.lower, iv.upper, f"{max_ratio:g}x", math.log(max_ratio))
    reason = (
        f"latency geometric mean candidate {_f(math.exp(cand.mean))} s vs primary "
        f"{_f(math.exp(prim.mean))} s (n {cand.n} vs {prim.n}): ratio {ratio:.3f}, "
        f"CS [{lower:.3f}, {upper:.3f}] (each bound {_pct(alpha)}, all looks){p95}; {rule}"
    )
    figures |= {
        "candidate_geomean_s": math.exp(cand.mean),
        "primary_geomean_s": math.exp(prim.mean),
        "log_ratio": iv.estimate,
        "log_stderr": iv.stderr,
        "effective_samples": iv.tau,
    }
    return GuardResult(
        Guard.LATENCY, label, verdict, ratio, lower, upper, cand.n, prim.n, alpha, reason, figures
    )


def error_rate(
    candidate: Values,
    primary: Values,
    *,
    margin: float = ERROR_MARGIN,
    alpha: float = ALPHA,
    min_samples: int = MIN_SAMPLES,
    planned_samples: float = PLANNED_SAMPLES,
) -> GuardResult:
    """Error rate, 0/1 per request (1: the request failed).

    Fails when the CS of candidate - primary error rate lies above `margin`; passes when it
    lies below; else inconclusive.
    """
    check_parameters(alpha, min_samples, planned_samples)
    if not margin >= 0:
        raise ValueError(f"margin must not be negative, got {margin!r}")
    label = "errors"
    figures: dict[str, Any] = {"margin": margin}
    compared = _bounded_comparison(
        Guard.ERRORS,
        label,
        candidate,
        primary,
        "errors",
        alpha,
        min_samples,
        planned_samples,
        figures,
    )
    if isinstance(compared, GuardResult):
        return compared
    cand, prim, iv = compared
    points = f"{100 * margin:.3g} points"
    verdict, rule = _above_verdict(iv.lower, iv.upper, f"+{points}", margin)
    reason = (
        f"error rate candidate {100 * cand.mean:.2f}% vs primary {100 * prim.mean:.2f}% "
        f"(n {cand.n} vs {prim.n}): difference {100 * iv.estimate:+.2f} points, "
        f"CS [{100 * iv.lower:+.2f}, {100 * iv.upper:+.2f}] points "
        f"(each bound {_pct(alpha)}, all looks); {rule}"
    )
    figures |= {
        "candidate_rate": cand.mean,
        "primary_rate": prim.mean,
        "stderr": iv.stderr,
        "effective_samples": iv.tau,
    }
    return _judged(Guard.ERRORS, label, verdict, iv, cand.n, prim.n, alpha, reason, figures)


# --- All guards together --------------------------------------------------------------------


def judge(evidence: Evidence, config: GuardConfig | None = None) -> Judgement:
    """Judge the rollout's evidence at this look with every configured guard."""
    config = config or GuardConfig()
    a = config.alpha_per_guard
    n_min, planned = config.min_samples, config.planned_samples
    metric = evidence.quality_metric.replace("_", " ")  # the reasons' name: "exact match"
    common = {"alpha": a, "min_samples": n_min, "planned_samples": planned}
    results: list[GuardResult] = []
    for guard in config.guards:
        if guard == Guard.QUALITY:
            candidate, primary = evidence.quality_candidate, evidence.quality_primary
            paired = evidence.paired_quality
            if paired and (isinstance(candidate, Summary) or isinstance(primary, Summary)):
                raise ValueError("paired quality needs the raw pairs, not summaries")
            compare = quality_paired if paired else quality_noninferiority
            result = compare(
                candidate, primary, margin=config.quality_margin, metric=metric, **common
            )
        elif guard == Guard.LATENCY:
            result = latency_ratio(
                evidence.latency_candidate,
                evidence.latency_primary,
                max_ratio=config.latency_max_ratio,
                **common,
            )
        else:
            result = error_rate(
                evidence.errors_candidate,
                evidence.errors_primary,
                margin=config.error_margin,
                **common,
            )
        results.append(result)
    failed = [r for r in results if r.verdict == "fail"]
    waiting = [r for r in results if r.verdict == "inconclusive"]
    budget = f"alpha {config.alpha:g} over the rollout, {a:.3g} per guard"
    if failed:
        verdict: Verdict = "fail"
        summary, behind = f"{', '.join(r.guard for r in failed)} failed -> roll back", failed
    elif waiting:
        verdict = "inconclusive"
        summary = f"{', '.join(r.guard for r in waiting)} inconclusive -> keep gathering"
        behind = waiting
    else:
        verdict, summary, behind = "pass", "every guard passed", results
    reason = f"{summary} ({budget}); " + "; ".join(r.reason for r in behind)
    return Judgement(verdict, tuple(results), config.alpha, a, reason)
