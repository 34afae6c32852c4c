"""A rollout's evidence from the store: what its guards judge at each look, and what its
report shows of the quality pairs. One gather for both, so the report shows what was judged.

All of it since the rollout started (the guards' confidence sequences are valid over every
look only on the whole stream), up to `until` (the report of a finished rollout):
- quality, paired on the same prompts: a shadow replay against the primary answer it
  mirrored, where that exchange got a reference (feedback); and golden runs, the candidate's
  answer against the primary's to the same golden prompt (a golden run of both is started
  when the rollout starts). Scores per answer from monitor.quality (the rollout's metric, in
  [0, 1]). The primary's requests stay mirrored to the candidate through the canary steps,
  so this evidence keeps growing until promotion. Unpaired live canary answers are not
  compared: different users ask different questions.
- latency and errors: the candidate's shadow and canary answers against the primary's.
- agreement: chrF between the candidate's shadow answer and the primary's, reported (and
  exported) as a figure, never judged: a better adapter disagrees too; likewise scipy's
  one-shot paired test of the quality pairs (Wilcoxon signed-rank, or exact McNemar for
  exact match), whose p-value holds at one planned look, not at every look.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from monitor.quality import AnswerMetric, answer_score, normalise
from monitor.signals import mean, percentiles
from monitor.traffic import exchanges_since
from monitor.window import ExchangeView
from rollout.guards.paired import paired_test
from rollout.guards.types import Evidence
from rollout.repository import RolloutRecord
from serving.exchange import BASE_LABEL
from store import Store

Score = Callable[[str, str], float]  # (answer, reference) -> [0, 1]


@dataclass(frozen=True)
class Gathered:
    evidence: Evidence
    stage_samples: int  # candidate answers in the present stage: shadow replays or canary
    figures: dict[str, Any]  # JSON-ready, for the look's record


def gather(
    store: Store,
    rollout: RolloutRecord,
    metric: AnswerMetric,
    score: Score,
    until: datetime | None = None,
) -> Gathered:
    """The rollout's evidence from the store (see the module doc)."""
    row, state = rollout.row, rollout.state
    candidate = exchanges_since(
        store, row.candidate, row.created_at, ("shadow", "canary", "golden"), until=until
    )
    primary = exchanges_since(
        store, row.baseline or BASE_LABEL, row.created_at, ("primary", "golden"), until=until
    )
    by_id = {e.id: e for e in primary}
    shadow = [e for e in candidate if e.route == "shadow"]
    mirrored = [(e, by_id[e.parent_id]) for e in shadow if e.parent_id in by_id]
    pairs = [
        (score(c.response or "", p.reference or ""), score(p.response or "", p.reference or ""))
        for c, p in mirrored
        if c.ok and p.ok and p.reference is not None
    ]
    pairs += _golden_pairs(candidate, primary, score)
    agreement = [
        answer_score(c.response or "", p.response or "", "chrf")
        for c, p in mirrored
        if c.ok and p.ok
    ]
    # A shutdown's interruptions say nothing about either adapter.
    served = [e for e in candidate if e.route in ("shadow", "canary") and not e.interrupted]
    answered = [e for e in primary if e.route == "primary" and not e.interrupted]
    quality_candidate, quality_primary = [c for c, _ in pairs], [p for _, p in pairs]
    latency_candidate = [e.latency_seconds for e in served if e.ok]
    latency_primary = [e.latency_seconds for e in answered if e.ok]
    evidence = Evidence(
        quality_candidate=quality_candidate,
        quality_primary=quality_primary,
        paired_quality=True,
        quality_metric=metric,
        latency_candidate=latency_candidate,
        latency_primary=latency_primary,
        errors_candidate=[float(not e.ok) for e in served],
        errors_primary=[float(not e.ok) for e in answered],
    )
    route = "shadow" if state.stage == "shadow" else "canary"
    stage_samples = sum(
        1 for e in served if e.route == route and e.created_at >= state.stage_started_at
    )
    paired = paired_test(quality_candidate, quality_primary, binary=metric == "exact_match")
    figures = {
        "metric": metric,
        "paired_test": {"test": paired.test, "p_value": paired.p_value, "reason": paired.reason},
        "quality_pairs": len(pairs),
        "quality_candidate": mean(quality_candidate),
        "quality_primary": mean(quality_primary),
        "shadow_pairs": len(mirrored),
        "agreement": mean(agreement),
        "latency_p95_candidate": percentiles(latency_candidate, (95,))[0],
        "latency_p95_primary": percentiles(latency_primary, (95,))[0],
        "candidate_answers": len(served),
        "primary_answers": len(answered),
    }
    return Gathered(evidence, stage_samples, figures)


def _golden_pairs(
    candidate: list[ExchangeView], primary: list[ExchangeView], score: Score
) -> list[tuple[float, float]]:
    """The two adapters' golden answers to the same prompt, matched in the order asked."""
    asked: dict[str, list[ExchangeView]] = {}
    for e in primary:
        if e.route == "golden" and e.ok and e.reference is not None:
            asked.setdefault(normalise(e.prompt), []).append(e)
    pairs = []
    for e in candidate:
        if e.route == "golden" and e.ok and e.reference is not None:
            waiting = asked.get(normalise(e.prompt))
            if waiting:
                p = waiting.pop(0)
                candidate_score = score(e.response or "", e.reference)
                pairs.append((candidate_score, score(p.response or "", p.reference or "")))
    return pairs
