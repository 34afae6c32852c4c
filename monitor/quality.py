"""Quality of a window: how close the answers come to their references.

Corpus BLEU and chrF from sacrebleu, ROUGE-1/2/L F-measure from rouge-score (mean over
exchanges), and an exact-match ratio, over the window's labelled exchanges. The metrics
are the libraries' own, never re-implemented, so the numbers match what users get from
those libraries by hand; their scales too (BLEU and chrF 0-100, ROUGE and exact match 0-1).

rouge-score's tokenizer keeps only [a-z0-9], so a reference in Chinese, Russian, Arabic...
tokenizes to nothing and would score 0 whatever the answer. Such references are detected
and left out of ROUGE (None when none is left: stale, not a false 0), with one warning per
window; chrF, which works on characters, still judges them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rouge_score import rouge_scorer, tokenizers
from sacrebleu import sentence_chrf
from sacrebleu.metrics import BLEU, CHRF

from monitor.window import AnswerMetric, ExchangeView, Window

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
_rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_tokenizer)


@dataclass(frozen=True)
class PairScore:
    """One response against its reference."""

    exchange_id: str
    exact_match: bool
    rouge: Mapping[str, float] | None  # F-measure per ROUGE type; None: reference unscorable


@dataclass(frozen=True)
class Quality:
    """Corpus-level quality of a window's labelled exchanges. n == 0: nothing to score."""

    n: int
    bleu: float | None
    chrf: float | None
    rouge: Mapping[str, float | None]  # ROUGE type -> mean F-measure over scorable pairs
    exact_match_ratio: float | None
    rouge_unscorable: int  # references ROUGE cannot tokenize, left out of its means
    bleu_signature: str | None  # sacrebleu's reproducibility string, for an info metric
    chrf_signature: str | None
    pairs: tuple[PairScore, ...] = field(repr=False)  # for calibration, not to score twice

    @property
    def rely_on_chrf(self) -> bool:
        """Some references are in a script ROUGE scores as zero: chrF is the one to read."""
        return self.rouge_unscorable > 0


def normalise(text: str) -> str:
    """Exact match ignores case, surrounding space and runs of whitespace."""
    return " ".join(text.casefold().split())


def rouge_unscorable(reference: str) -> bool:
    """The reference has letters but rouge-score's tokenizer keeps none of them."""
    return not _tokenizer.tokenize(reference) and any(c.isalpha() for c in reference)


def score_pairs(labelled: Sequence[ExchangeView]) -> tuple[PairScore, ...]:
    """Exact match and ROUGE of each labelled exchange (see `Window.labelled`)."""
    pairs = []
    for e in labelled:
        response, reference = e.response or "", e.reference or ""
        rouge = None
        if not rouge_unscorable(reference):
            scores = _rouge.score(reference, response)
            rouge = {t: scores[t].fmeasure for t in ROUGE_TYPES}
        pairs.append(PairScore(e.id, normalise(response) == normalise(reference), rouge))
    return tuple(pairs)


def answer_score(response: str, reference: str, metric: AnswerMetric) -> float:
    """One answer's score in [0, 1]: what a paired comparison of two adapters compares.

    chrF is sacrebleu's sentence chrF / 100 (it scores any script); ROUGE-L is 0 for a
    reference rouge-score cannot tokenize (see `rouge_unscorable`).
    """
    if metric == "exact_match":
        return float(normalise(response) == normalise(reference))
    if metric == "chrf":
        return sentence_chrf(response, [reference]).score / 100
    if rouge_unscorable(reference):
        return 0.0
    return _rouge.score(reference, response)["rougeL"].fmeasure


def quality(window: Window) -> Quality:
    """BLEU, chrF, ROUGE and exact match over the window's labelled exchanges."""
    labelled = window.labelled()
    if not labelled:
        return Quality(0, None, None, dict.fromkeys(ROUGE_TYPES), None, 0, None, None, ())
    hypotheses = [e.response or "" for e in labelled]  # labelled: neither is None
    references = [[e.reference or "" for e in labelled]]
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, references).score
    chrf_score = chrf.corpus_score(hypotheses, references).score
    pairs = score_pairs(labelled)
    scored = [p.rouge for p in pairs if p.rouge is not None]
    unscorable = len(pairs) - len(scored)
    if unscorable:
        logger.warning(
            "adapter %s: %d of %d references are in a script rouge-score drops (non-Latin); "
            "ROUGE leaves them out%s, rely on chrF for them",
            window.adapter,
            unscorable,
            len(pairs),
            " and is stale for this window" if not scored else "",
        )
    rouge = {t: sum(s[t] for s in scored) / len(scored) if scored else None for t in ROUGE_TYPES}
    return Quality(
        n=len(pairs),
        bleu=bleu_score,
        chrf=chrf_score,
        rouge=rouge,
        exact_match_ratio=sum(p.exact_match for p in pairs) / len(pairs),
        rouge_unscorable=unscorable,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        pairs=pairs,
    )
