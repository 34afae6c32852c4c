"""The gateway's FastAPI app: lifespan (recorder, reconcile loop), auth, probes, and the routes
(serving/inference.py behind the API keys, serving/admin.py and the packages' admin routers
behind the admin token). Errors leave in OpenAI's shape (serving/errors.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.admin import admin_router
from serving.errors import install_handlers
from serving.gateway import Gateway
from serving.inference import inference_router
from serving.protocol import OpenAIError


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _accepted(token: str | None, secrets_: list[bytes]) -> bool:
    """Whether `token` is one of `secrets_`, in time that does not depend on where they differ.

    Bytes, not str: `compare_digest` refuses non-ASCII str (a 500); every secret is compared,
    so the time does not tell which one came close either. An empty token never passes."""
    if not token:
        return False
    given = token.encode()
    return sum(secrets.compare_digest(given, secret) for secret in secrets_) > 0


def create_app(
    gateway: Gateway,
    lifespan_hooks: list[Callable[[], Awaitable[Any]]] | None = None,
    admin_routers: list[APIRouter] | None = None,
) -> FastAPI:
    """The FastAPI app around one Gateway. `lifespan_hooks` start extra background work;
    `admin_routers` add admin endpoints (behind the admin token) from the packages above."""
    config = gateway.config
    api_keys = [key.encode() for key in config.api_keys]  # encoded once, not per request
    admin_token = [config.admin_token.encode()]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gateway.recorder.start()
        await gateway.adapters.reconcile()
        tasks = [asyncio.create_task(gateway.reconcile_forever())]
        tasks += [asyncio.create_task(hook()) for hook in lifespan_hooks or []]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gateway.shutdown()

    app = FastAPI(title="tunewatch gateway", lifespan=lifespan)
    app.state.gateway = gateway

    install_handlers(app)

    # async: no I/O here, and a sync dependency would cost a worker-thread hop per request.
    async def require_api_key(request: Request) -> None:
        if api_keys and not _accepted(_bearer(request), api_keys):
            raise OpenAIError(
                401,
                "Missing or invalid API key.",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def require_admin(request: Request) -> None:
        if not _accepted(_bearer(request), admin_token):
            raise OpenAIError(
                401,
                "Admin API needs 'Authorization: Bearer <admin token>'.",
                type="authentication_error",
                code="invalid_admin_token",
            )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = await gateway.adapters.ready()
        return JSONResponse(
            {"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(inference_router(gateway), dependencies=[Depends(require_api_key)])
    admin = [Depends(require_admin)]
    for router in [admin_router(gateway), *(admin_routers or [])]:
        app.include_router(router, dependencies=admin)
    return app
