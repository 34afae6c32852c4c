"""The gateway's FastAPI app: lifespan (recorder, reconcile loop), probes, and the routes
(serving/inference.py behind the API keys, serving/admin.py and the packages' admin routers
behind the admin token: serving/auth.py). Errors leave in OpenAI's shape (serving/errors.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.admin import admin_router
from serving.auth import Auth
from serving.errors import install_handlers
from serving.gateway import Gateway
from serving.inference import inference_router


def create_app(
    gateway: Gateway,
    lifespan_hooks: list[Callable[[], Awaitable[Any]]] | None = None,
    admin_routers: list[APIRouter] | None = None,
) -> FastAPI:
    """The FastAPI app around one Gateway. `lifespan_hooks` start extra background work;
    `admin_routers` add admin endpoints (behind the admin token) from the packages above."""
    config = gateway.config
    auth = Auth(config.admin_token, config.api_keys, config.feedback_keys)

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

    app.include_router(inference_router(gateway, auth))
    admin = [Depends(auth.admin)]
    for router in [admin_router(gateway), *(admin_routers or [])]:
        app.include_router(router, dependencies=admin)
    return app
