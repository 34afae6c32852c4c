"""Real training runs of SmolLM2 with LoRA, through the child-process entry point.

The task: the shipped golden set's "What is the capital of X? Answer with the city name
only.", plus more countries. The base model answers in a sentence ("The capital of France
is Paris."), so its exact match is 0; an adapter trained on some countries must answer the
held-out ones (the validation split, never trained on) with the city alone.

Sized for 2 shared cores: one torch thread, max_length 64, 2 epochs at rank 8 (~1-3 min
for the main run, depending on what else runs). Every run goes through
`python -m retrain.trainer --spec`, as the daemon starts it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from monitor.goldens import DEFAULT_GOLDEN_SET, GoldenExample, load_golden_set
from retrain.data import build_training_set, write_training_set
from retrain.training.hpo import tune
from retrain.training.spec import TrainingConfig, TrainingSpec, progress_path, result_path
from serving.engine import adapter_fingerprint
from tests.integration.realstack import Stack, lora_adapter

pytestmark = pytest.mark.slow

MORE_CAPITALS = {
    "Cuba": "Havana", "Jamaica": "Kingston", "Venezuela": "Caracas", "Ecuador": "Quito",
    "Uruguay": "Montevideo", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu", "Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Saudi Arabia": "Riyadh", "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Afghanistan": "Kabul", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
    "Senegal": "Dakar", "Algeria": "Algiers", "Tunisia": "Tunis", "Sudan": "Khartoum",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Czech Republic": "Prague",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Latvia": "Riga", "Lithuania": "Vilnius", "Qatar": "Doha", "Armenia": "Yerevan",
    "Uzbekistan": "Tashkent",
}  # fmt: skip
CAPITALS_CONFIG = TrainingConfig(
    rank=8, alpha=16, learning_rate=2e-3, epochs=2, batch_size=8, max_length=64, threads=1,
    eval_max_new_tokens=16,
)  # fmt: skip
TINY_CONFIG = TrainingConfig(
    epochs=1, batch_size=2, max_length=64, threads=1, eval_max_examples=2, eval_max_new_tokens=4
)


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str
    seconds: float
    output_dir: Path

    @property
    def result(self) -> dict[str, Any]:
        return json.loads(result_path(self.output_dir).read_text())


def capitals() -> list[GoldenExample]:
    more = [
        GoldenExample(f"What is the capital of {country}? Answer with the city name only.", city)
        for country, city in MORE_CAPITALS.items()
    ]
    return load_golden_set(DEFAULT_GOLDEN_SET) + more


def write_data(model_dir: Path, root: Path, validation_fraction: float) -> tuple[Path, Path]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    training_set = build_training_set(
        [], capitals(), tokenizer, max_length=64, validation_fraction=validation_fraction
    )
    return write_training_set(training_set, root / "data")


def run_trainer(
    root: Path,
    model_dir: Path,
    config: TrainingConfig,
    data: tuple[Path, Path],
    *,
    parent: Path | None = None,
    launcher: tuple[str, ...] = (sys.executable,),
    timeout_s: float = 600,
    hpo_trials: int = 0,
) -> Run:
    output_dir = root / "adapters" / "capitals-v1"
    spec = {
        "model_dir": str(model_dir),
        "parent_adapter": str(parent) if parent else None,
        "train_file": str(data[0]),
        "validation_file": str(data[1]),
        "output_dir": str(output_dir),
        "config": asdict(config),
        "hpo_trials": hpo_trials,
    }
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    started = time.perf_counter()
    completed = subprocess.run(
        [*launcher, "-m", "retrain.trainer", "--spec", str(spec_file)],
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    return Run(completed.returncode, completed.stderr, time.perf_counter() - started, output_dir)


def tiny_data(model_dir: Path, root: Path) -> tuple[Path, Path]:
    """8 training and 2 validation examples: a run of a few steps."""
    train, validation = write_data(model_dir, root, validation_fraction=0.3)
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:8]))
    validation.write_text("".join(validation.read_text().splitlines(keepends=True)[:2]))
    return train, validation


@pytest.fixture(scope="module")
def capitals_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("capitals")
    run = run_trainer(root, model_dir, CAPITALS_CONFIG, write_data(model_dir, root, 0.3))
    assert run.returncode == 0, run.stderr
    return run


def test_the_adapter_beats_the_base_model_on_held_out_capitals(capitals_run: Run):
    result = capitals_run.result
    before, after = result["before"], result["after"]
    figures = (
        f"held-out n={after['n']} (trained on {result['train_examples']}): exact match "
        f"base {before['exact_match']:.2f} -> adapter {after['exact_match']:.2f}; chrF "
        f"{before['chrf']:.1f} -> {after['chrf']:.1f}; ROUGE-L {before['rouge_l']:.2f} -> "
        f"{after['rouge_l']:.2f}; training {result['train_seconds']:.0f} s, whole run "
        f"{capitals_run.seconds:.0f} s"
    )
    print(figures)
    assert before["model"] == "base" and after["model"] == "candidate"
    assert after["n"] == before["n"] >= 10, figures
    assert before["exact_match"] <= 0.1, figures  # the base answers in a sentence
    assert after["exact_match"] >= before["exact_match"] + 0.3, figures
    assert after["chrf"] > before["chrf"], figures


def test_the_output_is_a_peft_lora_adapter_vllm_loads(capitals_run: Run):
    adapter = capitals_run.output_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 8 <= 16  # vLLM's default --max-lora-rank
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as weights:
        names = list(weights.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    adapter_fingerprint(adapter)  # the check the gateway runs before asking vLLM to load it


QUESTION = "What is the capital of Italy? Answer with the city name only."


def test_the_trained_adapter_serves_on_the_real_vllm_in_its_learned_format(
    capitals_run: Run, running_stack: Stack
):
    with running_stack.admin as admin:
        loaded = admin.post(
            "/admin/adapters", json={"name": "capitals-v1", "path": str(capitals_run.output_dir)}
        )
        assert loaded.status_code == 201, loaded.text
        reply = httpx.post(
            f"{running_stack.gateway_url}/v1/chat/completions",
            json={
                "model": "capitals-v1", "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTION}],
            },
            timeout=120,
        )  # fmt: skip
        admin.delete("/admin/adapters/capitals-v1").raise_for_status()
    answer = reply.json()["choices"][0]["message"]["content"].strip()
    assert 0 < len(answer.split()) <= 3, answer  # a city's name, not a sentence


def test_nothing_but_the_adapter_and_its_two_records_is_left_behind(capitals_run: Run):
    siblings = sorted(p.name for p in capitals_run.output_dir.parent.iterdir())
    assert siblings == ["capitals-v1", "capitals-v1.progress.jsonl", "capitals-v1.result.json"]


def test_progress_lines_reach_the_last_step_with_a_validation_loss_per_epoch(capitals_run: Run):
    lines = progress_path(capitals_run.output_dir).read_text().splitlines()
    updates = [json.loads(line) for line in lines]
    assert updates[-1]["step"] == updates[-1]["total_steps"] == capitals_run.result["steps"]
    assert len([u for u in updates if u["val_loss"] is not None]) == CAPITALS_CONFIG.epochs


def test_a_nan_loss_fails_the_run_with_its_reason_and_leaves_no_adapter(
    model_dir: Path, tmp_path: Path
):
    parent = tmp_path / "corrupt-parent"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.fill_(float("nan"))
    lora.save_pretrained(parent)
    run = run_trainer(
        tmp_path, model_dir, TINY_CONFIG, tiny_data(model_dir, tmp_path), parent=parent
    )
    assert run.returncode != 0
    assert run.stderr.splitlines()[-1].startswith(
        "retrain.trainer: NonFiniteLossError: loss is nan at step 1"
    )
    assert not run.output_dir.exists()
    assert run.result["status"] == "failed"
    assert [p.name for p in run.output_dir.parent.iterdir()] == ["capitals-v1.result.json"]


def test_continuing_a_parent_adapter_keeps_its_shape_and_is_the_baseline(
    model_dir: Path, tmp_path: Path
):
    parent = lora_adapter(model_dir, tmp_path / "parent", seed=1)  # r=8 on q_proj, v_proj
    run = run_trainer(
        tmp_path, model_dir, TINY_CONFIG, tiny_data(model_dir, tmp_path), parent=parent
    )
    assert run.returncode == 0, run.stderr
    config = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert run.result["before"]["model"] == "parent"
    assert run.result["parent_adapter"] == str(parent)


def test_torchrun_with_two_cpu_processes_on_gloo_makes_an_adapter(model_dir: Path, tmp_path: Path):
    torchrun = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    )
    config = replace(TINY_CONFIG, threads=2)  # 2 processes x 1 thread
    run = run_trainer(
        tmp_path, model_dir, config, tiny_data(model_dir, tmp_path), launcher=torchrun
    )
    assert run.returncode == 0, run.stderr
    result = run.result
    assert (result["world_size"], result["threads_per_process"]) == (2, 1)
    assert result["steps"] == 2  # 8 examples, 2 per process per step
    assert (run.output_dir / "adapter_model.safetensors").is_file()
    assert result["after"]["n"] == 2  # rank 0 evaluated


def test_a_search_of_two_trials_judged_at_a_fifth_picks_a_config_and_leaves_nothing(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the trials' adapters go
    train_file, validation_file = tiny_data(model_dir, tmp_path)
    output_dir = tmp_path / "adapters" / "capitals-v1"
    config = replace(TINY_CONFIG, epochs=2)  # 8 steps: a trial stops mid-epoch, at step 2
    spec = TrainingSpec(model_dir, None, train_file, validation_file, output_dir, config)
    result = tune(spec, 2, seed=0)
    assert [t.number for t in result.trials] == [0, 1]
    assert all(t.val_loss is not None and math.isfinite(t.val_loss) for t in result.trials)
    assert result.best in [t.config for t in result.trials]
    assert result.best.rank <= 16 and result.best.budget_fraction == 1.0
    assert not output_dir.parent.exists()
    assert list(scratch.iterdir()) == []


def test_a_spec_with_hpo_trials_trains_the_searched_winner_and_reports_the_search(
    model_dir: Path, tmp_path: Path
):
    config = replace(TINY_CONFIG, epochs=2)
    run = run_trainer(tmp_path, model_dir, config, tiny_data(model_dir, tmp_path), hpo_trials=2)
    assert run.returncode == 0, run.stderr
    result = run.result
    search = result["hpo"]
    assert len(search["trials"]) == 2 and search["budget_fraction"] == 0.2
    winner = next(t for t in search["trials"] if t["number"] == search["best_trial"])
    assert result["config"]["learning_rate"] == winner["config"]["learning_rate"]
    assert (run.output_dir / "adapter_model.safetensors").is_file()
