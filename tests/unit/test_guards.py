"""The rollout guards: confidence sequences that stay honest however often they are looked at.

Unless a test says otherwise: alpha 0.05 given to the guard itself, the defaults of
`rollout.guards` otherwise (min 30 samples per side, CS tightest at 200 effective samples),
and seeded generators. The A/A tests look after every one of 20 intervals and count a
sequence as falsely failed if ANY look fails: the rate the rollout's users live with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from rollout.guards.paired import paired_test
from rollout.guards.sequences import (
    boundary,
    error_rate,
    judge,
    latency_ratio,
    quality_noninferiority,
    quality_paired,
)
from rollout.guards.types import Evidence, GuardConfig, GuardResult, Summary

SEQUENCES = 400
LOOKS = 20
ALPHA = 0.05


def slack(alpha: float, n: int = SEQUENCES) -> float:
    """The highest false-fail share that n sequences at a true rate alpha give, at 99.9%."""
    return float(stats.binom.ppf(0.999, n, alpha)) / n


def cumulative(batches: np.ndarray, log: bool = False) -> list[list[Summary]]:
    """Summaries after each look: batches (sequences, looks, per look) -> [look][sequence]."""
    out = []
    running = [Summary(0, log=log) for _ in range(batches.shape[0])]
    for look in range(batches.shape[1]):
        running = [
            s.merge(Summary.of(b, log=log)) for s, b in zip(running, batches[:, look], strict=True)
        ]
        out.append(running)
    return out


def false_fail_share(
    guard: Callable[..., GuardResult], candidate: np.ndarray, primary: np.ndarray, **kwargs: float
) -> float:
    """Share of sequences failed at any look, the guard seeing everything gathered so far."""
    log = guard is latency_ratio
    cands, prims = cumulative(candidate, log), cumulative(primary, log)
    failed = np.zeros(candidate.shape[0], bool)
    for look in range(candidate.shape[1]):
        for s in np.flatnonzero(~failed):
            result = guard(cands[look][s], prims[look][s], alpha=ALPHA, **kwargs)
            failed[s] = result.verdict == "fail"
    return float(failed.mean())


# --- Repeated looks ----------------------------------------------------------------------------


def test_identical_quality_rarely_fails_over_twenty_looks() -> None:
    rng = np.random.default_rng(1)
    candidate = (rng.random((SEQUENCES, LOOKS, 15)) < 0.6).astype(float)
    primary = (rng.random((SEQUENCES, LOOKS, 45)) < 0.6).astype(float)
    assert false_fail_share(quality_noninferiority, candidate, primary) <= slack(ALPHA)


def test_identical_latency_rarely_fails_even_with_no_tolerated_slowdown() -> None:
    rng = np.random.default_rng(2)
    candidate = rng.lognormal(0.0, 0.4, (SEQUENCES, LOOKS, 10))
    primary = rng.lognormal(0.0, 0.4, (SEQUENCES, LOOKS, 10))
    share = false_fail_share(latency_ratio, candidate, primary, max_ratio=1.0)
    assert share <= slack(ALPHA)


def test_identical_error_rates_rarely_fail_even_with_no_margin() -> None:
    rng = np.random.default_rng(3)
    candidate = (rng.random((SEQUENCES, LOOKS, 20)) < 0.05).astype(float)
    primary = (rng.random((SEQUENCES, LOOKS, 20)) < 0.05).astype(float)
    assert false_fail_share(error_rate, candidate, primary, margin=0.0) <= slack(ALPHA)


def test_identical_paired_quality_rarely_fails_over_twenty_looks() -> None:
    rng = np.random.default_rng(4)
    shared = rng.random((SEQUENCES, LOOKS * 10))  # the prompt's difficulty, on both sides
    candidate = np.clip(shared + rng.normal(0, 0.2, shared.shape), 0, 1)
    primary = np.clip(shared + rng.normal(0, 0.2, shared.shape), 0, 1)
    failed = 0
    for s in range(SEQUENCES):
        for look in range(1, LOOKS + 1):
            n = look * 10
            if quality_paired(candidate[s, :n], primary[s, :n], alpha=ALPHA).verdict == "fail":
                failed += 1
                break
    assert failed / SEQUENCES <= slack(ALPHA)


def test_a_whole_rollout_of_identical_candidates_is_rolled_back_at_most_alpha() -> None:
    # 5% -> 25% -> 50% -> 100% of 200 requests an interval, 5 intervals each, all three guards.
    rng = np.random.default_rng(5)
    weights = np.repeat([0.05, 0.25, 0.5, 1.0], 5)
    running = {side: [Summary(0), Summary(0, log=True), Summary(0)] for side in ("c", "p")}
    sums = {key: [list(value) for _ in range(SEQUENCES)] for key, value in running.items()}
    rolled_back = np.zeros(SEQUENCES, bool)
    for weight in weights:
        for side, n in (("c", round(200 * weight)), ("p", 200 - round(200 * weight))):
            if n == 0:
                continue
            exact = (rng.random((SEQUENCES, n)) < 0.6).astype(float)
            latency = rng.lognormal(0.0, 0.4, (SEQUENCES, n))
            errors = (rng.random((SEQUENCES, n)) < 0.01).astype(float)
            for s in range(SEQUENCES):
                q, lat, err = sums[side][s]
                sums[side][s] = [
                    q.merge(Summary.of(exact[s])),
                    lat.merge(Summary.of(latency[s], log=True)),
                    err.merge(Summary.of(errors[s])),
                ]
        for s in np.flatnonzero(~rolled_back):
            (qc, lc, ec), (qp, lp, ep) = sums["c"][s], sums["p"][s]
            verdict = judge(Evidence(qc, qp, lc, lp, ec, ep)).verdict
            rolled_back[s] = verdict == "fail"
    assert rolled_back.mean() <= slack(GuardConfig().alpha)


def test_the_bound_is_wider_than_a_one_shot_test_at_every_sample_size() -> None:
    one_shot = stats.norm.isf(ALPHA)
    for tau in (1, 10, 30, 100, 200, 1_000, 10_000, 1_000_000):
        assert boundary(tau, ALPHA, 200) > one_shot


def test_the_bound_is_tightest_near_the_planned_sample_size() -> None:
    widths = {tau: boundary(tau, ALPHA, 500) for tau in (50, 500, 5_000)}
    assert widths[500] < widths[50] and widths[500] < widths[5_000]


# --- Verdicts on clear cases -------------------------------------------------------------------


def test_a_clearly_worse_candidate_fails_quality() -> None:
    rng = np.random.default_rng(10)
    result = quality_noninferiority(rng.random(1000) < 0.45, rng.random(3000) < 0.6)
    assert result.verdict == "fail"
    assert result.upper is not None and result.upper < 0


def test_a_clearly_better_candidate_passes_noninferiority() -> None:
    rng = np.random.default_rng(11)
    result = quality_noninferiority(rng.random(2000) < 0.66, rng.random(2000) < 0.6, margin=0.02)
    assert result.verdict == "pass"
    assert result.lower is not None and result.lower > -0.02


def test_a_candidate_neither_credibly_worse_nor_within_the_margin_is_inconclusive() -> None:
    rng = np.random.default_rng(12)
    result = quality_noninferiority(rng.random(60) < 0.6, rng.random(60) < 0.6)
    assert result.verdict == "inconclusive"
    assert result.lower is not None and result.upper is not None
    assert result.lower < -0.02 and result.upper > 0


def test_a_clearly_worse_candidate_fails_the_paired_guard() -> None:
    rng = np.random.default_rng(13)
    primary = (rng.random(400) < 0.6).astype(float)
    candidate = np.where(rng.random(400) < 0.2, 0.0, primary)  # loses a fifth of its answers
    assert quality_paired(candidate, primary).verdict == "fail"


def test_a_candidate_one_and_a_half_times_slower_fails_latency() -> None:
    rng = np.random.default_rng(14)
    result = latency_ratio(rng.lognormal(math.log(1.5), 0.4, 100), rng.lognormal(0, 0.4, 400))
    assert result.verdict == "fail"
    assert result.lower is not None and result.lower > 1.2


def test_a_candidate_as_fast_as_the_primary_passes_latency() -> None:
    rng = np.random.default_rng(15)
    result = latency_ratio(rng.lognormal(0, 0.4, 300), rng.lognormal(0, 0.4, 300))
    assert result.verdict == "pass"


def test_a_candidate_slower_but_within_the_tolerated_ratio_does_not_fail() -> None:
    rng = np.random.default_rng(16)
    result = latency_ratio(rng.lognormal(math.log(1.1), 0.4, 5000), rng.lognormal(0, 0.4, 5000))
    assert result.verdict != "fail"


def test_a_candidate_with_many_more_errors_fails() -> None:
    rng = np.random.default_rng(17)
    result = error_rate(rng.random(1000) < 0.08, rng.random(1000) < 0.01)
    assert result.verdict == "fail"


def test_a_run_without_errors_is_not_proof_of_few_errors() -> None:
    result = error_rate(np.zeros(40), np.zeros(400))
    assert result.verdict == "inconclusive"


def test_a_run_of_tied_pairs_is_not_proof_of_equal_quality() -> None:
    same = np.ones(40)
    assert quality_paired(same, same).verdict == "inconclusive"


# --- No evidence, no verdict -------------------------------------------------------------------


def test_no_data_is_inconclusive() -> None:
    result = quality_noninferiority([], [])
    assert result.verdict == "inconclusive"
    assert "no candidate samples" in result.reason
    assert (result.lower, result.upper) == (None, None)


def test_too_few_samples_are_inconclusive_even_when_they_look_clear() -> None:
    result = quality_noninferiority(np.ones(12), np.zeros(200))
    assert result.verdict == "inconclusive"
    assert "12 candidate samples < 30 needed" in result.reason


def test_too_few_pairs_are_inconclusive() -> None:
    result = quality_paired(np.zeros(20), np.ones(20), min_samples=50)
    assert result.verdict == "inconclusive"
    assert "20 pairs < 50 needed" in result.reason


def test_a_nan_score_makes_the_guard_inconclusive() -> None:
    candidate = np.r_[np.ones(100), np.nan]
    result = quality_noninferiority(candidate, np.zeros(100))
    assert result.verdict == "inconclusive"
    assert "1 non-finite values among the candidate samples" in result.reason


def test_an_infinite_or_zero_latency_makes_the_guard_inconclusive() -> None:
    fast = np.full(100, 0.5)
    assert latency_ratio(np.r_[fast, np.inf], fast).verdict == "inconclusive"
    assert latency_ratio(fast, np.r_[fast, 0.0]).verdict == "inconclusive"


def test_judge_never_passes_on_no_evidence() -> None:
    judgement = judge(Evidence())
    assert judgement.verdict == "inconclusive"
    assert all(r.verdict == "inconclusive" for r in judgement.results)


# --- Arguments that cannot be right ------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_an_alpha_outside_zero_one_is_refused(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must lie in"):
        quality_noninferiority(np.ones(50), np.ones(50), alpha=alpha)
    with pytest.raises(ValueError, match="alpha must lie in"):
        GuardConfig(alpha=alpha)


def test_a_negative_margin_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"margin must not be negative, got -0\.01"):
        quality_noninferiority(np.ones(50), np.ones(50), margin=-0.01)
    with pytest.raises(ValueError, match="error_margin"):
        GuardConfig(error_margin=-0.01)


def test_a_tolerated_latency_ratio_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_ratio must be at least 1, got 0.9"):
        latency_ratio(np.ones(50), np.ones(50), max_ratio=0.9)


def test_scores_outside_zero_one_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\], got 57.0"):
        quality_noninferiority(np.r_[np.ones(50), 57.0], np.ones(50))  # chrF not divided by 100


def test_unaligned_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="one primary per candidate"):
        quality_paired(np.ones(40), np.ones(39))


# --- Reasons name the figures ------------------------------------------------------------------


def test_the_quality_reason_names_the_means_the_difference_and_the_cs() -> None:
    rng = np.random.default_rng(20)
    result = quality_noninferiority(
        rng.random(1000) < 0.45, rng.random(3000) < 0.6, metric="exact match"
    )
    assert result.lower is not None and result.upper is not None and result.estimate is not None
    assert f"exact match candidate {result.figures['candidate_mean']:.3g}" in result.reason
    assert f"vs primary {result.figures['primary_mean']:.3g}" in result.reason
    assert f"difference {result.estimate:+.3f}" in result.reason
    assert f"CS [{result.lower:+.3f}, {result.upper:+.3f}]" in result.reason
    assert result.reason.endswith("-> fail")


def test_the_latency_reason_names_the_ratio_and_reports_the_p95_ratio() -> None:
    rng = np.random.default_rng(21)
    candidate, primary = rng.lognormal(0.4, 0.4, 200), rng.lognormal(0, 0.4, 200)
    result = latency_ratio(candidate, primary)
    p95 = np.percentile(candidate, 95) / np.percentile(primary, 95)
    assert result.figures["p95_ratio"] == pytest.approx(p95)
    assert f"ratio {p95:.2f} (a figure, not judged)" in result.reason
    assert f"ratio {result.estimate:.3f}" in result.reason


def test_judge_splits_alpha_over_the_guards_and_says_so() -> None:
    judgement = judge(Evidence(), GuardConfig(alpha=0.06))
    assert judgement.alpha_per_guard == pytest.approx(0.02)
    assert all(r.alpha == pytest.approx(0.02) for r in judgement.results)
    assert "alpha 0.06 over the rollout, 0.02 per guard" in judgement.reason


def test_alpha_is_split_only_over_the_guards_configured() -> None:
    assert GuardConfig(alpha=0.05, guards=("quality", "latency")).alpha_per_guard == 0.025
    judgement = judge(Evidence(), GuardConfig(guards=("latency",)))
    assert [r.guard for r in judgement.results] == ["latency"]


def test_a_config_naming_a_guard_twice_or_an_unknown_one_is_refused() -> None:
    with pytest.raises(ValueError, match="each guard once"):
        GuardConfig(guards=("latency", "latency"))
    with pytest.raises(ValueError, match="unknown guards"):
        GuardConfig(guards=("throughput",))  # type: ignore[arg-type]


def test_judge_fails_when_one_guard_fails_and_names_it() -> None:
    rng = np.random.default_rng(22)
    ok = (rng.random(500) < 0.6).astype(float), (rng.random(500) < 0.6).astype(float)
    evidence = Evidence(
        *ok,
        latency_candidate=rng.lognormal(math.log(2), 0.4, 500),
        latency_primary=rng.lognormal(0, 0.4, 500),
        errors_candidate=np.zeros(500),
        errors_primary=np.zeros(500),
    )
    judgement = judge(evidence)
    assert judgement.verdict == "fail"
    assert judgement.result("latency").verdict == "fail"
    assert judgement.reason.startswith("latency failed -> roll back")


def test_judge_passes_only_when_every_guard_passes() -> None:
    rng = np.random.default_rng(23)
    n = 4000
    evidence = Evidence(
        quality_candidate=rng.random(n) < 0.65,
        quality_primary=rng.random(n) < 0.6,
        latency_candidate=rng.lognormal(0, 0.4, n),
        latency_primary=rng.lognormal(0, 0.4, n),
        errors_candidate=rng.random(n) < 0.01,
        errors_primary=rng.random(n) < 0.01,
    )
    assert judge(evidence).verdict == "pass"
    without_errors = Evidence(
        evidence.quality_candidate,
        evidence.quality_primary,
        evidence.latency_candidate,
        evidence.latency_primary,
    )
    assert judge(without_errors).verdict == "inconclusive"


def test_judge_uses_the_paired_guard_in_shadow() -> None:
    rng = np.random.default_rng(24)
    primary = (rng.random(300) < 0.6).astype(float)
    judgement = judge(Evidence(primary, primary, paired_quality=True))
    assert judgement.results[0].guard == "quality (exact match, paired)"


# --- Summaries ---------------------------------------------------------------------------------


def test_a_merged_summary_equals_the_summary_of_everything() -> None:
    rng = np.random.default_rng(30)
    a, b = rng.random(37), rng.random(81)
    merged, whole = Summary.of(a).merge(Summary.of(b)), Summary.of(np.r_[a, b])
    assert merged.n == whole.n
    assert merged.mean == pytest.approx(whole.mean)
    assert merged.m2 == pytest.approx(whole.m2)
    assert (merged.low, merged.high) == (whole.low, whole.high)


def test_a_guard_gives_the_same_result_on_summaries_as_on_raw_values() -> None:
    rng = np.random.default_rng(31)
    c, p = rng.random(300), rng.random(900)
    raw, summarised = quality_noninferiority(c, p), quality_noninferiority(Summary.of(c), p)
    assert (raw.verdict, raw.lower, raw.upper) == pytest.approx(
        (summarised.verdict, summarised.lower, summarised.upper)
    )


def test_latency_summaries_must_be_of_log_seconds() -> None:
    with pytest.raises(ValueError, match="Summary of log values"):
        latency_ratio(Summary.of(np.ones(50)), np.ones(50))


# --- One-shot paired tests for the shadow report ----------------------------------------------


def test_the_mcnemar_p_value_is_scipys_binomial_test_on_discordant_pairs() -> None:
    rng = np.random.default_rng(40)
    primary = (rng.random(200) < 0.6).astype(float)
    candidate = np.where(rng.random(200) < 0.3, 1 - primary, primary)
    only_candidate = int(((candidate == 1) & (primary == 0)).sum())
    discordant = int((candidate != primary).sum())
    result = paired_test(candidate, primary)
    assert result.test.startswith("exact McNemar")
    assert result.n_informative == discordant
    assert result.p_value == pytest.approx(stats.binomtest(only_candidate, discordant).pvalue)


def test_the_wilcoxon_p_value_is_scipys() -> None:
    rng = np.random.default_rng(41)
    primary = rng.random(80)
    candidate = np.clip(primary + rng.normal(0.03, 0.1, 80), 0, 1)
    result = paired_test(candidate, primary)
    assert result.test == "Wilcoxon signed-rank"
    diff = candidate - primary
    assert result.p_value == pytest.approx(stats.wilcoxon(diff[diff != 0]).pvalue)


def test_a_paired_test_on_identical_answers_is_not_run() -> None:
    result = paired_test(np.ones(50), np.ones(50))
    assert result.p_value is None
    assert "no pair of the 50 differs" in result.reason


def test_a_paired_test_says_it_holds_at_one_planned_look_only() -> None:
    result = paired_test(np.r_[np.ones(30), np.zeros(10)], np.r_[np.zeros(20), np.ones(20)])
    assert "valid at one planned look only" in result.reason


def test_guard_results_are_frozen() -> None:
    result = quality_noninferiority([], [])
    assert isinstance(result, GuardResult)
    with pytest.raises(AttributeError):
        result.verdict = "pass"  # type: ignore[misc]
