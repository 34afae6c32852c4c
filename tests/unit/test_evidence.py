"""A rollout's evidence kept up to date look by look is the evidence read whole, whatever
arrives late: a shadow replay a look after its primary, a reference after its exchange, a
newer reference, a golden answer before the other adapter's, a row stamped by a slow writer
before the previous look began."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from monitor.quality import answer_score
from rollout.evidence import Gathered, RolloutEvidence, gather
from rollout.repository import RolloutRecord, record_of
from store import Store
from store.rollouts import Rollout
from tests.unit.views import T0, exchange_record

CANDIDATE = "cand-1"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    yield store
    store.close()


def start_rollout(store: Store) -> RolloutRecord:
    """cand-1 against the base model since T0, in shadow since 5 s in."""
    with store.session() as session:
        row = Rollout(
            candidate=CANDIDATE, baseline=None, stage="shadow", step=-1, created_at=T0,
            stage_started_at=T0 + timedelta(seconds=5), reason="started", config={},
        )  # fmt: skip
        session.add(row)
        session.flush()
        return record_of(row)


def primary(n: int, response: str | None = "Paris", **fields: Any) -> dict[str, Any]:
    return exchange_record(n, response=response, **fields)


def shadow(n: int, parent: int, response: str | None = "Paris", **fields: Any) -> dict[str, Any]:
    return exchange_record(
        n, adapter=CANDIDATE, route="shadow", parent_id=f"x{parent:04d}", response=response,
        **fields,
    )  # fmt: skip


def golden(n: int, adapter: str, prompt: str, response: str) -> dict[str, Any]:
    return exchange_record(n, adapter=adapter, route="golden", prompt=prompt, response=response)


def counted(calls: list[tuple[str, str]]) -> Callable[[str, str], float]:
    """chrF, remembering what it was asked to score."""

    def score(answer: str, reference: str) -> float:
        calls.append((answer, reference))
        return answer_score(answer, reference, "chrf")

    return score


def assert_same(kept: Gathered, full: Gathered) -> None:
    assert kept.evidence == full.evidence
    assert kept.stage_samples == full.stage_samples
    assert json.dumps(kept.figures, sort_keys=True) == json.dumps(full.figures, sort_keys=True)


def test_evidence_kept_look_by_look_equals_the_evidence_read_whole(store: Store) -> None:
    rollout = start_rollout(store)
    score = partial(answer_score, metric="chrf")
    kept = RolloutEvidence(rollout.row, "chrf", score)

    def look() -> Gathered:
        kept.update(store)
        result = kept.gathered(rollout.state)
        assert_same(result, gather(store, rollout, "chrf", score))
        return result

    # look 1: pairs with and without a reference, a failed primary, canary answers, a shadow
    # whose primary came before the rollout
    store.record_exchanges([
        primary(1), shadow(2, 1, "Paris."),
        primary(3, "Rome"), shadow(4, 3, "Roma"),
        primary(5, None, status="error", http_status=500), shadow(6, 5),
        exchange_record(7, adapter=CANDIDATE, route="canary", latency_seconds=0.3),
        exchange_record(8, adapter=CANDIDATE, route="canary", response=None, status="error"),
        primary(-5, created_at=T0 - timedelta(seconds=5)), shadow(11, -5),
        golden(12, "base", "Capital of France?", "Paris"),
        primary(15, "Madrid"),
        exchange_record(19, adapter="other"),
        exchange_record(20, adapter=CANDIDATE, route="pinned"),
    ])  # fmt: skip
    for exchange_id, reference in (("x0001", "Paris"), ("x0012", "Paris"), ("x0015", "Madrid")):
        store.add_feedback(exchange_id, reference, None)
    first = look()
    assert first.figures["quality_pairs"] == 1  # x0002 only: x0004's primary has no reference

    # look 2: a reference after its pair, a newer one; a shadow of a primary read at the
    # last look; the candidate's golden answer, its reference not yet
    store.record_exchanges([
        primary(10, "Berlin"), shadow(16, 15, "Madrid"),
        golden(13, CANDIDATE, "capital of  France?", "Paris"),
    ])  # fmt: skip
    store.add_feedback("x0003", "Rome", None)
    store.add_feedback("x0001", "Paris, France", None)
    store.add_feedback("x0010", None, 0.5)  # a rating alone: no reference
    before = datetime.now(UTC)
    second = look()
    assert second.figures["quality_pairs"] == 3  # x0002 (rescored), x0004, x0016

    # look 3: an early exchange written late, stamped before the last look began; the last
    # references
    late = before - timedelta(seconds=5)
    store.record_exchanges([
        primary(17, "Oslo", created_at=T0 + timedelta(seconds=0.5), recorded_at=late),
        shadow(18, 17, "Oslo", created_at=T0 + timedelta(seconds=0.7), recorded_at=late),
    ])  # fmt: skip
    for exchange_id, reference in (("x0013", "Paris"), ("x0010", "Berlin"), ("x0017", "Oslo")):
        store.add_feedback(exchange_id, reference, None)
    third = look()
    assert third.figures["quality_pairs"] == 5  # x0002, x0004, x0016, x0018, golden
    assert third.figures["shadow_pairs"] == 5  # x0011's primary is not the rollout's
    assert third.evidence.latency_candidate[0] == 0.5  # x0018, the earliest, first

    # look 4: nothing new
    assert_same(look(), third)


def test_a_look_scores_only_the_pairs_that_are_new_or_relabelled(store: Store) -> None:
    rollout = start_rollout(store)
    calls: list[tuple[str, str]] = []
    kept = RolloutEvidence(rollout.row, "chrf", counted(calls))
    store.record_exchanges([primary(1), shadow(2, 1), primary(3, "Rome"), shadow(4, 3, "Roma")])
    store.add_feedback("x0001", "Paris", None)
    store.add_feedback("x0003", "Rome", None)
    kept.update(store)
    assert len(calls) == 4  # two pairs, each answer once

    store.record_exchanges([primary(5, "Oslo"), shadow(6, 5, "Oslo")])
    store.add_feedback("x0005", "Oslo", None)
    store.add_feedback("x0003", "Roma", None)
    kept.update(store)
    assert sorted(calls[4:]) == [
        ("Oslo", "Oslo"),
        ("Oslo", "Oslo"),
        ("Roma", "Roma"),
        ("Rome", "Roma"),
    ]

    kept.update(store)
    assert len(calls) == 8


def test_the_live_rate_counts_primary_and_canary_answers_not_shadows(store: Store) -> None:
    rollout = start_rollout(store)
    # Over the first 20 s: 8 primary answers (one failed), 2 canary; 5 shadows do not count.
    store.record_exchanges(
        [primary(n) for n in (2, 4, 6, 8, 10, 12, 14)]
        + [primary(16, None, status="error", http_status=500)]
        + [exchange_record(n, adapter=CANDIDATE, route="canary") for n in (18, 20)]
        + [shadow(n + 1, n) for n in (2, 4, 6, 8, 10)]
    )
    assert gather(store, rollout, "chrf", partial(answer_score, metric="chrf")).live_rate == 0.5
