"""Calibration: confidence from logprobs, correctness from references, ECE, Brier, reliability."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from monitor.calibration import calibrate, calibration, confidence
from monitor.quality import quality
from monitor.window import ExchangeView, Window
from tests.unit.views import exchange_view


def exchange(
    response: str | None,
    reference: str | None,
    conf: float | None,
    *,
    status: str = "ok",
) -> ExchangeView:
    mean_logprob = None if conf is None else math.log(conf)
    return exchange_view(
        response=response, reference=reference, mean_logprob=mean_logprob, status=status
    )


def window(*exchanges: ExchangeView) -> Window:
    """A window of these exchanges, each with its own id."""
    return Window("a", tuple(replace(e, id=f"x{i}") for i, e in enumerate(exchanges)))


def test_confidence_is_the_geometric_mean_token_probability():
    token_probs = [0.5, 0.125]  # geometric mean 0.25
    mean_logprob = sum(math.log(p) for p in token_probs) / len(token_probs)
    assert confidence(mean_logprob) == pytest.approx(0.25)


def test_a_perfectly_calibrated_set_has_zero_ece():
    conf = [0.25] * 4 + [0.75] * 4
    correct = [True, False, False, False] + [True, True, True, False]
    assert calibrate(conf, correct).ece == pytest.approx(0.0)


def test_an_overconfident_set_has_ece_equal_to_the_gap():
    conf = [0.9] * 10
    correct = [True] * 6 + [False] * 4
    assert calibrate(conf, correct).ece == pytest.approx(0.9 - 0.6)


def test_two_bin_ece_and_brier_computed_by_hand():
    # Bin [0, .5): conf .2, .4 -> mean .3, accuracy .5, gap .2, weight 1/2.
    # Bin [.5, 1]: conf .6, .9 -> mean .75, accuracy 1, gap .25, weight 1/2.
    c = calibrate([0.2, 0.4, 0.6, 0.9], [False, True, True, True], bins=2)
    assert c.ece == pytest.approx(0.5 * 0.2 + 0.5 * 0.25)
    assert c.brier == pytest.approx((0.2**2 + 0.6**2 + 0.4**2 + 0.1**2) / 4)


def test_brier_matches_scikit_learn():
    rng = np.random.default_rng(3)
    conf = rng.uniform(size=500)
    correct = rng.uniform(size=500) < conf**2
    assert calibrate(conf, correct).brier == pytest.approx(brier_score_loss(correct, conf))


def test_reliability_table_has_fixed_equal_width_bins():
    c = calibrate([0.05, 0.15, 0.17, 1.0], [False, True, False, True], bins=10)
    assert [(b.lower, b.upper) for b in c.bins][:2] == [(0.0, 0.1), (0.1, 0.2)]
    assert [b.count for b in c.bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]  # 1.0 is in the last bin
    assert c.bins[1].mean_confidence == pytest.approx(0.16) and c.bins[1].accuracy == 0.5
    assert c.bins[2].mean_confidence is None and c.bins[2].accuracy is None


def test_nothing_to_judge_gives_none_not_zero():
    c = calibration(Window("a", ()))
    assert (c.n, c.ece, c.brier) == (0, None, None)
    assert len(c.bins) == 10 and all(b.count == 0 for b in c.bins)


def test_correct_means_exact_match_or_rouge_l_at_the_threshold():
    w = window(
        exchange("  PARIS ", "paris", 0.9),  # exact match after normalisation
        exchange("a b c x", "a b c d", 0.9),  # ROUGE-L F = 0.75
        exchange("a x y z", "a b c d", 0.9),  # ROUGE-L F = 0.25
    )
    assert calibration(w).bins[-1].accuracy == pytest.approx(2 / 3)
    assert calibration(w, threshold=0.8).bins[-1].accuracy == pytest.approx(1 / 3)
    assert calibration(w, threshold=0.25).bins[-1].accuracy == pytest.approx(1.0)


def test_exchanges_without_logprobs_are_skipped_and_counted():
    c = calibration(window(exchange("Paris", "Paris", 0.8), exchange("Paris", "Paris", None)))
    assert c.n == 1 and c.skipped_no_logprob == 1
    assert c.ece == pytest.approx(0.2)


def test_references_rouge_cannot_tokenize_are_skipped_even_when_matched():
    c = calibration(window(exchange("巴黎", "巴黎", 0.9), exchange("Lyon", "Paris", 0.9)))
    assert c.n == 1 and c.skipped_unscorable == 1
    assert c.bins[-1].accuracy == 0.0


def test_error_and_unlabelled_exchanges_are_not_judged():
    c = calibration(
        window(
            exchange("Paris", "Paris", 0.7),
            exchange(None, "Paris", 0.7, status="error"),
            exchange("Paris", None, 0.7),
        )
    )
    assert c.n == 1 and c.skipped_no_logprob == 0


def test_pairs_from_quality_give_the_same_calibration():
    w = window(
        exchange("a b c x", "a b c d", 0.9),
        exchange("a x y z", "a b c d", 0.3),
        exchange("Paris", "Paris", None),
        exchange("巴黎", "巴黎", 0.9),
    )
    assert calibration(w, pairs=quality(w).pairs) == calibration(w)
