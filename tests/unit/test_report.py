"""The rollout report: figures per time bucket and side, the decisions, the table, the page."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import select, update

from rollout.report.build import RolloutReport, build_report, default_bucket_s
from rollout.report.html import render_html
from rollout.report.table import render_table
from rollout.repository import UnknownRolloutError
from store import Store
from store.events import Event
from store.rollouts import Rollout
from tests.unit.views import T0, exchange_record

CANDIDATE = "cand-1"
STEPS = [0.05, 0.25, 0.5, 1.0]
XSS = "<script>alert(1)</script>"


def add_rollout(store: Store, **fields: Any) -> int:
    """A rollout row: by default cand-1 against the base model, rolled back at 85 s of 90."""
    defaults: dict[str, Any] = dict(
        candidate=CANDIDATE, baseline=None, stage="rolled_back", step=0, created_at=T0,
        stage_started_at=T0 + timedelta(seconds=85), finished_at=T0 + timedelta(seconds=90),
        reason="quality guard failed", config={"steps": STEPS},
    )  # fmt: skip
    with store.session() as session:
        rollout = Rollout(**(defaults | fields))
        session.add(rollout)
        session.flush()
        return rollout.id


def add_event(
    store: Store, at_s: float, kind: str, reason: str, subject: str = "rollout-1", **data: Any
) -> None:
    """An event, dated `at_s` seconds into the rollout (the store dates events by the clock)."""
    store.record_event(kind, reason, subject, **data)
    with store.session() as session:
        newest = session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1))
        session.execute(
            update(Event).where(Event.id == newest).values(created_at=T0 + timedelta(seconds=at_s))
        )


QUALITY_FAIL = {
    "quality": {"verdict": "fail", "estimate": -0.6, "lower": -0.9, "upper": -0.3,
                "n_candidate": 40, "n_primary": 60, "reason": "credibly worse"},
    "latency": {"verdict": "inconclusive", "estimate": 1.05, "lower": 0.8, "upper": 1.4,
                "n_candidate": 40, "n_primary": 60, "reason": "too early"},
}  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """Rollout 1 of cand-1 against the base model, 90 s in buckets of 30 s:
    0-30 s shadow: a right primary answer and its identical shadow replay;
    30-60 s canary: a right primary answer, a wrong canary answer, a canary error;
    60-90 s: nothing (a gap). Events: started, advanced to canary 5%, rolled back."""
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_rollout(store)
    store.record_exchanges([
        exchange_record(1, response="Paris", latency_seconds=0.5),
        exchange_record(2, adapter=CANDIDATE, route="shadow", parent_id="x0001",
                        response="Paris", latency_seconds=0.2),
        exchange_record(31, response="Paris", latency_seconds=0.5),
        exchange_record(32, adapter=CANDIDATE, route="canary", response="zzz",
                        latency_seconds=0.4),
        exchange_record(33, adapter=CANDIDATE, route="canary", response=None, status="error",
                        http_status=503, latency_seconds=2.0, mean_logprob=None),
        # not the rollout's: another adapter, another route, after its end
        exchange_record(40, adapter="other", response="Paris"),
        exchange_record(41, adapter=CANDIDATE, route="pinned", response="Paris"),
        exchange_record(120, adapter=CANDIDATE, route="canary", response="Paris"),
    ])  # fmt: skip
    for exchange_id in ("x0001", "x0031", "x0032"):
        store.add_feedback(exchange_id, "a wrong reference, superseded", None)
        store.add_feedback(exchange_id, "Paris", None)
    add_event(store, 0, "rollout.started", "started by the trigger", stage="shadow", step=-1)
    # as rollout/runner.py records them: "stage", "step", "weight" after the move
    add_event(store, 85, "rollout.rolled_back", f"quality guard failed {XSS}",
              stage="rolled_back", step=0, weight=0.0, to_stage="rolled_back", to_step=0,
              to_weight=0.0, guards=QUALITY_FAIL)  # fmt: skip
    add_event(store, 30, "rollout.advanced", "[bold]no harm[/bold]", stage="canary", step=0,
              weight=0.05, to_stage="canary", to_step=0, to_weight=0.05)  # fmt: skip
    add_event(store, 50, "rollout.advanced", "another rollout's", subject="rollout-2")
    add_event(store, 50, "routing.changed", "not a rollout event", subject="rollout-1")
    return store


@pytest.fixture
def report(store: Store) -> RolloutReport:
    return build_report(store, 1, bucket_s=30)


def text_of(report: RolloutReport) -> str:
    console = Console(record=True, width=120)
    console.print(render_table(report))
    return console.export_text()


def test_buckets_cover_the_rollout_from_its_start_to_its_end(report: RolloutReport) -> None:
    assert [(b.start - T0).total_seconds() for b in report.buckets] == [0, 30, 60]
    assert report.buckets[-1].end == T0 + timedelta(seconds=90)


def test_quality_is_sentence_chrf_and_exact_match_against_the_newest_reference(
    report: RolloutReport,
) -> None:
    canary = report.buckets[1]
    assert (canary.primary.quality, canary.primary.exact_match) == (1.0, 1.0)
    assert (canary.candidate.quality, canary.candidate.exact_match) == (0.0, 0.0)
    assert canary.candidate.n_labelled == 1  # the error is counted, not scored


def test_a_shadow_answer_is_judged_against_its_parents_reference(report: RolloutReport) -> None:
    shadow = report.buckets[0].candidate
    assert (shadow.quality, shadow.exact_match, shadow.n_labelled) == (1.0, 1.0, 1)


def test_agreement_of_identical_answers_is_one(report: RolloutReport) -> None:
    assert (report.buckets[0].candidate.agreement, report.buckets[0].candidate.n_agreement) == (
        1.0,
        1,
    )
    assert report.buckets[1].candidate.agreement is None  # canary answers mirror nothing
    assert report.buckets[0].primary.agreement is None


def test_errors_count_in_the_error_rate_and_not_in_latency(report: RolloutReport) -> None:
    canary = report.buckets[1].candidate
    assert (canary.n, canary.errors, canary.error_rate) == (2, 1, 0.5)
    assert canary.latency_p50_s == pytest.approx(0.4)
    assert canary.latency_p95_s == pytest.approx(0.4)
    assert canary.mean_logprob == pytest.approx(-0.2)


def test_a_bucket_without_exchanges_is_a_gap_not_zeros(report: RolloutReport) -> None:
    empty = report.buckets[2]
    for side in (empty.primary, empty.candidate):
        assert side.n == 0
        assert side.quality is side.error_rate is side.latency_p95_s is side.agreement is None


def test_golden_runs_count_for_quality_not_for_latency_or_errors(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_rollout(store)
    store.record_exchanges([
        exchange_record(1, adapter=CANDIDATE, route="canary", latency_seconds=0.5),
        exchange_record(2, adapter=CANDIDATE, route="golden", response="Paris",
                        latency_seconds=9.0),
        exchange_record(3, adapter=CANDIDATE, route="golden", response=None, status="error"),
    ])  # fmt: skip
    store.add_feedback("x0002", "Paris", None)
    candidate = build_report(store, 1).candidate
    assert (candidate.n, candidate.n_served, candidate.quality) == (3, 1, 1.0)
    assert (candidate.latency_p95_s, candidate.error_rate) == (0.5, 0.0)


def test_only_the_rollouts_adapters_routes_and_time_are_read(report: RolloutReport) -> None:
    assert (report.primary.n, report.candidate.n) == (2, 3)
    assert report.primary.quality == 1.0
    assert report.candidate.quality == pytest.approx(0.5)


def test_decisions_are_the_rollouts_events_oldest_first(report: RolloutReport) -> None:
    assert [d.action for d in report.decisions] == ["started", "advanced", "rolled back"]
    assert [d.transition for d in report.decisions] == [
        "shadow",
        "shadow -> canary 5% (1/4)",
        "canary 5% (1/4) -> rolled back",
    ]
    quality = report.decisions[2].guards[0]
    assert (quality.guard, quality.verdict, quality.lower, quality.n_primary) == (
        "quality",
        "fail",
        -0.9,
        60,
    )


def test_a_move_recorded_with_where_it_came_from_says_so(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_rollout(store)  # decide_rollout's own figures: "stage" before, "to_stage" after
    add_event(store, 30, "rollout.advanced", "on", stage="canary", step=0, weight=0.05,
              to_stage="canary", to_step=1, to_weight=0.25)  # fmt: skip
    [decision] = build_report(store, 1).decisions
    assert decision.transition == "canary 5% (1/4) -> canary 25% (2/4)"


def test_a_pause_by_hand_and_a_resume_keep_the_step(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_rollout(store, stage="canary", step=1, finished_at=None)
    add_event(store, 10, "rollout.advanced", "", stage="canary", step=1, weight=0.25)
    add_event(store, 20, "rollout.paused", "paused by hand", stage="paused", step=1, weight=0.25)
    add_event(store, 40, "rollout.resumed", "resumed by hand", stage="canary", step=1)
    report = build_report(store, 1, now=T0 + timedelta(seconds=60))
    assert [d.transition for d in report.decisions][1:] == [
        "canary 25% (2/4) -> paused at 25%",
        "paused at 25% -> canary 25% (2/4)",
    ]
    assert [s.stage for s in report.stages] == ["shadow", "canary", "paused", "canary"]


def test_stages_are_the_spans_between_decisions(report: RolloutReport) -> None:
    spans = [(s.stage, (s.start - T0).total_seconds(), (s.end - T0).total_seconds())
             for s in report.stages]  # fmt: skip
    assert spans == [("shadow", 0, 30), ("canary", 30, 85), ("rolled_back", 85, 90)]


def test_an_unknown_rollout_is_a_named_error(store: Store) -> None:
    with pytest.raises(UnknownRolloutError, match="no rollout with id 42") as raised:
        build_report(store, 42)
    assert isinstance(raised.value, LookupError)


def test_a_rollout_without_exchanges_or_events_renders_no_data(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    rollout_id = add_rollout(store, finished_at=None, candidate="fresh", baseline="prim-0",
                             stage="shadow", step=-1, stage_started_at=T0, config={})  # fmt: skip
    report = build_report(store, rollout_id, now=T0 + timedelta(minutes=10))
    assert not report.has_data and report.decisions == ()
    assert len(report.buckets) == 60 and report.bucket_s == 10
    assert all(b.candidate.quality is None and b.primary.n == 0 for b in report.buckets)
    assert [s.stage for s in report.stages] == ["shadow"]
    text = text_of(report)
    assert "no data" in text and "no decision recorded yet" in text and "under way" in text
    page = render_html(report, tmp_path / "empty.html").read_text()
    assert "no data" in page


def test_a_rollout_created_this_instant_renders(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    rollout_id = add_rollout(store, finished_at=None, stage="shadow", stage_started_at=T0)
    report = build_report(store, rollout_id, now=T0)
    assert len(report.buckets) == 1
    assert render_html(report, tmp_path / "now.html").exists()


def test_the_default_bucket_gives_20_to_60_of_at_least_10_s() -> None:
    for duration in (1200, 3000, 3601, 7201, 10 * 3600, 5 * 86400):
        bucket = default_bucket_s(duration)
        assert bucket >= 10 and 20 <= math.ceil(duration / bucket) <= 60, duration
    assert default_bucket_s(30) == 10


def test_the_table_shows_summary_decisions_and_figures(report: RolloutReport) -> None:
    text = text_of(report)
    assert "cand-1" in text and "base (the base model)" in text
    assert "started by the trigger" in text
    assert "[bold]no harm[/bold]" in text  # a reason is text, never rich markup
    assert "quality fail -0.60 [-0.90, -0.30]" in text
    assert "agreement with primary" in text and "1.000 (n=1)" in text


def test_the_page_is_self_contained_with_the_plot_data(
    report: RolloutReport, tmp_path: Path
) -> None:
    path = render_html(report, tmp_path / "out" / "report.html")
    page = path.read_text()
    assert path.exists() and "Plotly.newPlot" in page
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=", page)  # opens offline
    assert '"name":"primary base"' in page and '"name":"candidate cand-1"' in page
    assert '"y":[1.0,0.0,null]' in page  # the candidate's quality per bucket, with its gap
    assert "rollout.rolled_back" in page and "started by the trigger" in page


def test_the_page_escapes_every_string_from_the_store(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_rollout(store, candidate='<img src=x onerror="alert(2)">')
    store.record_exchanges([exchange_record(1, adapter='<img src=x onerror="alert(2)">',
                                            route="canary")])  # fmt: skip
    add_event(store, 10, "rollout.paused", f"paused by hand {XSS}", stage="paused", step=0)
    page = render_html(build_report(store, 1), tmp_path / "x.html").read_text()
    assert XSS not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
