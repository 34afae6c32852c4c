"""Assembles the running parts from the settings: store, engine, adapters, gateway, HTTP server.

The composition root: the only place that knows every package. `up` supervises a vLLM
child process; `serve` fronts a vLLM server someone else runs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from pythonjsonlogger.json import JsonFormatter

from serving.adapters import AdapterSet
from serving.engine import EngineClient, EngineLaunch, EngineProcess, adapter_fingerprint
from serving.gateway import Gateway, GatewayConfig, create_app
from serving.model import ensure_identity_adapter, prepare_model
from serving.store import Store
from tunewatch.settings import Settings

log = logging.getLogger("tunewatch")


def configure_logging(level: str) -> None:
    """One JSON object per line on stderr, ours and uvicorn's alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise


def admin_token(settings: Settings) -> str:
    """The configured admin token, or one generated once and kept (mode 0600) in the state dir."""
    if settings.gateway.admin_token is not None:
        return settings.gateway.admin_token.get_secret_value()
    token_file = settings.state_dir / "admin-token"
    if not token_file.is_file():
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
    return token_file.read_text().strip()


def prepare(settings: Settings) -> tuple[Path, Path]:
    """The model directory and its identity adapter, converted and created on first use."""
    model_dir = prepare_model(settings.cache_dir, settings.engine.model)
    identity = ensure_identity_adapter(
        model_dir, settings.cache_dir / "adapters" / f"{model_dir.name}-identity"
    )
    return model_dir, identity


def build_gateway(settings: Settings, engine_url: str, identity_dir: Path) -> Gateway:
    store = Store(settings.store_url)
    engine = EngineClient(engine_url, request_timeout_s=settings.engine.request_timeout_s)
    base_adapter = f"base-identity-{adapter_fingerprint(identity_dir)[:8]}"
    config = GatewayConfig(
        served_model_name=settings.engine.served_model_name,
        admin_token=admin_token(settings),
        api_keys=[key.get_secret_value() for key in settings.gateway.api_keys],
        max_body_bytes=settings.gateway.max_body_bytes,
        reconcile_interval_s=settings.gateway.reconcile_interval_s,
    )
    return Gateway(config, store, engine, AdapterSet(store, engine, base_adapter))


async def _serve_http(
    settings: Settings, gateway: Gateway, identity_dir: Path,
    hooks: list[Callable[[], Awaitable[Any]]],
) -> None:  # fmt: skip
    base = gateway.adapters.base_adapter
    await gateway.adapters.load(base, str(identity_dir), reason="identity adapter of the base")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gateway, lifespan_hooks=hooks),
            host=settings.gateway.host,
            port=settings.gateway.port,
            log_config=None,
            timeout_graceful_shutdown=30,
        )
    )
    log.info(
        "gateway listening",
        extra={"url": f"http://{settings.gateway.host}:{settings.gateway.port}/v1",
               "model": settings.engine.served_model_name},
    )  # fmt: skip
    await server.serve()


async def up(settings: Settings) -> None:
    """Engine as a supervised child process, plus the gateway in front of it."""
    model_dir, identity_dir = await asyncio.to_thread(prepare, settings)
    engine_url = f"http://127.0.0.1:{settings.engine.port}"
    gateway = build_gateway(settings, engine_url, identity_dir)

    async def on_restart(reason: str) -> None:
        await asyncio.to_thread(gateway.store.record_event, "engine.restarted", reason)
        await gateway.adapters.reconcile()

    launch = EngineLaunch(
        model=str(model_dir),
        served_model_name=settings.engine.served_model_name,
        port=settings.engine.port,
        cache_dir=settings.cache_dir,
        device=settings.engine.device,
        max_loras=settings.engine.max_loras,
        max_lora_rank=settings.engine.max_lora_rank,
        max_model_len=settings.engine.max_model_len,
        cpu_kv_cache_gib=settings.engine.cpu_kv_cache_gib,
        cpu_threads=settings.engine.cpu_threads,
        extra_args=settings.engine.extra_args,
    )
    engine = EngineProcess(
        launch, gateway.engine, settings.state_dir / "engine.log",
        on_restart=on_restart, startup_timeout_s=settings.engine.startup_timeout_s,
    )  # fmt: skip
    log.info("starting vLLM (about a minute on CPU)", extra={"log": str(engine.log_file)})
    await engine.start()
    try:
        await _serve_http(settings, gateway, identity_dir, hooks=[engine.supervise])
    finally:
        await engine.stop()


async def serve(settings: Settings, engine_url: str) -> None:
    """The gateway alone, in front of a vLLM server that runs elsewhere."""
    _, identity_dir = await asyncio.to_thread(prepare, settings)
    gateway = build_gateway(settings, engine_url, identity_dir)
    await _serve_http(settings, gateway, identity_dir, hooks=[])
