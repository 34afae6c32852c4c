"""The one-shot paired tests of scipy on the shadow pairs: reported figures, never verdicts.

Wilcoxon signed-rank for continuous scores, the exact sign test on the discordant pairs
(exact McNemar) for pass/fail ones. Their p-values hold at one look planned in advance,
not at the rollout's repeated looks (rollout/guards/sequences.py judges those).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from rollout.guards.types import PairedTest


def paired_test(
    candidate: Sequence[float] | np.ndarray,
    primary: Sequence[float] | np.ndarray,
    *,
    binary: bool | None = None,
) -> PairedTest:
    """One-shot two-sided paired test of candidate vs primary on the same prompts (scipy).

    Pass/fail scores (`binary`, or every score 0 or 1 when None): the exact sign test on the
    discordant pairs, i.e. exact McNemar (`scipy.stats.binomtest(k, n, 0.5)`, k the pairs
    only the candidate got right, n all discordant pairs). Continuous scores: the Wilcoxon
    signed-rank test (`scipy.stats.wilcoxon` on the differences, zero differences dropped).
    Valid at one look planned in advance; a figure for the shadow report, never a verdict.
    """
    c = np.asarray(candidate, dtype=float).ravel()
    p = np.asarray(primary, dtype=float).ravel()
    if c.shape != p.shape:
        raise ValueError(f"paired scores need one primary per candidate, got {c.size} vs {p.size}")
    if binary is None:
        binary = bool(np.isin(c, (0.0, 1.0)).all() and np.isin(p, (0.0, 1.0)).all())
    test = "exact McNemar (sign test on discordant pairs)" if binary else "Wilcoxon signed-rank"
    bad = int((~(np.isfinite(c) & np.isfinite(p))).sum())
    if bad:
        return PairedTest(test, None, None, c.size, 0, f"{test}: {bad} non-finite pairs -> not run")
    diff = c - p
    informative = int(np.count_nonzero(diff))
    if informative == 0:
        why = f"{test}: no pair of the {c.size} differs -> not run"
        return PairedTest(test, None, None, c.size, 0, why)
    if binary:
        if not (np.isin(c, (0.0, 1.0)).all() and np.isin(p, (0.0, 1.0)).all()):
            raise ValueError("binary paired scores must be 0 or 1")
        wins = int((diff > 0).sum())
        result = stats.binomtest(wins, informative, 0.5)
        statistic, p_value = float(wins), float(result.pvalue)
        detail = f"candidate alone right on {wins} of {informative} discordant pairs"
    else:
        result = stats.wilcoxon(diff[diff != 0])
        statistic, p_value = float(result.statistic), float(result.pvalue)
        detail = f"{informative} nonzero differences, W = {statistic:g}"
    reason = (
        f"{test} on {c.size} pairs: {detail}, p = {p_value:.3g} "
        "(one-shot: valid at one planned look only)"
    )
    return PairedTest(test, statistic, p_value, c.size, informative, reason)
