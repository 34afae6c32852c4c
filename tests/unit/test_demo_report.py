"""The demo's live timeline (the audit trail as it grows) and its report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from store import Store
from tunewatch.demo.report import write_report
from tunewatch.demo.run import Timeline
from tunewatch.replay import Outcome


def test_the_timeline_shows_the_loop_s_decisions_and_sees_the_end(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'demo.db'}")
    store.record_event("drift.verdict", "before the demo", "base")
    timeline = Timeline(store, time.monotonic())
    timeline.poll()
    assert timeline.milestones == []  # what was there before it started is not news
    store.record_event("drift.verdict", "drift: prompt_text drifted", "base")
    store.record_event("retrain.trigger", "judged, not fired", "base")  # every check: noise
    timeline.shift_at = time.monotonic()
    store.record_event("retrain.queued", "drift held 2 checks", None)
    store.record_event("rollout.promoted", "no guard found harm", "rollout-1")
    timeline.poll()
    kinds = [m.kind for m in timeline.milestones]
    assert kinds == ["drift.verdict", "retrain.queued", "rollout.promoted"]
    assert timeline.milestones[0].since_shift_s is not None  # seen after the shift was marked
    assert timeline.ended == "promoted"


def test_the_report_holds_every_decision_escaped_and_both_exams(tmp_path: Path) -> None:
    timeline = Timeline(Store(f"sqlite:///{tmp_path / 'demo.db'}"), time.monotonic())
    for n in range(30):
        timeline.add(Outcome(n, ok=True, latency_s=0.5, exact_match=n % 3 == 0), "a")
    data = {
        "outcome": "promoted",
        "before": {"adapter": "before", "exact_match": 0.05, "chrf": 0.3, "examples": 60},
        "after": {"adapter": "after", "exact_match": 0.9, "chrf": 0.95, "examples": 60},
        "milestones": [
            {
                "since_start_s": 12.0,
                "since_shift_s": None,
                "kind": "drift.verdict",
                "subject": "base",
                "reason": "drift: <script>alert(1)</script>",
            },
            {
                "since_start_s": 300.0,
                "since_shift_s": 42.0,
                "kind": "rollout.promoted",
                "subject": "rollout-1",
                "reason": "no guard found harm",
            },
        ],  # fmt: skip
        "answers": json.loads(json.dumps(timeline.answers)),
    }
    page = write_report(data, tmp_path / "report.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "rollout.promoted" in page and "+42 s" in page
    assert "5% before, 90% after" in page
    assert "plotly" in page.lower()
