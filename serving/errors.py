"""Every way a request fails, in OpenAI's error shape: a body too large or not JSON, invalid
fields (naming the first), the engine unavailable (one 503 with Retry-After), and the app's
exception handlers for what FastAPI and Starlette raise themselves."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import OpenAIError

log = logging.getLogger(__name__)


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"Request body is larger than {limit} bytes.", code="body_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise OpenAIError(413, f"Request body is larger than {limit} bytes.", code="body_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(
            400, f"Request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


def parse(model: type[Any], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def validation_error(errors: Any) -> OpenAIError:
    first = errors[0]
    location = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(location) or None
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
    )
    return OpenAIError(400, messages, param=param, code="invalid_value")


def engine_unavailable(retry_after_s: int, headers: dict[str, str] | None = None) -> OpenAIError:
    """The 503 for an engine that is down or restarting (EngineUnavailableError): the client
    retries after `Retry-After`."""
    return OpenAIError(
        503,
        "The inference engine is unavailable (starting or restarting); retry shortly.",
        type="service_unavailable",
        code="engine_unavailable",
        headers={"Retry-After": str(retry_after_s), **(headers or {})},
    )


def install_handlers(app: FastAPI) -> None:
    """Errors raised anywhere in the app leave in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = OpenAIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = OpenAIError(500, "Internal error in the gateway.", type="server_error")
        return JSONResponse(error.body(), status_code=500)
