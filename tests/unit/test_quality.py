"""Quality of a window: the libraries' own numbers, exact match, the non-Latin fallback."""

from __future__ import annotations

import logging

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from monitor.quality import ROUGE_TYPES, normalise, quality, rouge_unscorable
from monitor.window import Window
from tests.unit.views import exchange_view

PAIRS = [  # (response, reference)
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("Water boils at 100 degrees Celsius at sea level.", "At sea level, water boils at 100 °C."),
    ("I do not know the answer to that question.", "The answer is forty-two."),
    (
        "Photosynthesis turns light into chemical energy.",
        "Photosynthesis turns light into chemical energy.",
    ),
]


def exchange(response: str | None, reference: str | None, *, status: str = "ok", n: int = 0):
    return exchange_view(id=f"x{n}", response=response, reference=reference, status=status)


def window(pairs, **kwargs) -> Window:
    return Window("a", tuple(exchange(h, r, n=i, **kwargs) for i, (h, r) in enumerate(pairs)))


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    q = quality(window(PAIRS))
    assert q.n == 4
    assert q.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert q.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_signatures_are_sacrebleus():
    q = quality(window(PAIRS))
    assert q.bleu_signature == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" + (
        sacrebleu.__version__
    )
    assert q.chrf_signature.startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|")


def test_rouge_is_the_mean_of_rouge_scorer_f_measures():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    scores = [scorer.score(r, h) for h, r in PAIRS]
    q = quality(window(PAIRS))
    for t in ROUGE_TYPES:
        assert q.rouge[t] == pytest.approx(sum(s[t].fmeasure for s in scores) / len(scores))
    assert q.rouge_unscorable == 0 and not q.rely_on_chrf


def test_exact_match_ignores_case_and_whitespace():
    assert normalise("  The  Answer\tis\n42 ") == normalise("the answer is 42")
    q = quality(window([("  PARIS\n", "paris"), ("Paris.", "Paris"), ("Lyon", "Paris")]))
    assert q.exact_match_ratio == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "exchanges", [(), (exchange("an answer", None),)], ids=["empty", "no refs"]
)
def test_a_window_without_labelled_exchanges_has_nothing_to_score(exchanges):
    q = quality(Window("a", exchanges))
    assert q.n == 0
    assert (q.bleu, q.chrf, q.exact_match_ratio, q.bleu_signature) == (None, None, None, None)
    assert q.rouge == dict.fromkeys(ROUGE_TYPES)
    assert q.pairs == ()


def test_error_exchanges_are_not_scored():
    errors = tuple(exchange(None, "Paris", status="error", n=10 + i) for i in range(3))
    q = quality(Window("a", window(PAIRS).exchanges + errors))
    assert q.n == len(PAIRS)
    assert q.bleu == pytest.approx(quality(window(PAIRS)).bleu)


@pytest.mark.parametrize(
    "text", ["巴黎是法国的首都。", "Париж — столица Франции.", "باريس عاصمة فرنسا"]
)
def test_references_without_latin_letters_are_unscorable_by_rouge(text):
    assert rouge_unscorable(text)


@pytest.mark.parametrize("text", ["Paris", "42", "!!!", "", "Париж (Paris)"])
def test_references_rouge_can_tokenize_or_without_letters_are_scorable(text):
    assert not rouge_unscorable(text)


def test_non_latin_references_leave_rouge_stale_and_warn_once(caplog):
    pairs = [("巴黎是法国的首都。", "巴黎是法国的首都。"), ("Москва", "Париж — столица Франции.")]
    with caplog.at_level(logging.WARNING, logger="monitor.quality"):
        q = quality(window(pairs))
    assert q.rouge == dict.fromkeys(ROUGE_TYPES)  # stale, not a false 0
    assert q.rouge_unscorable == 2 and q.rely_on_chrf
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    assert q.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert q.chrf > 0 and q.exact_match_ratio == 0.5
    assert len(caplog.records) == 1
    assert "rely on chrF" in caplog.records[0].getMessage()


def test_mixed_window_averages_rouge_over_the_references_it_can_tokenize():
    q = quality(window([("Paris", "Paris"), ("Lyon", "Paris"), ("Париж", "Париж")]))
    assert q.rouge["rouge1"] == pytest.approx(0.5)
    assert q.rouge_unscorable == 1 and q.exact_match_ratio == pytest.approx(2 / 3)


def test_pairs_follow_the_labelled_exchanges():
    q = quality(window([("Paris", "Paris"), ("Lyon", "Paris"), ("Париж", "Париж")]))
    assert [p.exchange_id for p in q.pairs] == ["x0", "x1", "x2"]
    assert [p.exact_match for p in q.pairs] == [True, False, True]
    assert q.pairs[0].rouge == dict.fromkeys(ROUGE_TYPES, 0.0) | {"rouge1": 1.0, "rougeL": 1.0}
    assert q.pairs[2].rouge is None
