"""The `/v1/...` routes: inference (OpenAI's, behind the API keys) and feedback (behind the
API keys and the feedback keys: serving/auth.py); parse, then the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
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
    InferenceRequest,
    OpenAIError,
    json_body,
)


def header_user(request: Request) -> str | None:
    user = request.headers.get(USER_HEADER)
    if user is not None and len(user) > USER_MAX_CHARS:
        raise OpenAIError(
            400, f"{USER_HEADER} is longer than {USER_MAX_CHARS} characters", param=USER_HEADER
        )
    return user


async def unless_client_leaves(request: Request, answer: Coroutine[Any, Any, Response]) -> Response:
    """The answer, or, if the client hangs up first, the call cancelled: the gateway records it
    as cancelled, and the engine's request closes, so vLLM stops generating for it. Starlette
    cancels a stream whose client left, never a handler waiting for a whole answer."""
    answering = asyncio.ensure_future(answer)
    leaving = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not answering.done():
            answering.cancel()
    if not answering.done():
        await asyncio.wait({answering})  # recorded as cancelled as it unwinds
        return Response(status_code=499)  # nobody reads it
    return answering.result()


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (the body is read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def inference_router(gateway: Gateway, auth: Auth) -> APIRouter:
    router = APIRouter(prefix="/v1")
    limit = gateway.config.max_body_bytes

    async def answer(
        request: Request, endpoint: str, body: InferenceRequest, api_key_id: str | None
    ) -> Response:
        call = gateway.infer(endpoint, body, header_user(request), api_key_id)
        if body.stream:  # Starlette cancels the stream when its client leaves
            return await call
        return await unless_client_leaves(request, call)

    @router.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        api_key_id = auth.api_key(request)  # before the body is read
        body = parse(ChatCompletionRequest, await read_json(request, limit))
        return await answer(request, "chat.completions", body, api_key_id)

    @router.post("/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        api_key_id = auth.api_key(request)
        body = parse(CompletionRequest, await read_json(request, limit))
        return await answer(request, "completions", body, api_key_id)

    @router.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        auth.api_key(request)
        names = [gateway.config.served_model_name] + [a.name for a in gateway.adapter_infos()]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "tunewatch"} for n in names],
        }

    @router.post("/feedback", openapi_extra=json_body(FeedbackRequest))
    async def feedback(request: Request) -> FeedbackResponse:
        caller = auth.feedback(request)
        body = parse(FeedbackRequest, await read_json(request, limit))
        return await gateway.add_feedback(body, caller)

    return router
