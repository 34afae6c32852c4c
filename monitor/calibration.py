"""Calibration of a window: does the model's confidence match how often it is right?

Confidence comes from the response's token logprobs, correctness from the reference
(exact match, or ROUGE-L F >= a threshold). Expected calibration error (ECE) over fixed
equal-width bins, the Brier score, and the reliability table behind the ECE, so a
dashboard can show where the model is over- or under-confident and not just by how much.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor.quality import PairScore, score_pairs
from monitor.window import Window


@dataclass(frozen=True)
class ReliabilityBin:
    """Confidences in [lower, upper) (the last bin includes 1.0) and how often they were right."""

    lower: float
    upper: float
    count: int
    mean_confidence: float | None  # None: empty bin
    accuracy: float | None


@dataclass(frozen=True)
class Calibration:
    """ECE, Brier score and reliability table. n == 0: nothing to judge (None values)."""

    n: int
    ece: float | None
    brier: float | None
    bins: tuple[ReliabilityBin, ...]
    skipped_no_logprob: int = 0  # labelled exchanges without a mean token logprob
    skipped_unscorable: int = 0  # references ROUGE cannot tokenize: correctness unknown


def confidence(mean_logprob: float) -> float:
    """The geometric mean of the response's token probabilities: exp(mean token logprob).

    The product of token probabilities (the sequence probability) shrinks with every token,
    so long answers would look unsure however right; the geometric mean is that product
    normalised by length, a probability in (0, 1] comparable across answers of any length.
    It needs only the mean logprob the gateway records, not every token's.
    """
    return math.exp(mean_logprob)


def calibrate(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> Calibration:
    """ECE (bins weighted by their count), Brier score and reliability table."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    conf_sums = np.bincount(index, weights=conf, minlength=bins)
    hit_sums = np.bincount(index, weights=hit, minlength=bins)
    table = tuple(
        ReliabilityBin(
            lower=float(edges[b]),
            upper=float(edges[b + 1]),
            count=int(counts[b]),
            mean_confidence=float(conf_sums[b] / counts[b]) if counts[b] else None,
            accuracy=float(hit_sums[b] / counts[b]) if counts[b] else None,
        )
        for b in range(bins)
    )
    if not len(conf):
        return Calibration(0, None, None, table)
    ece = float(np.abs(conf_sums - hit_sums).sum() / len(conf))  # sum_b n_b/N |conf_b - acc_b|
    brier = float(np.mean((conf - hit) ** 2))
    return Calibration(len(conf), ece, brier, table)


def calibration(
    window: Window,
    *,
    threshold: float = 0.5,
    bins: int = 10,
    pairs: Sequence[PairScore] | None = None,
) -> Calibration:
    """Calibration over the window's labelled exchanges that carry a mean token logprob.

    Correct: exact match, or ROUGE-L F >= threshold. Pass `pairs` from `Quality.pairs` of
    the same window to reuse its ROUGE scores. An exchange whose reference ROUGE cannot
    tokenize is left out whether it matched or not: keeping only its exact matches would
    make the model look more accurate than it is.
    """
    labelled = window.labelled()
    by_id = {p.exchange_id: p for p in (score_pairs(labelled) if pairs is None else pairs)}
    confidences, correct = [], []
    no_logprob = unscorable = 0
    for e in labelled:
        pair = by_id[e.id]
        if e.mean_logprob is None:
            no_logprob += 1
        elif pair.rouge is None:
            unscorable += 1
        else:
            confidences.append(confidence(e.mean_logprob))
            correct.append(pair.exact_match or pair.rouge["rougeL"] >= threshold)
    return dataclasses.replace(
        calibrate(confidences, correct, bins),
        skipped_no_logprob=no_logprob,
        skipped_unscorable=unscorable,
    )
