"""The gateway's own admin routes (`/admin/adapters`, `/admin/routing`, behind the admin token);
the packages above mount theirs beside them (`create_app(admin_routers=...)`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from serving.adapters import AdapterInUseError, AdapterPathError, within_roots
from serving.engine import EngineUnavailableError, InvalidAdapterError
from serving.errors import engine_unavailable, parse, read_json
from serving.gateway import Gateway
from serving.protocol import AdapterInfo, AdapterLoadRequest, OpenAIError, json_body
from store.adapters import AdapterNameTakenError, RoutingTable


def admin_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(prefix="/admin")
    limit = gateway.config.max_body_bytes

    @router.get("/adapters")
    async def list_adapters() -> list[AdapterInfo]:
        return gateway.adapter_infos()

    @router.post("/adapters", status_code=201, openapi_extra=json_body(AdapterLoadRequest))
    async def load_adapter(request: Request) -> AdapterInfo:
        body = parse(AdapterLoadRequest, await read_json(request, limit))
        if body.name in (gateway.config.served_model_name, gateway.adapters.base_adapter):
            raise OpenAIError(
                409, f"'{body.name}' is reserved.", param="name", code="name_reserved"
            )
        try:
            path = await asyncio.to_thread(within_roots, body.path, gateway.config.adapter_roots)
            await gateway.adapters.load(body.name, str(path), reason="loaded through the admin API")
        except AdapterPathError as exc:
            raise OpenAIError(
                400, str(exc), param="path", code="adapter_path_not_allowed"
            ) from None
        except InvalidAdapterError as exc:
            raise OpenAIError(400, str(exc), param="path", code="invalid_adapter") from None
        except AdapterNameTakenError:
            raise OpenAIError(
                409,
                f"Adapter name '{body.name}' is taken by other weights; "
                "give every version its own name (e.g. name-v2).",
                param="name",
                code="adapter_name_taken",
            ) from None
        except EngineUnavailableError:
            raise engine_unavailable(gateway.config.retry_after_s) from None
        return next(a for a in gateway.adapter_infos() if a.name == body.name)

    @router.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        if not gateway.adapters.is_registered(name) or name == gateway.adapters.base_adapter:
            raise OpenAIError(404, f"No adapter '{name}' is loaded.", code="adapter_not_found")
        try:
            await gateway.adapters.unload(name, reason="unloaded through the admin API")
        except AdapterInUseError as exc:
            raise OpenAIError(409, str(exc), code="adapter_in_use") from None
        except EngineUnavailableError:
            raise engine_unavailable(gateway.config.retry_after_s) from None
        return {"name": name, "unloaded": True}

    @router.get("/routing")
    async def get_routing() -> RoutingTable:
        return gateway.adapters.routing

    @router.put("/routing", openapi_extra=json_body(RoutingTable))
    async def set_routing(request: Request) -> RoutingTable:
        table = parse(RoutingTable, await read_json(request, limit))
        try:
            await gateway.adapters.set_routing(table, reason="set through the admin API")
        except KeyError as exc:
            raise OpenAIError(
                400, f"Unknown adapters in routing table: {exc.args[0]}.", code="adapter_not_found"
            ) from None
        return table

    return router
