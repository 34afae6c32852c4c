"""Helpers around the real stack: `tunewatch up` (vLLM-CPU + gateway) as a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from serving.store import Store

ADMIN_TOKEN = "integration-admin-token"
SERVED_NAME = "smollm2-135m-instruct"


def wait_until(check, timeout_s: float, what: str, interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s")


def make_lora_adapter(model_dir: Path, target: Path, seed: int) -> Path:
    """A LoRA adapter with random, non-zero B: it visibly changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(target)
    return target


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    gateway_url: str
    engine_url: str
    monitor_url: str
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
