"""What vLLM-CPU's LoRA ops cost in one engine step, by max_lora_rank, max_loras and the
modules given LoRA layers. Prints figures; starts no engine.

vLLM-CPU runs a LoRA layer as torch ops (vllm/lora/ops/torch_ops/lora_ops.py, called by
punica_cpu.PunicaWrapperCPU.add_lora_linear and add_lora_logits): per slice, a shrink that
gathers `lora_a[index of each token]` ([tokens, max_lora_rank, in]) and an expand that gathers
`lora_b[index of each token]` ([tokens, out, max_lora_rank]), each then one einsum. This calls
those very functions, with weights shaped as the engine allocates them for the prepared model
(its config.json: every layer's qkv_proj, o_proj, gate_up_proj and down_proj, and lm_head
for the sampled rows; embed_tokens, one small row a token, is left out), and times one
step's worth next to the base model's own matmuls for the same tokens (F.linear on the same
shapes), on one thread as the engine's worker runs here ('auto' binds one core of two).
Steps: a decode step of 1 and of 8 sequences, and the prefill of 8 prompts of 35 tokens
(bench.gateway's prompts in the chat template).

    .venv/bin/python -m bench.lora_ops [--repeats N]

Each figure is the median of N timed steps after one untimed; the variants alternate, step
by step, so a machine that drifts favours none. Settings (cache dir, model) come from
TUNEWATCH_* variables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

from tunewatch.settings import load_settings
from tunewatch.stack import prepare

console = Console(width=160)
PROMPT_TOKENS = 35


@dataclass(frozen=True)
class Module:
    """One LoRA-wrapped linear layer: its input width and output slices (packed modules)."""

    name: str
    inputs: int
    slices: tuple[int, ...]


@dataclass(frozen=True)
class Variant:
    name: str
    rank: int
    max_loras: int
    modules: frozenset[str]  # which of the model's modules get LoRA layers


@dataclass(frozen=True)
class Step:
    name: str
    tokens: int
    sampled: int  # rows the logits are computed for (one per sequence)


STEPS = (
    Step("decode c=1", 1, 1),
    Step("decode c=8", 8, 8),
    Step("prefill c=8", 8 * PROMPT_TOKENS, 8),
)
ALL = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"})
VARIANTS = (
    Variant("rank 8, 4 slots, all modules", 8, 4, ALL),
    Variant("rank 16, 4 slots, all modules", 16, 4, ALL),
    Variant("rank 64, 4 slots, all modules", 64, 4, ALL),
    Variant("rank 8, 1 slot, all modules", 8, 1, ALL),
    Variant("rank 8, 8 slots, all modules", 8, 8, ALL),
    Variant("rank 8, 4 slots, qkv_proj+o_proj", 8, 4, frozenset({"qkv_proj", "o_proj"})),
)


def model_modules(config: dict) -> tuple[int, list[Module], Module]:
    """The layer count, one layer's LoRA modules and lm_head, from a Llama config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layer = [
        Module("qkv_proj", hidden, (q, kv, kv)),
        Module("o_proj", q, (hidden,)),
        Module("gate_up_proj", hidden, (inter, inter)),
        Module("down_proj", inter, (hidden,)),
    ]
    return config["num_hidden_layers"], layer, Module("lm_head", hidden, (config["vocab_size"],))


class LoraModule:
    """A module's stacked LoRA weights as vLLM allocates them: [max_loras, 1, rank, in] and
    [max_loras, 1, out, rank] per slice."""

    def __init__(self, module: Module, rank: int, max_loras: int) -> None:
        self.module, self.rank = module, rank
        self.a = [torch.randn(max_loras, 1, rank, module.inputs) * 0.01 for _ in module.slices]
        self.b = [torch.randn(max_loras, 1, out, rank) * 0.01 for out in module.slices]

    def apply(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> None:
        """add_lora_linear's work: shrink every slice into a buffer, expand it into y."""
        buffers = [torch.zeros(x.size(0), self.rank) for _ in self.module.slices]
        for a, buffer in zip(self.a, buffers, strict=True):
            bgmv_shrink(x, a, buffer, indices, 1.0)
        offset = 0
        for b, buffer, size in zip(self.b, buffers, self.module.slices, strict=True):
            bgmv_expand_slice(buffer, b, y, indices, offset, size, True)
            offset += size

    def apply_logits(self, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> None:
        """add_lora_logits' work (one slice: bgmv_shrink then bgmv_expand)."""
        buffer = torch.zeros(x.size(0), self.rank)
        bgmv_shrink(x, self.a[0], buffer, indices, 1.0)
        bgmv_expand(buffer, self.b[0], y, indices, True)


def lora_step(layers: int, modules: list[LoraModule], head: LoraModule | None, step: Step):
    """One step's LoRA work, as a closure to time: every layer's modules, then lm_head."""
    xs = {m.module.inputs: torch.randn(step.tokens, m.module.inputs) for m in modules}
    ys = {m.module.name: torch.zeros(step.tokens, sum(m.module.slices)) for m in modules}
    indices = torch.zeros(step.tokens, dtype=torch.long)  # every row on slot 0: one adapter
    sampled = torch.zeros(step.sampled, dtype=torch.long)
    if head is not None:
        head_x = torch.randn(step.sampled, head.module.inputs)
        head_y = torch.zeros(step.sampled, head.module.slices[0])

    def run() -> None:
        for _ in range(layers):
            for m in modules:
                m.apply(xs[m.module.inputs], ys[m.module.name], indices)
        if head is not None:
            head.apply_logits(head_x, head_y, sampled)

    return run


def base_step(layers: int, layer: list[Module], head: Module, step: Step):
    """The base model's matmuls for the same step (attention and norms left out)."""
    weights = {m.name: torch.randn(sum(m.slices), m.inputs) * 0.01 for m in (*layer, head)}
    xs = {m.name: torch.randn(step.tokens, m.inputs) for m in layer}
    head_x = torch.randn(step.sampled, head.inputs)

    def run() -> None:
        for _ in range(layers):
            for m in layer:
                F.linear(xs[m.name], weights[m.name])
        F.linear(head_x, weights[head.name])

    return run


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model_dir, _ = prepare(load_settings())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers, layer, head = model_modules(config)
    console.print(f"{model_dir.name}: {layers} layers; 1 thread; median of {args.repeats} steps")
    runs: dict[tuple[str, str], object] = {}
    for step in STEPS:
        runs[("base matmuls", step.name)] = base_step(layers, layer, head, step)
        for v in VARIANTS:
            modules = [LoraModule(m, v.rank, v.max_loras) for m in layer if m.name in v.modules]
            lm = LoraModule(head, v.rank, v.max_loras) if "lm_head" in v.modules else None
            runs[(v.name, step.name)] = lora_step(layers, modules, lm, step)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for run in runs.values():
        run()  # untimed: first-call allocations
    for _ in range(args.repeats):
        for key, run in runs.items():
            times[key].append(timed(run))
    medians = {key: 1000 * statistics.median(t) for key, t in times.items()}

    table = Table(title="ms per engine step: LoRA ops (and their ratio to the base matmuls)")
    table.add_column("LoRA layers", no_wrap=True)
    for step in STEPS:
        table.add_column(step.name, justify="right")
    table.add_row(
        "base matmuls (no LoRA)", *(f"{medians[('base matmuls', s.name)]:.1f}" for s in STEPS)
    )
    for v in VARIANTS:
        cells = []
        for s in STEPS:
            lora, base = medians[(v.name, s.name)], medians[("base matmuls", s.name)]
            cells.append(f"{lora:.1f} ({lora / base:.2f}x)")
        table.add_row(v.name, *cells)
    console.print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per figure")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
