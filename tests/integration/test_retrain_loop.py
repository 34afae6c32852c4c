"""The loop closed, as `tunewatch monitor` runs it: drift in the recorded traffic -> the trigger
-> a real PEFT training job -> a candidate adapter that beats the base model.

No vLLM here: the monitor's drift check and the controller's jobs read the store, and the
store is seeded as the gateway writes it. The reference window is tax questions; then the
traffic turns to capitals questions that users label with the city (feedback). The drift
check (real MiniLM embeddings, real Evidently) flags the shift, the trigger waits for two
consecutive drifted checks and enough labels, queues a job, and the runner trains SmolLM2
with LoRA in a child process (`python -m retrain.trainer --job ID`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from registry.versions import versions
from store import Store
from store.jobs import TrainingJob
from tests.integration.realstack import wait_until
from tests.integration.test_trainer import capitals
from tests.ports import free_port

pytestmark = pytest.mark.slow

TAXES = ["How do I file my {} tax return?", "Which {} expenses are tax deductible?",
         "When is the {} income tax deadline?", "How are {} capital gains taxed?"]  # fmt: skip
TRAINING = {"learning_rate": 2e-3, "epochs": 2, "batch_size": 8, "max_length": 64,
            "eval_max_new_tokens": 16}  # fmt: skip


def row(prompt: str, at: datetime) -> dict:
    return dict(
        id=uuid.uuid4().hex, created_at=at, route="primary", adapter="base", parent_id=None,
        endpoint="chat.completions", user=None, prompt=prompt, request={}, response="Sure.",
        prompt_tokens=12, completion_tokens=5, ttft_seconds=None, latency_seconds=1.0,
        mean_logprob=-0.8, finish_reason="stop", status="ok", http_status=200, error=None,
    )  # fmt: skip


@dataclass
class Loop:
    store: Store
    state_dir: Path
    metrics_url: str
    labelled_ids: set[str]
    log_file: Path


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    state_dir = tmp_path_factory.mktemp("loop")
    store = Store(f"sqlite:///{state_dir / 'tunewatch.db'}")
    now = datetime.now(UTC)
    reference = [
        row(TAXES[n % 4].format(f"{['my', 'our', 'the', 'a'][n // 4 % 4]} {n}"),
            now - timedelta(days=1, seconds=-n))
        for n in range(250)
    ]  # fmt: skip
    examples = capitals()
    asked = [examples[n % len(examples)] for n in range(100)]
    current = [row(example.prompt, now + timedelta(seconds=n)) for n, example in enumerate(asked)]
    store.record_exchanges(reference + current)
    for exchange, example in zip(current, asked, strict=True):
        store.add_feedback(exchange["id"], example.reference, None)
    port = free_port()
    env = dict(
        os.environ,
        TUNEWATCH_STATE_DIR=str(state_dir),
        TUNEWATCH_MONITOR__PORT=str(port),
        TUNEWATCH_MONITOR__GOLDEN_ENABLED="false",
        TUNEWATCH_MONITOR__WINDOW_SIZE="100",
        TUNEWATCH_MONITOR__REFERENCE_SIZE="250",
        TUNEWATCH_MONITOR__DRIFT_INTERVAL_S="3",
        TUNEWATCH_RETRAIN__TRIGGER_INTERVAL_S="2",
        TUNEWATCH_RETRAIN__TRAINING_INTERVAL_S="2",
        TUNEWATCH_RETRAIN__CONSECUTIVE_CHECKS="2",
        TUNEWATCH_RETRAIN__MIN_NEW_LABELLED="50",
        TUNEWATCH_RETRAIN__TRAINING=json.dumps(TRAINING),
    )
    log_file = state_dir / "monitor.log"
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    engine = f"http://127.0.0.1:{free_port()}"  # nothing listens: the loop needs no engine
    with log_file.open("wb") as sink:
        process = subprocess.Popen([tunewatch, "monitor", "--engine-url", engine], env=env,
                                   stdout=sink, stderr=sink)  # fmt: skip
    try:
        yield Loop(store, state_dir, f"http://127.0.0.1:{port}/metrics",
                   {e["id"] for e in current}, log_file)  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=60)
        store.close()


def finished_job(store: Store) -> TrainingJob | None:
    with store.session() as session:
        return (
            session.query(TrainingJob)
            .filter(TrainingJob.status.in_(("succeeded", "failed")))
            .first()
        )


@pytest.fixture(scope="module")
def trained(loop: Loop) -> TrainingJob:
    wait_until(lambda: finished_job(loop.store) is not None, timeout_s=900,
               what="a training job to finish", interval_s=3)  # fmt: skip
    job = finished_job(loop.store)
    assert job is not None
    assert job.status == "succeeded", f"{job.error}\n{loop.log_file.read_text()[-3000:]}"
    return job


def test_the_drift_storm_queues_one_job_with_the_triggers_reason(loop: Loop, trained):
    evaluations = list(reversed(loop.store.events(kind="retrain.trigger", limit=1000)))
    actions = [e.data["action"] for e in evaluations]
    assert actions.count("retrain") == 1
    fired = evaluations[actions.index("retrain")]
    assert fired.data["drift_streak"] == 2 and fired.data["drift_share"] >= 0.25
    assert "-> retrain" in fired.reason and trained.reason == fired.reason


def test_the_candidate_beats_the_base_model_on_held_out_questions(loop: Loop, trained):
    [candidate] = [v for v in versions(loop.store) if v.job_id == trained.id]
    figures = candidate.metrics
    print(f"{candidate.name}: {figures}")
    assert candidate.status == "candidate" and candidate.parent is None
    assert candidate.name == "smollm2-135m-instruct-ft-v1"
    assert figures["exact_match"] >= figures["base_exact_match"] + 0.3, figures


def test_the_candidate_was_trained_on_the_labelled_exchanges_only(loop: Loop, trained):
    [candidate] = [v for v in versions(loop.store) if v.job_id == trained.id]
    assert set(candidate.data["exchange_ids"]) <= loop.labelled_ids
    assert candidate.data["golden_prompts"] == []
    assert (Path(candidate.path) / "adapter_config.json").is_file()


def test_the_daemon_exports_its_leadership_and_the_jobs_outcome(loop: Loop, trained):
    wait_until(lambda: "tunewatch_training_jobs_total" in httpx.get(loop.metrics_url).text,
               timeout_s=30, what="the training metrics")  # fmt: skip
    text = httpx.get(loop.metrics_url).text
    assert "tunewatch_scheduler_leader 1.0" in text
    assert 'tunewatch_training_jobs_total{outcome="succeeded"} 1.0' in text


def run_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    env = dict(os.environ, TUNEWATCH_STATE_DIR=str(state_dir))
    return subprocess.run([tunewatch, *args], env=env, capture_output=True, text=True, timeout=300)


def test_the_audit_trail_shows_every_decision_with_its_reason(loop: Loop, trained):
    shown = run_cli(loop.state_dir, "events", "--kind", "retrain.", "--limit", "200")
    assert shown.returncode == 0, shown.stderr
    for kind in ("retrain.trigger", "retrain.queued", "retrain.started", "retrain.succeeded"):
        assert kind in shown.stdout


def test_the_drift_that_started_it_was_judged_at_thresholds_fitted_on_the_reference(
    loop: Loop, trained
):
    [fitted] = loop.store.events(kind="drift.thresholds", subject="base")
    assert fitted.reason.startswith("fitted on 799 A/A splits of the reference (250 exchanges")
    assert fitted.data["thresholds"]
    first_drift = loop.store.events(kind="drift.verdict", subject="base")[-1]
    assert first_drift.created_at >= fitted.created_at


def test_retraining_by_hand_without_labels_fails_with_the_reason(tmp_path: Path):
    done = run_cli(tmp_path, "retrain", "--from-feedback")
    assert done.returncode == 1
    assert "no labelled exchanges" in done.stderr
    assert "Traceback" not in done.stderr


def test_retraining_by_hand_needs_to_be_told_what_to_train_on(tmp_path: Path):
    done = run_cli(tmp_path, "retrain")
    assert done.returncode == 2 and "--from-feedback" in done.stderr
