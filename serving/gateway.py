"""The OpenAI-compatible gateway: parse, route, pass through to vLLM, record, measure.

Handlers only parse, route and answer. Talking to vLLM is `EngineClient`; recording is
`ExchangeRecorder.submit`; keeping adapters and routing in step is `AdapterSet`.
Every error leaves in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import metrics
from serving.adapters import AdapterInUseError, AdapterSet
from serving.engine import EngineClient, EngineUnavailableError, InvalidAdapterError
from serving.exchange import ExchangeDraft, answer_whole
from serving.protocol import (
    AdapterInfo,
    AdapterLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    InferenceRequest,
    OpenAIError,
)
from serving.recorder import ExchangeRecorder
from serving.routing import RouteChoice, choose_route
from store import Store
from store.adapters import AdapterNameTakenError, RoutingTable
from store.exchanges import UnknownExchangeError

log = logging.getLogger(__name__)

EXCHANGE_HEADER = "x-tunewatch-exchange-id"
ADAPTER_HEADER = "x-tunewatch-adapter"
ROUTE_HEADER = "x-tunewatch-route"
USER_HEADER = "x-tunewatch-user"


@dataclass
class GatewayConfig:
    served_model_name: str
    admin_token: str
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    reconcile_interval_s: float = 5.0
    retry_after_s: int = 5


class Gateway:
    """The gateway's state: engine client, adapters and routing, recorder, config."""

    def __init__(
        self,
        config: GatewayConfig,
        store: Store,
        engine: EngineClient,
        adapters: AdapterSet,
        rng: random.Random | None = None,
    ) -> None:
        self.config, self.store, self.engine, self.adapters = config, store, engine, adapters
        self.recorder = ExchangeRecorder(store)
        self.rng = rng or random.Random()
        self._background: set[asyncio.Task[Any]] = set()

    # routing

    def route(self, request: InferenceRequest, header_user: str | None) -> RouteChoice:
        """The served model name follows the routing table; an adapter's own name pins it."""
        if request.model == self.config.served_model_name:
            return choose_route(self.adapters.routing, request.user or header_user, self.rng)
        if (
            self.adapters.is_registered(request.model)
            and request.model != self.adapters.base_adapter
        ):
            return RouteChoice("pinned", request.model, None)
        raise OpenAIError(
            404,
            f"The model '{request.model}' does not exist. Use '{self.config.served_model_name}' "
            "or the name of a loaded adapter.",
            param="model",
            code="model_not_found",
        )

    # the inference path

    async def infer(
        self, endpoint: str, request: InferenceRequest, header_user: str | None
    ) -> Response:
        decision = self.route(request, header_user)
        call = ExchangeDraft(
            endpoint=endpoint,
            request=request,
            route=decision.route,
            adapter=decision.adapter,
            mirror_to=decision.mirror_to,
            user=request.user or header_user,
        )
        headers = {
            EXCHANGE_HEADER: call.exchange_id,
            ADAPTER_HEADER: call.adapter_label,
            ROUTE_HEADER: call.route,
        }
        body = call.upstream_body(self.adapters.resolve(call.adapter))
        in_flight = metrics.REQUESTS_IN_FLIGHT.labels(call.route, call.adapter_label)
        if request.stream:
            return await self._stream(call, body, headers)
        in_flight.inc()
        try:
            upstream = await self._post(call, body)
            if upstream.status_code != 200:
                return self._upstream_error(call, upstream, headers)
            data = upstream.json()
            call.absorb_response(data)
            self._finish(call, 200)
            return JSONResponse(self._for_client(request, data), headers=headers)
        finally:
            in_flight.dec()

    def _for_client(self, request: InferenceRequest, chunk: dict[str, Any]) -> dict[str, Any]:
        """Echo the client's model name and strip what it did not ask for."""
        chunk["model"] = request.model
        if not request.wants_logprobs():
            for choice in chunk.get("choices", []):
                choice["logprobs"] = None
        return chunk

    async def _post(self, call: ExchangeDraft, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self.engine.post(call.path, body)
        except EngineUnavailableError as exc:
            self._finish(call, 503, f"engine unavailable: {exc}")
            raise self._unavailable(call) from exc

    def _unavailable(self, call: ExchangeDraft | None = None) -> OpenAIError:
        headers = {"Retry-After": str(self.config.retry_after_s)}
        if call is not None:
            headers[EXCHANGE_HEADER] = call.exchange_id  # the failure is recorded under it
        return OpenAIError(
            503,
            "The inference engine is unavailable (starting or restarting); retry shortly.",
            type="service_unavailable",
            code="engine_unavailable",
            headers=headers,
        )

    def _upstream_error(
        self, call: ExchangeDraft, upstream: httpx.Response, headers: dict[str, str]
    ) -> JSONResponse:
        """vLLM's own 4xx/5xx, passed on in OpenAI's shape and recorded as failed."""
        try:
            body = upstream.json()
            message = body.get("error", {}).get("message") or body.get("message") or upstream.text
        except (json.JSONDecodeError, AttributeError):
            message = upstream.text
        error = OpenAIError(
            upstream.status_code,
            message,
            type="invalid_request_error" if upstream.status_code < 500 else "engine_error",
        )
        self._finish(call, upstream.status_code, message)
        return JSONResponse(error.body(), status_code=upstream.status_code, headers=headers)

    async def _stream(
        self, call: ExchangeDraft, body: dict[str, Any], headers: dict[str, str]
    ) -> Response:
        try:
            upstream = await self.engine.open_stream(call.path, body)
        except EngineUnavailableError as exc:
            self._finish(call, 503, f"engine unavailable: {exc}")
            raise self._unavailable(call) from exc
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            return self._upstream_error(call, upstream, headers)
        return StreamingResponse(
            self._relay(call, upstream),
            media_type="text/event-stream",
            headers=headers,
        )

    async def _relay(self, call: ExchangeDraft, upstream: httpx.Response) -> AsyncIterator[bytes]:
        """Pass SSE events through one by one, learning from each; a broken engine ends cleanly."""
        request = call.request
        wants_usage = bool((request.stream_options or {}).get("include_usage"))
        in_flight = metrics.REQUESTS_IN_FLIGHT.labels(call.route, call.adapter_label)
        in_flight.inc()
        status, error = 200, None
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                try:
                    chunk = json.loads(line[6:])
                except json.JSONDecodeError:
                    chunk = {"error": {"message": "the engine sent a malformed event"}}
                if "error" in chunk:
                    status, error = 500, json.dumps(chunk["error"])
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    break
                for choice in chunk.get("choices", []):
                    call.absorb(choice, streaming=True)
                call.absorb_usage(chunk.get("usage"))
                if not chunk.get("choices") and not wants_usage:
                    continue  # the usage-only chunk we asked for ourselves
                if not wants_usage:
                    chunk.pop("usage", None)
                yield f"data: {json.dumps(self._for_client(request, chunk))}\n\n".encode()
        except httpx.HTTPError as exc:
            status, error = 503, f"engine stream broke: {exc!r}"
            failure = OpenAIError(
                503, "The inference engine stopped mid-stream.", type="engine_error",
                code="engine_unavailable",
            )  # fmt: skip
            yield f"data: {json.dumps(failure.body())}\n\n".encode()
        except asyncio.CancelledError:
            status, error = 499, "client disconnected"
            raise
        finally:
            in_flight.dec()
            await upstream.aclose()
            self._finish(call, status, error)
        yield b"data: [DONE]\n\n"

    def _finish(self, call: ExchangeDraft, http_status: int, error: str | None = None) -> None:
        """Record the exchange, update the metrics, and mirror it to the shadow if chosen."""
        exchange = call.record(http_status, error)
        self.recorder.submit(exchange)
        labels = (call.route, call.adapter_label)
        metrics.REQUESTS.labels(*labels, str(http_status)).inc()
        metrics.REQUEST_DURATION.labels(*labels).observe(exchange["latency_seconds"])
        if exchange["ttft_seconds"] is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(*labels).observe(exchange["ttft_seconds"])
        if call.completion_tokens:
            metrics.OUTPUT_TOKENS.labels(*labels).inc(call.completion_tokens)
        if call.prompt_tokens:
            metrics.PROMPT_TOKENS.labels(*labels).inc(call.prompt_tokens)
        if call.mirror_to and error is None:
            self._spawn(self._shadow(call))

    async def _shadow(self, parent: ExchangeDraft) -> None:
        """Replay a finished primary request on the shadow adapter, after it, never in its way."""
        request = parent.request.model_copy(update={"stream": False, "stream_options": None})
        shadow = ExchangeDraft(
            endpoint=parent.endpoint,
            request=request,
            route="shadow",
            adapter=parent.mirror_to,
            parent_id=parent.exchange_id,
            user=parent.user,
        )
        engine_model = self.adapters.resolve(shadow.adapter)
        self._finish(shadow, *await answer_whole(self.engine, shadow, engine_model))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for shadow calls in flight, then for every queued record to be written."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.recorder.flush()

    # feedback

    async def add_feedback(self, feedback: FeedbackRequest) -> FeedbackResponse:
        add = lambda: self.store.add_feedback(  # noqa: E731
            feedback.exchange_id, feedback.reference, feedback.rating
        )
        try:
            feedback_id = await asyncio.to_thread(add)
        except UnknownExchangeError:
            await self.recorder.flush()  # it may be answered but not yet written
            try:
                feedback_id = await asyncio.to_thread(add)
            except UnknownExchangeError:
                raise OpenAIError(
                    404, f"No exchange with id '{feedback.exchange_id}'.",
                    param="exchange_id", code="exchange_not_found",
                ) from None  # fmt: skip
        return FeedbackResponse(id=feedback_id, exchange_id=feedback.exchange_id)

    # admin

    def adapter_infos(self) -> list[AdapterInfo]:
        table = self.adapters.routing
        roles = {"primary": table.primary, "canary": table.canary, "shadow": table.shadow}
        return [
            AdapterInfo(
                name=a.name,
                path=a.path,
                fingerprint=a.fingerprint,
                loaded=a.loaded,
                routes=[role for role, name in roles.items() if name == a.name],
            )  # fmt: skip
            for a in self.adapters.registered()
            if a.name != self.adapters.base_adapter
        ]

    async def reconcile_forever(self) -> None:
        """A reconcile every interval; the first waits too (start-up has just reconciled)."""
        while True:
            await asyncio.sleep(self.config.reconcile_interval_s)
            try:
                await self.adapters.reconcile()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("adapter reconcile failed")


async def _json_body(request: Request, limit: int) -> Any:
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


def _validate(model: type[Any], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None


def _validation_error(errors: Any) -> OpenAIError:
    first = errors[0]
    location = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(location) or None
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
    )
    return OpenAIError(400, messages, param=param, code="invalid_value")


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def create_app(
    gateway: Gateway,
    lifespan_hooks: list[Callable[[], Awaitable[Any]]] | None = None,
    admin_routers: list[APIRouter] | None = None,
) -> FastAPI:
    """The FastAPI app around one Gateway. `lifespan_hooks` start extra background work;
    `admin_routers` add admin endpoints (behind the admin token) from the packages above."""
    config = gateway.config

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
            await gateway.drain()
            await gateway.recorder.stop()

    app = FastAPI(title="tunewatch gateway", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc.errors())
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

    # async: no I/O here, and a sync dependency would cost a worker-thread hop per request.
    async def require_api_key(request: Request) -> None:
        if config.api_keys and _bearer(request) not in config.api_keys:
            raise OpenAIError(
                401, "Missing or invalid API key.", type="authentication_error",
                code="invalid_api_key",
            )  # fmt: skip

    async def require_admin(request: Request) -> None:
        token = _bearer(request)
        if token is None or not secrets.compare_digest(token, config.admin_token):
            raise OpenAIError(
                401, "Admin API needs 'Authorization: Bearer <admin token>'.",
                type="authentication_error", code="invalid_admin_token",
            )  # fmt: skip

    inference = [Depends(require_api_key)]
    admin = [Depends(require_admin)]

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat_completions(request: Request) -> Response:
        body = _validate(ChatCompletionRequest, await _json_body(request, config.max_body_bytes))
        return await gateway.infer("chat.completions", body, request.headers.get(USER_HEADER))

    @app.post("/v1/completions", dependencies=inference)
    async def completions(request: Request) -> Response:
        body = _validate(CompletionRequest, await _json_body(request, config.max_body_bytes))
        return await gateway.infer("completions", body, request.headers.get(USER_HEADER))

    @app.get("/v1/models", dependencies=inference)
    async def models() -> dict[str, Any]:
        names = [config.served_model_name] + [a.name for a in gateway.adapter_infos()]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "tunewatch"} for n in names],
        }

    @app.post("/v1/feedback", dependencies=inference)
    async def feedback(request: Request) -> FeedbackResponse:
        body = _validate(FeedbackRequest, await _json_body(request, config.max_body_bytes))
        return await gateway.add_feedback(body)

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

    @app.get("/admin/adapters", dependencies=admin)
    async def list_adapters() -> list[AdapterInfo]:
        return gateway.adapter_infos()

    @app.post("/admin/adapters", dependencies=admin, status_code=201)
    async def load_adapter(request: Request) -> AdapterInfo:
        body = _validate(AdapterLoadRequest, await _json_body(request, config.max_body_bytes))
        if body.name in (config.served_model_name, gateway.adapters.base_adapter):
            raise OpenAIError(
                409, f"'{body.name}' is reserved.", param="name", code="name_reserved"
            )
        try:
            await gateway.adapters.load(body.name, body.path, reason="loaded through the admin API")
        except InvalidAdapterError as exc:
            raise OpenAIError(400, str(exc), param="path", code="invalid_adapter") from None
        except AdapterNameTakenError:
            raise OpenAIError(
                409, f"Adapter name '{body.name}' is taken by other weights; "
                "give every version its own name (e.g. name-v2).", param="name",
                code="adapter_name_taken",
            ) from None  # fmt: skip
        except EngineUnavailableError:
            raise gateway._unavailable() from None
        return next(a for a in gateway.adapter_infos() if a.name == body.name)

    @app.delete("/admin/adapters/{name}", dependencies=admin)
    async def unload_adapter(name: str) -> dict[str, Any]:
        if not gateway.adapters.is_registered(name) or name == gateway.adapters.base_adapter:
            raise OpenAIError(404, f"No adapter '{name}' is loaded.", code="adapter_not_found")
        try:
            await gateway.adapters.unload(name, reason="unloaded through the admin API")
        except AdapterInUseError as exc:
            raise OpenAIError(409, str(exc), code="adapter_in_use") from None
        except EngineUnavailableError:
            raise gateway._unavailable() from None
        return {"name": name, "unloaded": True}

    @app.get("/admin/routing", dependencies=admin)
    async def get_routing() -> RoutingTable:
        return gateway.adapters.routing

    @app.put("/admin/routing", dependencies=admin)
    async def set_routing(request: Request) -> RoutingTable:
        table = _validate(RoutingTable, await _json_body(request, config.max_body_bytes))
        try:
            await gateway.adapters.set_routing(table, reason="set through the admin API")
        except KeyError as exc:
            raise OpenAIError(400, f"Unknown adapters in routing table: {exc.args[0]}.",
                              code="adapter_not_found") from None  # fmt: skip
        return table

    for router in admin_routers or []:
        app.include_router(router, dependencies=admin)
    return app
