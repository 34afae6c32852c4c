"""`tunewatch replay` and `tunewatch export` against the real stack: the CLI sends a traffic file
with the official client through the gateway to vLLM, posts the references, and exports what
was recorded as a file that replays again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from store.exchanges import Exchange, Feedback
from tests.integration.realstack import Stack

pytestmark = pytest.mark.slow

USER = "replay-test"
QUESTIONS = [
    ("What is the capital of France? One word.", "Paris"),
    ("What is the capital of Italy? One word.", "Rome"),
    ("What is the capital of Spain? One word.", "Madrid"),
    ("What is the capital of Japan? One word.", "Tokyo"),
]


def tunewatch(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "tunewatch"), *args]
    env = dict(os.environ, TUNEWATCH_STATE_DIR=str(stack.state_dir), COLUMNS="200")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def recorded(stack: Stack) -> list[Exchange]:
    with stack.store.session() as session:
        query = select(Exchange).where(Exchange.user == USER).order_by(Exchange.created_at)
        return list(session.scalars(query))


def test_a_replayed_file_is_answered_recorded_labelled_and_exported(
    running_stack: Stack, tmp_path: Path
) -> None:
    traffic = tmp_path / "traffic.jsonl"
    lines = [
        json.dumps({"prompt": q, "reference": a, "user": USER, "at": i * 0.5, "max_tokens": 8})
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    traffic.write_text("\n".join([*lines[:2], '{"prompt": 3}', *lines[2:]]) + "\n")
    url = f"{running_stack.gateway_url}/v1"
    done = tunewatch(running_stack, "replay", str(traffic), "--gateway-url", url,
                     "--feedback-share", "1", "--concurrency", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert f"skipped {traffic}:3: prompt: Input should be a valid string" in said
    assert "sent 4 of 4: 4 answered, 0 failed; feedback posted for 4" in said

    exchanges = recorded(running_stack)
    assert len(exchanges) == 4
    assert all(e.status == "ok" and e.response for e in exchanges)
    assert {e.prompt for e in exchanges} == {q for q, _ in QUESTIONS}
    with running_stack.store.session() as session:
        ids = [e.id for e in exchanges]
        posted = session.scalars(select(Feedback).where(Feedback.exchange_id.in_(ids)))
        references = {f.exchange_id: f.reference for f in posted}
    answers = dict(QUESTIONS)
    assert references == {e.id: answers[e.prompt] for e in exchanges}

    exported = tmp_path / "exported.jsonl"
    done = tunewatch(running_stack, "export", "--output", str(exported), "--since", "1h")
    assert done.returncode == 0, done.stderr
    ours = [json.loads(x) for x in exported.read_text().splitlines() if USER in x]
    assert sorted((x["messages"][0]["content"], x["reference"]) for x in ours) == sorted(QUESTIONS)
    assert all(x["recorded"]["status"] == "ok" and x["recorded"]["answer"] for x in ours)

    again = tmp_path / "again.jsonl"
    again.write_text("".join(json.dumps(x) + "\n" for x in ours))
    done = tunewatch(running_stack, "replay", str(again), "--gateway-url", url, "--speed", "10")
    assert done.returncode == 0, done.stderr
    assert "sent 4 of 4: 4 answered" in " ".join(done.stderr.split())
    assert len(recorded(running_stack)) == 8
