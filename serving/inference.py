"""The inference routes (OpenAI's `/v1/...`, behind the API keys): parse, then the gateway."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from serving.errors import parse, read_json
from serving.gateway import USER_HEADER, Gateway
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
)


def inference_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(prefix="/v1")
    limit = gateway.config.max_body_bytes

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatCompletionRequest, await read_json(request, limit))
        return await gateway.infer("chat.completions", body, request.headers.get(USER_HEADER))

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await read_json(request, limit))
        return await gateway.infer("completions", body, request.headers.get(USER_HEADER))

    @router.get("/models")
    async def models() -> dict[str, Any]:
        names = [gateway.config.served_model_name] + [a.name for a in gateway.adapter_infos()]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "tunewatch"} for n in names],
        }

    @router.post("/feedback")
    async def feedback(request: Request) -> FeedbackResponse:
        body = parse(FeedbackRequest, await read_json(request, limit))
        return await gateway.add_feedback(body)

    return router
