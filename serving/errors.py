"""Every way a request fails, in OpenAI's error shape: a body too large, too deep or not
JSON, invalid fields (naming the first), the engine unavailable (one 503 with Retry-After),
and the app's exception handlers for what FastAPI and Starlette raise themselves."""

from __future__ import annotations

import json
import logging
from itertools import chain
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import OpenAIError

log = logging.getLogger(__name__)


MAX_JSON_DEPTH = 64  # OpenAI's bodies nest 5 or 6 deep; Python's reader fails near 1000


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body is larger than {limit} bytes.", code="body_too_large")


def _not_json(reason: str) -> OpenAIError:
    return OpenAIError(400, f"Request body is not valid JSON: {reason}", code="invalid_json")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: refused at `limit` bytes as it arrives (a chunked upload declares no
    length, and is never held whole past the limit), and refused if nested more than
    `MAX_JSON_DEPTH` deep or holding NaN or Infinity (JSON has neither)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:  # a decode error, bad UTF-8, NaN or Infinity
        raise _not_json(str(exc)) from None
    except RecursionError:
        raise _not_json(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    # Fewer brackets than the limit cannot nest past it: most bodies skip the walk.
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise _not_json(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` arrays and objects, level by level (no
    recursion, so no depth can make it fail)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        children = chain.from_iterable(v.values() if isinstance(v, dict) else v for v in level)
        level = [child for child in children if isinstance(child, dict | list)]
        if not level:
            return False
    return bool(level)


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
