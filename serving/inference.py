"""The `/v1/...` routes: inference (OpenAI's, behind the API keys) and feedback (behind the
API keys and the feedback keys: serving/auth.py); parse, then the gateway."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from serving.auth import Auth
from serving.errors import parse, read_json
from serving.gateway import USER_HEADER, Gateway
from serving.protocol import (
    USER_MAX_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    OpenAIError,
)


def header_user(request: Request) -> str | None:
    user = request.headers.get(USER_HEADER)
    if user is not None and len(user) > USER_MAX_CHARS:
        raise OpenAIError(
            400, f"{USER_HEADER} is longer than {USER_MAX_CHARS} characters", param=USER_HEADER
        )
    return user


def inference_router(gateway: Gateway, auth: Auth) -> APIRouter:
    router = APIRouter(prefix="/v1")
    limit = gateway.config.max_body_bytes

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        api_key_id = auth.api_key(request)  # before the body is read
        body = parse(ChatCompletionRequest, await read_json(request, limit))
        return await gateway.infer("chat.completions", body, header_user(request), api_key_id)

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        api_key_id = auth.api_key(request)
        body = parse(CompletionRequest, await read_json(request, limit))
        return await gateway.infer("completions", body, header_user(request), api_key_id)

    @router.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        auth.api_key(request)
        names = [gateway.config.served_model_name] + [a.name for a in gateway.adapter_infos()]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "tunewatch"} for n in names],
        }

    @router.post("/feedback")
    async def feedback(request: Request) -> FeedbackResponse:
        caller = auth.feedback(request)
        body = parse(FeedbackRequest, await read_json(request, limit))
        return await gateway.add_feedback(body, caller)

    return router
