"""Time to recover quality on a drifted task: the real daemon, from the drift's onset to a
registered candidate that answers the new task. Prints figures; asserts nothing.

The set-up: `tunewatch monitor` (the real scheduler, drift check with MiniLM and Evidently,
trigger and training runner, in its own process, on its own SQLite store) watches the base
model's traffic. The reference window is 250 tax questions. At t = 0 the traffic turns to
capitals questions (the shipped golden set's 40, asked over and over), streamed into the
store at --rate exchanges per second as the gateway records them, each labelled by its
user with the city (feedback) a moment later. The base model answers such questions in a
sentence, so its exact match on them is 0; the candidate's is measured by the trainer on
the held-out questions (the validation split it never trained on).

Printed: when the first drift check flagged the shift, when the trigger decided to retrain
(it waits for --checks consecutive drifted checks and --labels new references), when the
job started and when the candidate was registered, each in seconds since the onset, plus
the candidate's exact match and chrF against the base model's on the held-out questions.
The rollout that would then put the candidate in front of users is not part of this time.

    .venv/bin/python -m bench.recover [--rate 2] [--checks 3] [--labels 50] [--threads 1]

About 3-5 minutes on 2 cores, most of it training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from monitor.goldens import DEFAULT_GOLDEN_SET, load_golden_set
from store import Store
from store.drift import DriftCheck
from store.events import Event
from store.jobs import TrainingJob
from tests.ports import free_port

TAXES = [
    "How do I file my {} tax return?",
    "Which {} expenses are tax deductible?",
    "When is the {} income tax deadline?",
    "How are {} capital gains taxed?",
]
TIMEOUT_S = 1200


def exchange(prompt: str, at: datetime) -> dict:
    return dict(
        id=uuid.uuid4().hex,
        created_at=at,
        route="primary",
        adapter="base",
        parent_id=None,
        endpoint="chat.completions",
        user=None,
        prompt=prompt,
        request={},
        response="The capital is a city.",
        prompt_tokens=12,
        completion_tokens=6,
        ttft_seconds=None,
        latency_seconds=1.0,
        mean_logprob=-0.8,
        finish_reason="stop",
        status="ok",
        http_status=200,
        error=None,
    )


def first(store: Store, query) -> datetime | None:
    with store.session() as session:
        row = session.scalars(query.limit(1)).first()
        return None if row is None else row.created_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2.0, help="exchanges per second")
    parser.add_argument("--checks", type=int, default=3, help="consecutive drifted checks")
    parser.add_argument("--labels", type=int, default=50, help="new references needed")
    parser.add_argument("--threads", type=int, default=1, help="the trainer's torch threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recover-") as scratch:
        run(Path(scratch), args)


def run(state_dir: Path, args: argparse.Namespace) -> None:
    store = Store(f"sqlite:///{state_dir / 'tunewatch.db'}")
    past = datetime.now(UTC) - timedelta(days=1)
    store.record_exchanges(
        [
            exchange(
                TAXES[n % 4].format(f"{['my', 'our', 'the', 'a'][n // 4 % 4]} {n}"),
                past + timedelta(seconds=n),
            )
            for n in range(250)
        ]
    )
    training = {
        "learning_rate": 2e-3,
        "epochs": 2,
        "batch_size": 8,
        "max_length": 64,
        "eval_max_new_tokens": 16,
    }
    env = dict(
        os.environ,
        TUNEWATCH_STATE_DIR=str(state_dir),
        TUNEWATCH_MONITOR__PORT=str(free_port()),
        TUNEWATCH_MONITOR__GOLDEN_ENABLED="false",
        TUNEWATCH_MONITOR__WINDOW_SIZE="100",
        TUNEWATCH_MONITOR__REFERENCE_SIZE="250",
        TUNEWATCH_MONITOR__DRIFT_INTERVAL_S="5",
        TUNEWATCH_RETRAIN__TRIGGER_INTERVAL_S="2",
        TUNEWATCH_RETRAIN__TRAINING_INTERVAL_S="2",
        TUNEWATCH_RETRAIN__CONSECUTIVE_CHECKS=str(args.checks),
        TUNEWATCH_RETRAIN__MIN_NEW_LABELLED=str(args.labels),
        TUNEWATCH_RETRAIN__THREADS=str(args.threads),
        TUNEWATCH_RETRAIN__TRAINING=json.dumps(training),
    )
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    log = (state_dir / "monitor.log").open("wb")
    daemon = subprocess.Popen(
        [tunewatch, "monitor", "--engine-url", "http://127.0.0.1:9"],
        env=env,
        stdout=log,
        stderr=log,
    )
    print(f"the daemon starts (pid {daemon.pid}); waiting for its first drift check")
    try:
        while first(store, select(DriftCheck)) is None:
            time.sleep(1)
        questions = load_golden_set(DEFAULT_GOLDEN_SET)
        onset, sent = datetime.now(UTC), 0
        print(f"t=0: the traffic turns to capitals questions at {args.rate:g}/s")
        while (datetime.now(UTC) - onset).total_seconds() < TIMEOUT_S:
            due = int((datetime.now(UTC) - onset).total_seconds() * args.rate)
            rows = [
                exchange(questions[n % len(questions)].prompt, datetime.now(UTC))
                for n in range(sent, due)
            ]
            if rows:
                store.record_exchanges(rows)
                for row, n in zip(rows, range(sent, due), strict=True):
                    store.add_feedback(row["id"], questions[n % len(questions)].reference, None)
                sent = due
            with store.session() as session:
                done = session.scalars(
                    select(TrainingJob).where(TrainingJob.status.in_(("succeeded", "failed")))
                ).first()
            if done is not None:
                break
            time.sleep(0.5)
        report(store, onset, sent)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        store.close()


def report(store: Store, onset: datetime, sent: int) -> None:
    def since(moment: datetime | None) -> str:
        return "never" if moment is None else f"{(moment - onset).total_seconds():6.1f} s"

    detected = first(
        store,
        select(DriftCheck)
        .where(DriftCheck.detected.is_(True), DriftCheck.created_at > onset)
        .order_by(DriftCheck.id),
    )
    decided = first(store, select(Event).where(Event.kind == "retrain.queued").order_by(Event.id))
    started = first(store, select(Event).where(Event.kind == "retrain.started").order_by(Event.id))
    with store.session() as session:
        job = session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc())).first()
        finished = job.finished_at if job else None
        status, error, adapter = (job.status, job.error, job.adapter) if job else ("-", None, None)
        result = dict(job.result) if job else {}
    print(f"first drifted check       {since(detected)}")
    print(f"retrain decided           {since(decided)}")
    print(f"training started          {since(started)}")
    print(
        f"candidate registered      {since(finished if status == 'succeeded' else None)}"
        f"   ({sent} exchanges sent since the onset; job {status})"
    )
    if error:
        print(f"the job failed: {error}")
    figures = result.get("metrics", {})
    if adapter and figures:
        print(
            f"{adapter} on the held-out questions: exact match {figures['exact_match']:.2f} "
            f"(base {figures.get('base_exact_match', float('nan')):.2f}), chrF "
            f"{figures['chrf']:.1f} (base {figures.get('base_chrf', float('nan')):.1f}); "
            f"{result.get('train_seconds', float('nan')):.0f} s of training"
        )


if __name__ == "__main__":
    main()
