"""What vLLM-CPU's engine settings do to the adapter path, and to the base path. Prints figures.

Each variant is one engine, launched as `tunewatch up` launches it (`tunewatch.stack.
engine_launch` from the settings) with one thing changed from the shipped defaults: an engine
setting, or vLLM arguments appended as `engine.extra_args` would append them. On each, one
real LoRA adapter (rank 8 on q/k/v/o_proj, what the trainer makes) is loaded, and the same
streamed chat completions (bench.gateway's prompts, 16-token answers, temperature 0,
ignore_eos, token logprobs as the gateway asks) go to the adapter and to the base model,
alternating ABBA, at concurrency 1 and 8. The shipped defaults run first and again last:
the difference between those two rows is the drift of the machine over the run, the
noise any other row must beat.

Printed per variant: output tokens/s and median time to first token on each path, the
engine's start time and resident memory; then their ratios against the shipped defaults
(first run), and each variant's adapter / base ratio (what the LoRA path costs there).

    .venv/bin/python -m bench.engine_settings [--variants NAME ...] [--requests N]

About 2 minutes a variant on 2 cores (vLLM starts in about a minute); `--variants` picks
some (the defaults always run, first and last). Settings (cache dir, model) come from
TUNEWATCH_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.table import Table

from bench.gateway import (
    MAX_TOKENS,
    Result,
    Server,
    Target,
    compare,
    console,
    positive_int,
    warm_up,
)
from retrain.training.spec import DEFAULT_TARGET_MODULES
from serving.engine import EngineClient, EngineLaunch
from tests.integration.realstack import lora_adapter
from tests.ports import free_port
from tunewatch.settings import Settings, load_settings
from tunewatch.stack import engine_launch, prepare

ADAPTER = "bench-adapter"
ENGINE_START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Variant:
    """One engine configuration: engine settings changed, vLLM arguments appended."""

    name: str
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_args: tuple[str, ...] = ()


DEFAULTS = Variant("defaults")
VARIANTS = (
    Variant("rank-16", {"max_lora_rank": 16}),
    Variant("rank-64", {"max_lora_rank": 64}),
    Variant("loras-1", {"max_loras": 1}),
    Variant("loras-8", {"max_loras": 8}),
    Variant("cpu-loras-16", extra_args=("--max-cpu-loras", "16")),
    Variant("no-chunked-prefill", extra_args=("--no-enable-chunked-prefill",)),
    Variant("threads-0-1", {"cpu_threads": "0-1"}),
    Variant("kv-1g", {"cpu_kv_cache_gib": 1}),
    Variant("kv-8g", {"cpu_kv_cache_gib": 8}),
    Variant(
        "targets-qkv-o",
        extra_args=("--lora-target-modules", "qkv_proj", "o_proj"),
    ),
)


@dataclass
class Measured:
    """One variant's figures: its engine's start, memory, and the two paths at two loads."""

    variant: Variant
    start_s: float
    rss_gib: float
    results: list[Result]

    def side(self, path: str, concurrency: int) -> Result:
        return next(r for r in self.results if r.name == path and r.concurrency == concurrency)


# the engine


def variant_launch(
    settings: Settings, model_dir: Path, adapter: Path, variant: Variant
) -> EngineLaunch:
    """As `up` launches vLLM to load `adapter` at start, with the variant's changes."""
    engine = settings.engine.model_copy(update=variant.engine)
    launch = engine_launch(settings.model_copy(update={"engine": engine}), model_dir, [adapter])
    return dataclasses.replace(
        launch, port=free_port(), extra_args=[*launch.extra_args, *variant.extra_args]
    )


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its children (vLLM's API server, engine core)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_total(pid: int, figure: Callable[[psutil.Process], float]) -> float:
    """`figure` summed over a process and all its children (one gone meanwhile counts 0)."""
    total = 0.0
    for process in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += figure(process)
    return total


def tree_rss_gib(pid: int) -> float:
    """Resident memory of a process and all its children."""
    return tree_total(pid, lambda process: process.memory_info().rss) / (1 << 30)


@asynccontextmanager
async def running_engine(
    launch: EngineLaunch, log_file: Path
) -> AsyncIterator[tuple[str, float, int]]:
    """vLLM from `launch` until the block ends: its URL, the seconds it took to be healthy and
    its process id."""
    started = time.monotonic()
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            launch.command(),
            env=launch.environment(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{launch.port}"
    client = EngineClient(url)
    try:
        while not await client.healthy():
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited:\n{log_file.read_text()[-3000:]}")
            if time.monotonic() - started > ENGINE_START_TIMEOUT_S:
                raise RuntimeError(f"vLLM not healthy within {ENGINE_START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(1.0)
        yield url, time.monotonic() - started, process.pid
    finally:
        await client.aclose()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait)


@dataclass(frozen=True)
class RunningEngine:
    launch: EngineLaunch
    url: str
    start_s: float  # until it answered healthy
    pid: int


@asynccontextmanager
async def engine_with_adapter(
    settings: Settings, model_dir: Path, adapter: Path, variant: Variant, workdir: Path
) -> AsyncIterator[RunningEngine]:
    """The variant's vLLM with `adapter` loaded as ADAPTER, until the block ends."""
    launch = variant_launch(settings, model_dir, adapter, variant)
    console.print(f"[bold]{variant.name}[/bold]: {' '.join(launch.command()[3:])}")
    log_file = workdir / f"engine-{len(list(workdir.glob('engine-*.log')))}.log"
    async with running_engine(launch, log_file) as (url, start_s, pid):
        engine = EngineClient(url)
        await engine.load_adapter(ADAPTER, str(adapter))
        await engine.aclose()
        yield RunningEngine(launch, url, start_s, pid)


async def measure(
    settings: Settings,
    model_dir: Path,
    adapter: Path,
    variant: Variant,
    requests: int,
    workdir: Path,
) -> Measured:
    async with engine_with_adapter(settings, model_dir, adapter, variant, workdir) as engine:
        rss_gib = tree_rss_gib(engine.pid)
        stream = {"stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
        server = Server(engine.url)
        targets = (
            Target("adapter", server, {"model": ADAPTER, **stream}),
            Target("base", server, {"model": engine.launch.served_model_name, **stream}),
        )
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(timeout=300.0, limits=limits) as client:
            await warm_up(client, targets, 2, 1)
            results = await compare(client, targets, max(1, requests // 4), 1)
            results += await compare(client, targets, requests, 8)
    return Measured(variant, engine.start_s, rss_gib, results)


# report


def figures_table(measured: list[Measured]) -> Table:
    table = Table(title=f"engine settings: out tok/s and TTFT p50 ({MAX_TOKENS}-token answers)")
    table.add_column("variant", no_wrap=True)
    for column in ("start s", "RSS GiB"):
        table.add_column(column, justify="right")
    for path in ("adapter", "base"):
        for concurrency in (1, 8):
            table.add_column(f"{path} c={concurrency} tok/s", justify="right")
            table.add_column(f"{path} c={concurrency} TTFT ms", justify="right")
    for m in measured:
        cells = [m.variant.name, f"{m.start_s:.0f}", f"{m.rss_gib:.2f}"]
        for path in ("adapter", "base"):
            for concurrency in (1, 8):
                side = m.side(path, concurrency)
                cells += [f"{side.tokens_per_s:.1f}", f"{side.ttft_median_ms():.0f}"]
        table.add_row(*cells)
    return table


def ratios_table(measured: list[Measured]) -> Table:
    """Each variant against the first defaults run; and its own adapter / base."""
    baseline = measured[0]
    table = Table(title="ratios: variant / defaults (tok/s: higher is better; TTFT: lower)")
    table.add_column("variant", no_wrap=True)
    for path in ("adapter", "base"):
        for concurrency in (1, 8):
            table.add_column(f"{path} c={concurrency} tok/s", justify="right")
            table.add_column("TTFT", justify="right")
    for concurrency in (1, 8):
        table.add_column(f"adapter/base c={concurrency} tok/s", justify="right")
    for m in measured:
        cells = [m.variant.name]
        for path in ("adapter", "base"):
            for concurrency in (1, 8):
                side, base = m.side(path, concurrency), baseline.side(path, concurrency)
                cells.append(f"{side.tokens_per_s / base.tokens_per_s:.2f}")
                cells.append(f"{side.ttft_median_ms() / base.ttft_median_ms():.2f}")
        for concurrency in (1, 8):
            adapter, base = m.side("adapter", concurrency), m.side("base", concurrency)
            cells.append(f"{adapter.tokens_per_s / base.tokens_per_s:.2f}")
        table.add_row(*cells)
    return table


def parse_args() -> argparse.Namespace:
    names = [v.name for v in VARIANTS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", choices=names, default=names, metavar="NAME",
        help=f"which variants besides the defaults (default: all): {', '.join(names)}",
    )  # fmt: skip
    parser.add_argument(
        "--requests", type=positive_int, default=16,
        help="requests per path at concurrency 8 (a quarter of it at concurrency 1)",
    )  # fmt: skip
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    settings = load_settings()
    model_dir, _ = await asyncio.to_thread(prepare, settings)
    chosen = [v for v in VARIANTS if v.name in args.variants]
    console.print(
        f"{os.cpu_count()} CPUs; {len(chosen)} variants and the defaults twice; "
        f"{args.requests} requests a path at c=8, {max(1, args.requests // 4)} at c=1"
    )
    measured: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="tunewatch-bench-engine-") as workdir:
        root = Path(workdir)
        settings = settings.model_copy(update={"state_dir": root})  # the engines' fix markers
        adapter = await asyncio.to_thread(
            lora_adapter, model_dir, root / "adapter", 5, target_modules=DEFAULT_TARGET_MODULES
        )
        for variant in [DEFAULTS, *chosen, dataclasses.replace(DEFAULTS, name="defaults again")]:
            measured.append(
                await measure(settings, model_dir, adapter, variant, args.requests, root)
            )
            console.print(figures_table(measured[-1:]))  # as it comes: a long run may be cut
    console.print(figures_table(measured))
    console.print(ratios_table(measured))


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
