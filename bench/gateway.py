"""What the tunewatch gateway costs on the request path. Prints figures; asserts nothing.

Two measurements in one run (benchmarks print; tests never time, see docs/design.md):

real      The same streamed chat completions sent straight to a running vLLM and through
          the gateway in front of it (recording on, SQLite store in a temp dir), at
          concurrency 1 and 8, on three roads: the engine's base model itself (as `tunewatch
          up` serves it once the engine's LoRA fix is confirmed), the identity adapter (the
          fallback), and a promoted adapter (a real rank-8 LoRA adapter on q/k/v/o_proj, as
          the trainer makes, loaded and made primary: every request takes the LoRA path).
          Each gateway side does the same engine work as its direct side: the direct
          requests name the base model or the adapter themselves and ask for the token
          logprobs the gateway always asks for. Every answer is exactly MAX_TOKENS long
          (temperature 0, ignore_eos). The six sides' rounds alternate (ABBA), so a machine
          that drifts favours none.
          Printed: output tokens/s and median time to first token, and their ratios
          (gateway / direct on each road; base model / identity adapter, direct).
          Targets, on each road: gateway p50 / direct p50 <= 1.05; gateway out tok/s /
          direct >= 0.9; gateway TTFT p50 / direct <= 1.10.

overhead  The gateway in front of an instant fake engine against a bare FastAPI + httpx
          pass-through proxy in front of the same fake engine, at concurrency 8. With an
          engine that costs nothing, what is left is the gateway's own work per request
          (validation, routing, metrics, recording). The fake engine, the server under
          test and the load generator are separate processes: on two cores, one event
          loop serving and loading itself would measure itself.
          Target: gateway rps / pass-through rps >= 0.9. Each server's own CPU time per
          request is printed too: on a machine shared with other work it is the steadier
          figure (throughput and latency there follow whoever else wants the cores).

    .venv/bin/python -m bench.gateway [--engine-url URL] [--requests N] [--skip-real]

The real part needs a vLLM already running at --engine-url (this starts none); it loads the
identity adapter there as `tunewatch serve` does, and the bench's adapter, and unloads what
it loaded afterwards. It measures speed only: it sends the base model's road to a vLLM
whose LoRA fix it does not check (two adapters leave a slot free on vLLM started as `up`
starts it, --max-loras 4, so none is read for the base rows).
Settings (cache dir, model) come from TUNEWATCH_* variables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # comes with peft and vLLM
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console
from rich.table import Table

from retrain.training.spec import DEFAULT_TARGET_MODULES
from serving.adapters import AdapterSet
from serving.app import create_app
from serving.engine import EngineClient
from serving.gateway import Gateway, GatewayConfig
from store import Store
from store.adapters import RoutingTable
from tests.integration.realstack import lora_adapter
from tests.ports import free_port
from tunewatch.settings import Settings, load_settings
from tunewatch.stack import build_gateway, prepare

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MAX_TOKENS = 16
ROUNDS = 4  # each comparison alternates its two sides over this many rounds (ABBA)
OVERHEAD_CONCURRENCY = 8
OVERHEAD_WARMUP = 200
STARTUP_TIMEOUT_S = 60.0
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain what a LoRA adapter is in one sentence.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What does HTTP stand for?",
    "Give one tip for writing clear code.",
)

console = Console(width=160)  # whole tables in a log file too, not cut at 80 columns


# figures


@dataclass
class Result:
    """Latencies, busy time and server CPU of one side of a comparison, over its rounds."""

    name: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)  # streamed requests only
    output_tokens: int = 0  # streamed requests only (their usage)
    wall_s: float = 0.0
    cpu_s: float | None = None  # the server process's CPU, where it runs in a process of its own

    def add(self, answers: Answers, wall_s: float, cpu_s: float | None) -> None:
        self.latencies += answers.latencies
        self.ttfts += answers.ttfts
        self.output_tokens += answers.output_tokens
        self.wall_s += wall_s
        if cpu_s is not None:
            self.cpu_s = (self.cpu_s or 0.0) + cpu_s

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def ttft_median_ms(self) -> float:
        return 1000 * statistics.median(self.ttfts)

    def ttft_quantile_ms(self, q: float) -> float:
        return nearest_rank_ms(self.ttfts, q)

    @property
    def cpu_ms_per_request(self) -> float | None:
        return None if self.cpu_s is None else 1000 * self.cpu_s / len(self.latencies)

    def quantile_ms(self, q: float) -> float:
        return nearest_rank_ms(self.latencies, q)


def nearest_rank_ms(seconds: list[float], q: float) -> float:
    """The nearest-rank quantile of `seconds`, in milliseconds."""
    ranked = sorted(seconds)
    return 1000 * ranked[max(0, math.ceil(q * len(ranked)) - 1)]


@dataclass(frozen=True)
class Server:
    """An HTTP server under test: its base URL and, when it runs in a child, its process id."""

    url: str
    pid: int | None = None

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used so far (user + system, every thread)."""
        if self.pid is None:
            return None
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system


@dataclass(frozen=True)
class Target:
    """One side of a comparison: the server its requests go to and what only it puts in them."""

    name: str
    server: Server
    fields: dict[str, Any]

    @property
    def url(self) -> str:
        return self.server.url + CHAT_PATH

    def bodies(self, start: int, count: int) -> list[dict[str, Any]]:
        """`count` chat requests, the same prompts for every target given the same `start`."""
        return [
            {
                "messages": [{"role": "user", "content": PROMPTS[(start + i) % len(PROMPTS)]}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                **self.fields,
            }
            for i in range(count)
        ]


# load generation


@dataclass
class Answers:
    """What one batch of requests measured: latencies; for streams, first tokens and usage."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    output_tokens: int = 0


async def fire(
    client: httpx.AsyncClient, target: Target, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[Answers, float]:
    """Send every body with `concurrency` workers; what they measured and the wall time taken."""
    answers = Answers()
    pending = iter(bodies)

    async def worker() -> None:
        for body in pending:
            started = time.perf_counter()
            if body.get("stream"):
                await read_stream(client, target.url, body, started, answers)
            else:
                response = await client.post(target.url, json=body)
                response.raise_for_status()
            answers.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers, time.perf_counter() - started


async def read_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], started: float, answers: Answers
) -> None:
    """Read one streamed answer to its end: its first token's time and its usage."""
    first: float | None = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                answers.output_tokens += chunk["usage"]["completion_tokens"]
    if first is None:
        raise RuntimeError(f"{url} streamed no token")
    answers.ttfts.append(first)


async def compare(
    client: httpx.AsyncClient, targets: tuple[Target, ...], requests: int, concurrency: int
) -> list[Result]:
    """`requests` per target in up to ROUNDS rounds, A-B-.. then ..-B-A, so drift cancels out.

    A round holds at least `concurrency` requests, or it would never reach that concurrency.
    """
    results = {t.name: Result(t.name, concurrency) for t in targets}
    counts = split(requests, max(1, min(ROUNDS, requests // concurrency)))
    start = 0
    for round_index, count in enumerate(counts):
        console.print(f"  [dim]c={concurrency}: round {round_index + 1}/{len(counts)}[/dim]")
        for target in targets if round_index % 2 == 0 else targets[::-1]:
            cpu_before = target.server.cpu_s()
            answers, wall_s = await fire(client, target, target.bodies(start, count), concurrency)
            cpu_after = target.server.cpu_s()
            cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            results[target.name].add(answers, wall_s, cpu_s)
        start += count
    return list(results.values())


async def warm_up(
    client: httpx.AsyncClient, targets: tuple[Target, ...], requests: int, concurrency: int
) -> None:
    for target in targets:
        await fire(client, target, target.bodies(0, requests), concurrency)


def split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares, without empty ones."""
    share, extra = divmod(total, parts)
    return [n for n in (share + (i < extra) for i in range(parts)) if n > 0]


# servers


async def wait_until_up(url: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline and alive():
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {STARTUP_TIMEOUT_S:.0f} s")


def _serve_child(port: int, make_app: Callable[..., Any], *args: Any) -> None:
    """A child process's whole life: build the app there and serve it until SIGTERM.

    The stdlib event loop, as under `tunewatch serve` (uvicorn inside `asyncio.run`).
    """
    uvicorn.run(make_app(*args), host=HOST, port=port, log_config=None, loop="asyncio")


@asynccontextmanager
async def served_in_child(make_app: Callable[..., Any], *args: Any) -> AsyncIterator[Server]:
    """Serve `make_app(*args)` from a fresh process until the block ends, then stop it cleanly."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_child, args=(port, make_app, *args), daemon=True
    )
    process.start()
    base_url = f"http://{HOST}:{port}"
    try:
        await wait_until_up(f"{base_url}/healthz", process.is_alive)
        yield Server(base_url, process.pid)
    finally:
        process.terminate()  # SIGTERM: uvicorn shuts down, the gateway drains its recorder
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join)


@asynccontextmanager
async def served_in_process(app: FastAPI) -> AsyncIterator[Server]:
    """Serve `app` on this event loop until the block ends, then run its shutdown."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    base_url = f"http://{HOST}:{port}"
    try:
        await wait_until_up(f"{base_url}/healthz", lambda: not task.done())
        yield Server(base_url)
    finally:
        server.should_exit = True
        await task


# the apps of the overhead part (built inside their child processes)


def _fake_completion() -> bytes:
    tokens = [f" word{i}" for i in range(MAX_TOKENS)]
    logprobs = [{"token": t, "logprob": -0.25, "bytes": list(t.encode())} for t in tokens]
    usage = {"prompt_tokens": 12, "completion_tokens": MAX_TOKENS, "total_tokens": 12 + MAX_TOKENS}
    return json.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "logprobs": {"content": [{**lp, "top_logprobs": []} for lp in logprobs]},
                    "finish_reason": "length",
                }
            ],
            "usage": usage,
        }
    ).encode()


FAKE_COMPLETION = _fake_completion()
FAKE_MODELS = b'{"object": "list", "data": []}'


async def _fake_engine(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Raw ASGI: any POST gets the fixed completion at once, any GET an empty model list."""
    if scope["type"] != "http":
        return  # no lifespan to run
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    body = FAKE_COMPLETION if scope["method"] == "POST" else FAKE_MODELS
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def fake_engine_app() -> Any:
    return _fake_engine


def pass_through_app(engine_url: str) -> FastAPI:
    """The least a proxy can do: forward the body, return the engine's JSON."""
    upstream = httpx.AsyncClient(
        base_url=engine_url,
        timeout=30.0,
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),  # as EngineClient
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> JSONResponse:
        answer = await upstream.post(
            CHAT_PATH, content=await request.body(), headers={"content-type": "application/json"}
        )
        return JSONResponse(answer.json(), status_code=answer.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def fake_gateway_app(engine_url: str, database: Path) -> FastAPI:
    """The real gateway, recording to SQLite, with the base model as primary."""
    store = Store(f"sqlite:///{database}")
    engine = EngineClient(engine_url)
    adapters = AdapterSet(store, engine, base_adapter="base-identity-fake")
    config = GatewayConfig(
        served_model_name="bench",
        admin_token=secrets.token_urlsafe(16),
        spill_file=database.with_name("spill.jsonl"),
    )
    return create_app(Gateway(config, store, engine, adapters))


# the two parts


async def overhead_part(requests: int, workdir: Path) -> list[Result]:
    database = workdir / "overhead.db"
    console.print(f"[bold]overhead[/bold]: {requests} requests per side, c={OVERHEAD_CONCURRENCY}")
    async with (
        served_in_child(fake_engine_app) as engine,
        served_in_child(fake_gateway_app, engine.url, database) as gateway,
        served_in_child(pass_through_app, engine.url) as proxy,
        httpx.AsyncClient(timeout=30.0) as client,
    ):
        targets = (
            Target("gateway", gateway, {"model": "bench"}),
            Target("pass-through", proxy, {"model": "bench"}),
        )
        await warm_up(client, targets, OVERHEAD_WARMUP, OVERHEAD_CONCURRENCY)
        results = await compare(client, targets, requests, OVERHEAD_CONCURRENCY)
    store = Store(f"sqlite:///{database}")
    recorded = store.count_exchanges()
    store.close()
    console.print(f"  gateway recorded {recorded} of {requests + OVERHEAD_WARMUP} exchanges")
    return results


def bench_settings(state_dir: Path) -> Settings:
    """The user's settings, with state (admin token, SQLite store) in a throwaway directory."""
    return load_settings().model_copy(update={"state_dir": state_dir, "database_url": None})


async def engine_is_up(engine_url: str) -> bool:
    probe = EngineClient(engine_url)
    try:
        return await probe.healthy()
    finally:
        await probe.aclose()


async def real_part(engine_url: str, requests: int, workdir: Path) -> list[Result]:
    """Build three gateways as `tunewatch up` and `tunewatch serve` do (the base model served
    directly; through the identity adapter; an adapter promoted to primary), load the
    identity adapter and the bench's adapter, measure, clean up."""
    settings = bench_settings(workdir)
    model_dir, identity_dir = await asyncio.to_thread(prepare, settings)
    tuned_dir = await asyncio.to_thread(
        lora_adapter, model_dir, workdir / "adapters" / "tuned", 5,
        target_modules=DEFAULT_TARGET_MODULES,
    )  # fmt: skip
    served_name = settings.engine.served_model_name

    def gateway(name: str) -> Gateway:  # a store each: the promoted one's routing is its own
        return build_gateway(bench_settings(workdir / name), engine_url, identity_dir)

    direct, through_identity, promoted = gateway("direct"), gateway("identity"), gateway("promoted")
    direct.adapters.serve_base_through(served_name)
    gateways = (direct, through_identity, promoted)
    identity = through_identity.adapters.base_adapter
    try:
        loaded_before = set(await through_identity.engine.model_ids())
        await through_identity.adapters.load(
            identity, str(identity_dir), reason="identity adapter (bench)"
        )
        await promoted.adapters.load(TUNED, str(tuned_dir), reason="adapter (bench)")
        await promoted.adapters.set_routing(RoutingTable(primary=TUNED), "adapter (bench)")
        try:
            return await measure_real(gateways, served_name, requests)
        finally:
            for name in {identity, TUNED} - loaded_before:  # leave the engine as we found it
                await through_identity.engine.unload_adapter(name)
    finally:
        for gateway in gateways:
            await gateway.engine.aclose()
            gateway.store.close()


async def measure_real(
    gateways: tuple[Gateway, Gateway, Gateway], served_name: str, requests: int
) -> list[Result]:
    """vLLM vs gateway on the three roads, at concurrency 1 (a quarter of `requests`) and 8
    (`requests`). `gateways`: the base model served directly, through the identity adapter,
    an adapter promoted.

    The gateways serve from this process's event loop: next to seconds of generation per
    request, the load generator's share of it is noise.
    """
    direct, through_identity, promoted = gateways
    engine_url, identity = direct.engine.base_url, through_identity.adapters.base_adapter
    single = max(1, requests // 4)
    console.print(
        f"[bold]real[/bold]: vLLM at {engine_url}, base model {served_name!r}, identity "
        f"adapter {identity}, adapter {TUNED}; {single} requests per side at concurrency 1, "
        f"{requests} at 8"
    )
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    async with (
        served_in_process(create_app(direct)) as direct_server,
        served_in_process(create_app(through_identity)) as identity_server,
        served_in_process(create_app(promoted)) as promoted_server,
        httpx.AsyncClient(timeout=300.0, limits=httpx.Limits(max_connections=16)) as client,
    ):
        vllm = Server(engine_url)
        targets = (
            Target(BASE_VLLM, vllm, {"model": served_name, "logprobs": True, **stream}),
            Target(BASE_GATEWAY, direct_server, {"model": served_name, **stream}),
            Target(IDENTITY_VLLM, vllm, {"model": identity, "logprobs": True, **stream}),
            Target(IDENTITY_GATEWAY, identity_server, {"model": served_name, **stream}),
            Target(ADAPTER_VLLM, vllm, {"model": TUNED, "logprobs": True, **stream}),
            Target(ADAPTER_GATEWAY, promoted_server, {"model": served_name, **stream}),
        )
        await warm_up(client, targets, 2, 1)
        results = await compare(client, targets, single, 1)
        results += await compare(client, targets, requests, 8)
    console.print(f"  gateways recorded {direct.store.count_exchanges()} exchanges")
    return results


# report

BASE_VLLM, BASE_GATEWAY = "vLLM, base model", "gateway, base model"
IDENTITY_VLLM, IDENTITY_GATEWAY = "vLLM, identity adapter", "gateway, identity adapter"
ADAPTER_VLLM, ADAPTER_GATEWAY = "vLLM, adapter", "gateway, adapter promoted"
TUNED = "bench-tuned"  # the bench's adapter, on the engine and in the gateways' store


def figures_table(title: str, results: list[Result]) -> Table:
    """One row per side; CPU ms/req is the server process's own CPU ("-": not measured)."""
    table = Table(title=title)
    table.add_column("side", no_wrap=True)
    columns = ("conc.", "requests", "req/s", "out tok/s", "TTFT p50 ms", "p50 ms", "p99 ms")
    for column in (*columns, "CPU ms/req"):
        table.add_column(column, justify="right")
    for r in results:
        cpu = "-" if r.cpu_ms_per_request is None else f"{r.cpu_ms_per_request:.2f}"
        streamed = bool(r.ttfts)
        table.add_row(
            r.name,
            str(r.concurrency),
            str(len(r.latencies)),
            f"{r.rps:.2f}",
            f"{r.tokens_per_s:.1f}" if streamed else "-",
            f"{r.ttft_median_ms():.1f}" if streamed else "-",
            f"{r.quantile_ms(0.5):.1f}",
            f"{r.quantile_ms(0.99):.1f}",
            cpu,
        )
    return table


def ratios_table(real: list[Result], overhead: list[Result]) -> Table:
    table = Table(title="ratios")
    for column in ("ratio", "value", "target", "verdict"):
        table.add_column(column, justify="left" if column in ("ratio", "verdict") else "right")

    def row(label: str, value: float, target: str, meets: bool | None) -> None:
        verdict = {None: "", True: "[green]meets[/green]", False: "[red]misses[/red]"}[meets]
        table.add_row(label, f"{value:.3f}", target, verdict)

    for concurrency in sorted({r.concurrency for r in real}):
        side = {r.name: r for r in real if r.concurrency == concurrency}
        for road, (direct, gateway) in {
            "base model": (side[BASE_VLLM], side[BASE_GATEWAY]),
            "identity": (side[IDENTITY_VLLM], side[IDENTITY_GATEWAY]),
            "adapter": (side[ADAPTER_VLLM], side[ADAPTER_GATEWAY]),
        }.items():
            at = f"{road}, c={concurrency}"
            p50 = gateway.quantile_ms(0.5) / direct.quantile_ms(0.5)
            row(f"gateway p50 / direct p50, {at}", p50, "<= 1.05", p50 <= 1.05)
            tokens = gateway.tokens_per_s / direct.tokens_per_s
            row(f"gateway out tok/s / direct out tok/s, {at}", tokens, ">= 0.9", tokens >= 0.9)
            ttft = gateway.ttft_median_ms() / direct.ttft_median_ms()
            row(f"gateway TTFT p50 / direct TTFT p50, {at}", ttft, "<= 1.10", ttft <= 1.10)
        base, identity = side[BASE_VLLM], side[IDENTITY_VLLM]
        at = f"vLLM, c={concurrency}"
        row(
            f"base out tok/s / identity out tok/s, {at}",
            base.tokens_per_s / identity.tokens_per_s,
            "",
            None,
        )
        row(
            f"base TTFT p50 / identity TTFT p50, {at}",
            base.ttft_median_ms() / identity.ttft_median_ms(),
            "",
            None,
        )
    if overhead:
        gateway, proxy = overhead
        rps = gateway.rps / proxy.rps
        row("gateway req/s / pass-through req/s", rps, ">= 0.9", rps >= 0.9)
        p50 = gateway.quantile_ms(0.5) / proxy.quantile_ms(0.5)
        row("gateway p50 / pass-through p50", p50, "", None)
        if gateway.cpu_ms_per_request is not None and proxy.cpu_ms_per_request is not None:
            cpu = gateway.cpu_ms_per_request / proxy.cpu_ms_per_request
            row("gateway CPU/req / pass-through CPU/req", cpu, "", None)
    return table


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-url", default="http://127.0.0.1:8100", help="a running vLLM")
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=64,
        help="real part: requests per side at concurrency 8 (a quarter of it at concurrency 1)",
    )
    parser.add_argument(
        "--overhead-requests",
        type=positive_int,
        default=2000,
        help="overhead part: requests per side",
    )
    parser.add_argument("--skip-real", action="store_true", help="run the overhead part only")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    console.print(f"{os.cpu_count()} CPUs; answers of {MAX_TOKENS} tokens; rounds alternate ABBA")
    with tempfile.TemporaryDirectory(prefix="tunewatch-bench-") as workdir:
        real: list[Result] = []
        if not args.skip_real:
            if not await engine_is_up(args.engine_url):
                raise SystemExit(f"no vLLM at {args.engine_url}: start one, or pass --skip-real")
            real = await real_part(args.engine_url, args.requests, Path(workdir) / "real")
        overhead = await overhead_part(args.overhead_requests, Path(workdir))
    if real:
        console.print(figures_table("real: direct vLLM vs gateway (recording on)", real))
    console.print(figures_table("overhead: instant fake engine", overhead))
    console.print(ratios_table(real, overhead))


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
