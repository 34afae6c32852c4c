"""Soak: the real stack held at saturation for a while, with faults on a schedule. Prints
figures; asserts nothing (tests/integration/test_soak.py runs a short one and asserts).

The stack is `tunewatch up` as a user starts it (vLLM-CPU, the gateway, the monitor with the
controller, Prometheus where installed), on free ports with its own state dir and SQLite store,
and a low `gateway.max_concurrency`. More clients than that limit ask it, with the official
openai client, small chat answers (every third streamed), each client honouring the
Retry-After of a 503 before it asks again. Faults, each at its second since the start:

- `engine@T`: vLLM SIGKILLed (its process group); the supervisor restarts it.
- `db@T:S`: the SQLite database locked for S seconds (an exclusive transaction held by another
  connection: every write fails with "database is locked", as with a database gone).
- `monitor@T`: the monitor (scheduler, controller, rollouts, training) SIGKILLed; the supervisor
  restarts it and the new process takes the lease.

Faults are applied in order, each once the previous one has recovered: a fault due meanwhile
comes late. What the clients have seen so far is printed every minute, so a run cut short
still says something.

`--rollout` registers a candidate adapter (B = 0: the base model's answers) at the start, so
that the controller has a rollout in progress when the monitor is killed. `--train` queues a
training job at the start (the golden set, 3 epochs: minutes on cores the load keeps busy),
so that a monitor killed early finds it mid-training: the child must outlive the monitor,
be adopted by its successor (`tunewatch_training_job_running` 1 on the new /metrics) and be
settled by it.

Printed: what the clients saw (answered, refused with 503 and Retry-After, anything else), what
the store holds for them (every answer recorded: the ids compared), RSS of the gateway and the
monitor at the start and end of the load, each fault's recovery time, and the stack's own
counters (shed, spilled, replayed, restarts).

    .venv/bin/python -m bench.soak [--duration-s 600] [--clients 12] [--max-concurrency 4]
        [--fault engine@150] [--fault db@300:30] [--fault monitor@450] [--rollout] [--train]

Run it alone (it takes both cores), under the integration lock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from store import Store
from store.events import Lease
from store.exchanges import Exchange
from tests.ports import free_ports

SERVED_NAME = "smollm2-135m-instruct"
ADMIN_TOKEN = "soak-admin-token"
USER_PREFIX = "soak-"
QUESTIONS = [
    "What is the capital of France?",
    "Name a colour.",
    "What is two plus two?",
    "Say hello in Spanish.",
]


@dataclass(frozen=True)
class Fault:
    kind: str  # engine | db | monitor
    at_s: float
    hold_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, _, when = text.partition("@")
        at, _, hold = when.partition(":")
        if kind not in ("engine", "db", "monitor") or not at:
            raise argparse.ArgumentTypeError(f"{text!r}: engine@T, db@T:S or monitor@T")
        return cls(kind, float(at), float(hold or 30.0))


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    state_dir: Path
    gateway_url: str
    monitor_url: str
    prometheus_url: str

    @property
    def database(self) -> Path:
        return self.state_dir / "tunewatch.db"

    @property
    def spill_file(self) -> Path:
        return self.state_dir / "spill" / "exchanges.jsonl"

    def child(self, marker: str) -> psutil.Process | None:
        for child in psutil.Process(self.process.pid).children():
            try:
                if marker in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def engine(self) -> psutil.Process | None:
        return self.child("vllm.entrypoints.openai.api_server")

    def monitor(self) -> psutil.Process | None:
        return self.child("monitor")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.gateway_url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def gateway_metrics(self) -> dict[str, float]:
        return self._metrics(self.gateway_url)

    def monitor_metrics(self) -> dict[str, float]:
        return self._metrics(self.monitor_url)

    @staticmethod
    def _metrics(url: str) -> dict[str, float]:
        """A /metrics page's samples by name and labels, e.g. 'x{reason="queue_full"}'."""
        text = httpx.get(f"{url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


def start_stack(state_dir: Path, args: argparse.Namespace) -> Stack:
    gateway, engine, monitor, prometheus = free_ports(4)
    env = dict(
        os.environ,
        TUNEWATCH_STATE_DIR=str(state_dir),
        TUNEWATCH_GATEWAY__PORT=str(gateway),
        TUNEWATCH_GATEWAY__ADMIN_TOKEN=ADMIN_TOKEN,
        TUNEWATCH_GATEWAY__MAX_CONCURRENCY=str(args.max_concurrency),
        TUNEWATCH_GATEWAY__ADAPTER_ROOTS=json.dumps([str(state_dir)]),
        TUNEWATCH_ENGINE__PORT=str(engine),
        TUNEWATCH_MONITOR__PORT=str(monitor),
        TUNEWATCH_MONITOR__GOLDEN_ENABLED="false",  # the clients are the only load
        TUNEWATCH_MONITOR__LEASE_TTL_S="6",  # a killed monitor's successor leads within 6 s
        TUNEWATCH_RETRAIN__MIN_NEW_LABELLED="1000000000",  # no retrain of its own
        TUNEWATCH_ROLLOUT__INTERVAL_S="2",
        TUNEWATCH_ROLLOUT__SHADOW_MIN_PAIRS="6",
        TUNEWATCH_ROLLOUT__STEP_MIN_SAMPLES="3",
        TUNEWATCH_ROLLOUT__STAGE_MIN_S="30",
        TUNEWATCH_ROLLOUT__MIN_SAMPLES="20",
        TUNEWATCH_PROMETHEUS__PORT=str(prometheus),
        TUNEWATCH_PROMETHEUS__SCRAPE_INTERVAL_S="2",
        TUNEWATCH_RETRAIN__USE_GOLDENS=str(args.train).lower(),  # what --train's job learns
        TUNEWATCH_RETRAIN__TRAINING__EVAL_MAX_EXAMPLES="4",
    )
    log = (state_dir / "tunewatch.log").open("wb")
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    process = subprocess.Popen([tunewatch, "up"], env=env, stdout=log, stderr=log)
    stack = Stack(
        process,
        state_dir,
        f"http://127.0.0.1:{gateway}",
        f"http://127.0.0.1:{monitor}",
        f"http://127.0.0.1:{prometheus}",
    )
    deadline = time.monotonic() + 600
    while not stack.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = (state_dir / "tunewatch.log").read_text()[-3000:]
            raise RuntimeError(f"tunewatch up did not come up:\n{tail}")
        time.sleep(2)
    return stack


@dataclass
class Tally:
    """What the clients saw, shared by their threads."""

    outcomes: Counter[str] = field(default_factory=Counter)
    answered_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_answer_at: float = 0.0

    def add(self, outcome: str, exchange_id: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if exchange_id is not None:
                self.answered_ids.add(exchange_id)
                self.last_answer_at = time.monotonic()


def ask_once(client: openai.OpenAI, user: str, n: int, tally: Tally) -> float:
    """One request; the seconds to wait before the next (a 503's Retry-After)."""
    question = [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]
    ask = dict(model=SERVED_NAME, messages=question, max_tokens=8, temperature=0, user=user)
    try:
        if n % 3 == 2:
            raw = client.chat.completions.with_raw_response.create(stream=True, **ask)
            for _ in raw.parse():
                pass
        else:
            raw = client.chat.completions.with_raw_response.create(**ask)
            raw.parse()
    except openai.APIStatusError as exc:
        retry_after = exc.response.headers.get("retry-after")
        code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
        if exc.status_code == 503 and retry_after is not None:
            tally.add(f"503 {code} (Retry-After)")
            return float(retry_after)
        tally.add(f"{exc.status_code} {code}")
        return 1.0
    except openai.APIError as exc:  # an error event inside a stream, a broken connection
        tally.add(f"{type(exc).__name__}")
        return 1.0
    tally.add("200 answered", raw.headers["x-tunewatch-exchange-id"])
    return 0.0


def client_loop(stack: Stack, index: int, until: float, tally: Tally) -> None:
    client = openai.OpenAI(
        base_url=f"{stack.gateway_url}/v1", api_key="unused", timeout=120, max_retries=0
    )
    n = index
    while time.monotonic() < until:
        wait_s = ask_once(client, f"{USER_PREFIX}{index}", n, tally)
        n += 1
        if wait_s:
            time.sleep(min(wait_s, max(0.0, until - time.monotonic())))


def wait_for(check, timeout_s: float, interval_s: float = 0.5) -> float | None:
    """Seconds until `check()` holds, or None past the timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        try:
            if check():
                return time.monotonic() - began
        except (httpx.HTTPError, psutil.Error, OSError):
            pass
        time.sleep(interval_s)
    return None


def lease_holder(stack: Stack) -> str | None:
    with sqlite3.connect(f"file:{stack.database}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute(f"SELECT holder FROM {Lease.__tablename__}").fetchone()
    return row[0] if row else None


def inject(stack: Stack, fault: Fault, tally: Tally, began: float) -> dict[str, object]:
    """Apply one fault and measure its recovery; what happened, for the report."""
    now = lambda: time.monotonic() - began  # noqa: E731
    if fault.kind == "engine":
        engine = stack.engine()
        if engine is None:
            return {"fault": "engine", "at_s": round(now()), "note": "no engine to kill"}
        at, killed = now(), time.monotonic()
        os.killpg(engine.pid, signal.SIGKILL)
        gone_s = wait_for(lambda: not stack.ready(), 60, 0.2)  # the gateway's health check
        answered_before = tally.last_answer_at
        wait_for(stack.ready, 600, 1.0)
        ready_s = time.monotonic() - killed
        wait_for(lambda: tally.last_answer_at > answered_before, 120, 0.5)
        return {
            "fault": "engine SIGKILL", "at_s": round(at),
            "not_ready_after_s": None if gone_s is None else round(gone_s, 1),
            "ready_again_s": round(ready_s, 1),
            "answering_again_s": round(max(0.0, tally.last_answer_at - killed), 1),
        }  # fmt: skip
    if fault.kind == "db":
        at, spilled_before = now(), spilled(stack)
        locker = sqlite3.connect(stack.database, timeout=60, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        time.sleep(fault.hold_s)
        locker.execute("ROLLBACK")
        locker.close()
        spilled_while_locked = spilled(stack) - spilled_before
        drained_s = wait_for(lambda: not stack.spill_file.exists(), 300, 0.5)
        return {
            "fault": f"database locked {fault.hold_s:g} s", "at_s": round(at),
            "spilled_while_locked": int(spilled_while_locked),
            "spill_replayed_s_after_unlock": None if drained_s is None else round(drained_s, 1),
        }  # fmt: skip
    monitor = stack.monitor()
    if monitor is None:
        return {"fault": "monitor", "at_s": round(now()), "note": "no monitor to kill"}
    at, old_pid, old_holder = now(), monitor.pid, lease_holder(stack)
    stage, training = rollout_stage(stack), training_job(stack)
    os.kill(old_pid, signal.SIGKILL)
    new_up_s = wait_for(
        lambda: (m := stack.monitor()) is not None and m.pid != old_pid
        and httpx.get(f"{stack.monitor_url}/metrics", timeout=5).status_code == 200, 300, 0.5,
    )  # fmt: skip
    lease_s = wait_for(lambda: lease_holder(stack) not in (None, old_holder), 300, 0.5)
    figures = {
        "fault": "monitor SIGKILL", "at_s": round(at), "rollout_stage_then": stage,
        "new_monitor_up_s": None if new_up_s is None else round(new_up_s, 1),
        "lease_taken_again_s": None if lease_s is None else round(lease_s, 1),
    }  # fmt: skip
    if training is not None and training[1] == "running":
        job_id, _, trainer_pid = training
        adopted_s = wait_for(
            lambda: stack.monitor_metrics().get("tunewatch_training_job_running") == 1, 120, 0.5
        )
        figures["training_then"] = {
            "job": job_id,
            "trainer_outlived_the_monitor": trainer_pid is not None
            and psutil.pid_exists(trainer_pid),
            "adopted_s": None if adopted_s is None else round(adopted_s, 1),
        }
    return figures


def training_job(stack: Stack) -> tuple[int, str, int | None] | None:
    """The newest training job: id, status, trainer pid."""
    with sqlite3.connect(f"file:{stack.database}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT id, status, pid FROM training_jobs ORDER BY id DESC").fetchone()


def queue_training(stack: Stack) -> None:
    from retrain.jobs import queue_job  # transformers, only for --train

    store = Store(f"sqlite:///{stack.database}")
    try:
        queue_job(store, "soak: a job for the monitor to die under", None)
    finally:
        store.close()


def spilled(stack: Stack) -> float:
    metrics = stack.gateway_metrics()
    return sum(v for k, v in metrics.items() if k.startswith("tunewatch_recorder_spilled_total"))


def rollout_stage(stack: Stack) -> str | None:
    with sqlite3.connect(f"file:{stack.database}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute("SELECT stage FROM rollouts ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def add_candidate(stack: Stack) -> None:
    """A candidate with B = 0 (the base model's answers): the controller starts its rollout."""
    from tests.integration.realstack import lora_adapter  # torch and PEFT, only for --rollout
    from tunewatch import stack as composition
    from tunewatch.settings import load_settings

    model_dir, _ = composition.prepare(load_settings())
    path = lora_adapter(model_dir, stack.state_dir / "adapters" / "soak-w", seed=11, b_std=0.0)
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    env = dict(os.environ, TUNEWATCH_STATE_DIR=str(stack.state_dir))
    subprocess.run(
        [tunewatch, "adapters", "add", str(path), "--family", "soak-w"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip


@dataclass
class Memory:
    """RSS in MiB of the gateway (`tunewatch up` itself) and the monitor, sampled."""

    samples: list[tuple[float, float, float | None]] = field(default_factory=list)

    def sample(self, stack: Stack, at: float) -> None:
        gateway = psutil.Process(stack.process.pid).memory_info().rss / 2**20
        monitor = stack.monitor()
        try:
            monitor_rss = monitor.memory_info().rss / 2**20 if monitor else None
        except psutil.Error:
            monitor_rss = None
        self.samples.append((at, gateway, monitor_rss))


def stored(stack: Stack) -> tuple[Counter[str], set[str]]:
    """The clients' exchanges in the store: counts by status and HTTP status, and the ids
    recorded as answered."""
    store = Store(f"sqlite:///{stack.database}")
    try:
        with store.session() as session:
            mine = Exchange.user.like(f"{USER_PREFIX}%") & Exchange.parent_id.is_(None)
            rows = session.execute(
                select(Exchange.status, Exchange.http_status, func.count())
                .where(mine)
                .group_by(Exchange.status, Exchange.http_status)
            ).all()
            ok = set(session.scalars(select(Exchange.id).where(mine, Exchange.status == "ok")))
    finally:
        store.close()
    return Counter({f"{status} {code}": n for status, code, n in rows}), ok


def run(args: argparse.Namespace, state_dir: Path) -> dict[str, object]:
    started = time.monotonic()
    stack = start_stack(state_dir, args)
    report: dict[str, object] = {"stack_up_s": round(time.monotonic() - started)}
    try:
        if args.rollout:
            add_candidate(stack)
        if args.train:
            queue_training(stack)
        tally, memory, faults = Tally(), Memory(), []
        began = time.monotonic()
        until = began + args.duration_s
        clients = [
            threading.Thread(target=client_loop, args=(stack, i, until, tally), daemon=True)
            for i in range(args.clients)
        ]
        for client in clients:
            client.start()

        def sample_memory() -> None:
            while time.monotonic() < until:
                at = time.monotonic() - began
                memory.sample(stack, at)
                if len(memory.samples) % 6 == 0:
                    with tally.lock:
                        seen = dict(tally.outcomes)
                    rss = [round(x) if x else None for x in memory.samples[-1][1:]]
                    print(f"at {at:.0f} s: {seen}, RSS gateway/monitor MiB {rss}", flush=True)
                time.sleep(10)

        threading.Thread(target=sample_memory, daemon=True).start()
        for fault in sorted(args.fault, key=lambda f: f.at_s):
            time.sleep(max(0.0, began + fault.at_s - time.monotonic()))
            faults.append(inject(stack, fault, tally, began))
            print(f"fault: {faults[-1]}", flush=True)
        for client in clients:
            client.join()
        load_s = time.monotonic() - began
        memory.sample(stack, load_s)

        # What was answered has been handed to the recorder: wait for it (and the spill) to drain.
        def drained() -> bool:
            depth = stack.gateway_metrics().get("tunewatch_recorder_queue_depth", 0)
            return depth == 0 and not stack.spill_file.exists()

        report["drained_s"] = wait_for(drained, 300)
        counts, ok_ids = stored(stack)
        metrics = stack.gateway_metrics()
        report.update(
            load_s=round(load_s),
            clients=args.clients,
            max_concurrency=args.max_concurrency,
            seen_by_clients=dict(tally.outcomes),
            answers_seen=len(tally.answered_ids),
            in_store=dict(counts),
            answered_not_recorded_ok=len(tally.answered_ids - ok_ids),
            recorded_ok_not_seen=len(ok_ids - tally.answered_ids),
            faults=faults,
            memory_mib=memory_figures(memory),
            gateway_counters={
                k: v
                for k, v in metrics.items()
                if k.startswith(
                    (
                        "tunewatch_requests_shed_total",
                        "tunewatch_recorder_spilled_total",
                        "tunewatch_recorder_replayed_total",
                        "tunewatch_store_write_failures_total",
                        "tunewatch_process_restarts_total",
                    )
                )
                and v
            },
            rollout_stage_at_end=rollout_stage(stack) if args.rollout else None,
            training_job_at_end=training_job(stack) if args.train else None,
            stack_alive=stack.process.poll() is None,
        )
    finally:
        stack.process.send_signal(signal.SIGINT)
        try:
            stack.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            stack.process.kill()
    report["stack_exit_code"] = stack.process.returncode
    return report


def memory_figures(memory: Memory) -> dict[str, object]:
    """Start (the first sample of the load), end, and the largest, per process."""
    if not memory.samples:
        return {}
    first, last = memory.samples[0], memory.samples[-1]
    monitors = [m for _, _, m in memory.samples if m is not None]
    return {
        "gateway_start_end_max": [
            round(first[1]),
            round(last[1]),
            round(max(g for _, g, _ in memory.samples)),
        ],
        "monitor_start_end_max": [
            round(first[2]) if first[2] else None,
            round(last[2]) if last[2] else None,
            round(max(monitors)) if monitors else None,
        ],
        "gateway_every_10_s": [round(g) for _, g, _ in memory.samples],
        "monitor_every_10_s": [round(m) if m else None for _, _, m in memory.samples],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--fault", type=Fault.parse, action="append", default=[])
    parser.add_argument("--rollout", action="store_true")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--state-dir", type=Path, default=None, help="kept; default: a temp dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.state_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="tunewatch-soak-") as state_dir:
            report = run(args, Path(state_dir))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
