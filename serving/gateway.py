"""The OpenAI-compatible gateway: parse, route, pass through to vLLM, record, measure.

Handlers only parse, route and answer. Talking to vLLM is `EngineClient`; recording is
`ExchangeRecorder.submit`; keeping adapters and routing in step is `AdapterSet`.
Every error leaves in OpenAI's error shape. `shutdown` ends within `shutdown_timeout_s`,
and records what it cut short as interrupted; a call whose client hung up is recorded as
cancelled, and its engine request closed so that vLLM stops generating for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from serving import metrics
from serving.adapters import AdapterSet
from serving.admission import Admission
from serving.auth import FeedbackCaller
from serving.engine import EngineClient, EngineUnavailableError
from serving.errors import engine_unavailable
from serving.exchange import ExchangeDraft, answer_whole
from serving.limits import RateLimiter, RequestCaps, retry_after
from serving.protocol import (
    AdapterInfo,
    FeedbackRequest,
    FeedbackResponse,
    InferenceRequest,
    OpenAIError,
)
from serving.recorder import ExchangeRecorder
from serving.routing import RouteChoice, choose_route
from serving.spill import SpillFile
from store import Store
from store.exchanges import FeedbackLimitError, NotMadeByError, Status, UnknownExchangeError

log = logging.getLogger(__name__)

EXCHANGE_HEADER = "x-tunewatch-exchange-id"
ADAPTER_HEADER = "x-tunewatch-adapter"
ROUTE_HEADER = "x-tunewatch-route"
USER_HEADER = "x-tunewatch-user"
INTERRUPTED = "interrupted: the gateway shut down before the engine answered"
CLIENT_GONE = "cancelled: the client disconnected before the answer ended"
OVERLOADED_RETRY_AFTER_S = 1  # a slot frees as soon as any answer ends


@dataclass
class GatewayConfig:
    served_model_name: str
    admin_token: str
    spill_file: Path  # where exchanges wait while the store cannot take them
    api_keys: list[str] = field(default_factory=list)
    feedback_keys: list[str] = field(default_factory=list)  # post feedback for any exchange
    feedback_reference_max_chars: int = 8192
    feedback_max_per_exchange: int = 5
    feedback_per_minute: int = 600  # per key, in this gateway
    max_body_bytes: int = 1 << 20
    adapter_roots: list[Path] = field(default_factory=list)  # the admin API loads from these only
    caps: RequestCaps = field(default_factory=RequestCaps)
    max_concurrency: int = 256  # primaries in flight; more are a fast 503 (serving/admission.py)
    shadow_max_concurrency: int | None = None  # None: a quarter of max_concurrency
    engine_deadline_s: float = 600.0  # the longest one engine call may take, start to end
    reconcile_interval_s: float = 5.0
    retry_after_s: int = 5
    recorder_queue_max: int = 10_000
    shutdown_timeout_s: float = 20.0

    @property
    def shadow_limit(self) -> int:
        if self.shadow_max_concurrency is not None:
            return self.shadow_max_concurrency
        return max(1, self.max_concurrency // 4)

    @property
    def answers_timeout_s(self) -> float:
        """How long a shutdown waits for requests in flight: the last quarter of its time is
        the recorder's, to write what they and it left (so that little needs spilling)."""
        return self.shutdown_timeout_s * 0.75

    def __post_init__(self) -> None:
        # An empty secret would let `Authorization: Bearer ` through anything that compares.
        if not self.admin_token or not all(self.api_keys) or not all(self.feedback_keys):
            raise ValueError("the admin token and every API key and feedback key must be non-empty")


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
        self.recorder = ExchangeRecorder(
            store, SpillFile(config.spill_file), queue_max=config.recorder_queue_max
        )
        self.rng = rng or random.Random()
        self.feedback_rate = RateLimiter(config.feedback_per_minute)
        self.admission = Admission(config.max_concurrency, config.shadow_limit)
        self._shadows: set[asyncio.Task[Any]] = set()
        self._answering: set[asyncio.Task[Any]] = set()  # the tasks of requests in flight
        self._closing: set[asyncio.Task[Any]] = set()  # engine streams being closed
        self._shutdown_at: float | None = None  # the loop time a shutdown began

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
        self,
        endpoint: str,
        request: InferenceRequest,
        header_user: str | None,
        api_key_id: str | None = None,
    ) -> Response:
        self._answering_now()
        self.config.caps.check(request)
        decision = self.route(request, header_user)
        call = ExchangeDraft(
            endpoint=endpoint,
            request=request,
            route=decision.route,
            adapter=decision.adapter,
            mirror_to=decision.mirror_to,
            user=request.user or header_user,
            api_key_id=api_key_id,
        )
        self._admit(call)
        deadline = asyncio.get_running_loop().time() + self.config.engine_deadline_s
        headers = {
            EXCHANGE_HEADER: call.exchange_id,
            ADAPTER_HEADER: call.adapter_label,
            ROUTE_HEADER: call.route,
        }
        body = call.upstream_body(self.adapters.resolve(call.adapter))
        in_flight = metrics.REQUESTS_IN_FLIGHT.labels(call.route, call.adapter_label)
        if request.stream:
            return await self._stream(call, body, headers, deadline)
        in_flight.inc()
        try:
            upstream = await self._post(call, body, deadline)
            if upstream.status_code != 200:
                return self._upstream_error(call, upstream, headers)
            data = upstream.json()
            call.absorb_response(data)
            self._finish(call, 200)
            return JSONResponse(self._for_client(request, data), headers=headers)
        except asyncio.CancelledError:
            self._finish(call, *self._cut_short())
            raise
        finally:
            in_flight.dec()

    def _admit(self, call: ExchangeDraft) -> None:
        """A slot for this request's engine call, given back when the call is recorded (or,
        whatever becomes of it, when the request's task ends); none free: a fast 503, not
        recorded (the gateway's doing, not the adapter's) but counted as shed."""
        if not self.admission.enter(call.exchange_id, "primary"):
            raise OpenAIError(
                503,
                f"The gateway is answering {self.config.max_concurrency} requests, its limit; "
                "retry shortly.",
                type="service_unavailable",
                code="overloaded",
                headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
            )
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: self.admission.leave(call.exchange_id))

    def _answering_now(self) -> None:
        """This request's task: a shutdown waits for it a while, then cancels it."""
        task = asyncio.current_task()
        if task is not None:
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    def _cut_short(self) -> tuple[int, str, Status]:
        """How a call cancelled before its answer ended is recorded (HTTP status, error,
        status): interrupted by the shutdown, or cancelled when its client left (perhaps
        because the adapter was too slow for it, which is the adapter's to answer for)."""
        if self.stopping:
            return 503, INTERRUPTED, "interrupted"
        return 499, CLIENT_GONE, "cancelled"

    def _for_client(self, request: InferenceRequest, chunk: dict[str, Any]) -> dict[str, Any]:
        """Echo the client's model name and strip what it did not ask for."""
        chunk["model"] = request.model
        if not request.wants_logprobs():
            for choice in chunk.get("choices", []):
                choice["logprobs"] = None
        return chunk

    async def _post(
        self, call: ExchangeDraft, body: dict[str, Any], deadline: float
    ) -> httpx.Response:
        try:
            async with asyncio.timeout_at(deadline):
                return await self.engine.post(call.path, body)
        except EngineUnavailableError as exc:
            raise self._unavailable(call, exc) from exc
        except TimeoutError:
            raise self._past_deadline(call) from None

    def _unavailable(self, call: ExchangeDraft, exc: EngineUnavailableError) -> OpenAIError:
        """The exchange recorded as failed, and the 503 that names it."""
        self._finish(call, 503, f"engine unavailable: {exc}")
        headers = {EXCHANGE_HEADER: call.exchange_id}  # the failure is recorded under it
        return engine_unavailable(self.config.retry_after_s, headers)

    def _past_deadline(self, call: ExchangeDraft) -> OpenAIError:
        """The exchange recorded as failed, and the 504 that names it."""
        self._finish(call, 504, self._deadline_error())
        return OpenAIError(
            504,
            f"The inference engine did not answer within {self.config.engine_deadline_s:g} s.",
            type="engine_error",
            code="engine_timeout",
            headers={EXCHANGE_HEADER: call.exchange_id},
        )

    def _deadline_error(self) -> str:
        return f"engine deadline exceeded: {self.config.engine_deadline_s:g} s"

    def _upstream_error(
        self, call: ExchangeDraft, upstream: httpx.Response, headers: dict[str, str]
    ) -> JSONResponse:
        """vLLM's own 4xx/5xx, passed on in OpenAI's shape and recorded as failed; but a 404 is
        the engine not serving what the gateway routed to (a model or adapter the gateway checked
        is registered): a restarted engine, before the reconcile loop has loaded it again, so the
        503 a client retries after."""
        try:
            body = upstream.json()
            message = body.get("error", {}).get("message") or body.get("message") or upstream.text
        except (json.JSONDecodeError, AttributeError):
            message = upstream.text
        if upstream.status_code == 404:
            self._finish(call, 503, f"engine unavailable: it does not serve it yet: {message}")
            unavailable = engine_unavailable(self.config.retry_after_s)
            return JSONResponse(
                unavailable.body(), status_code=503, headers={**headers, **unavailable.headers}
            )
        error = OpenAIError(
            upstream.status_code,
            message,
            type="invalid_request_error" if upstream.status_code < 500 else "engine_error",
        )
        self._finish(call, upstream.status_code, message)
        return JSONResponse(error.body(), status_code=upstream.status_code, headers=headers)

    async def _stream(
        self, call: ExchangeDraft, body: dict[str, Any], headers: dict[str, str], deadline: float
    ) -> Response:
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await self.engine.open_stream(call.path, body)
        except EngineUnavailableError as exc:
            raise self._unavailable(call, exc) from exc
        except TimeoutError:
            raise self._past_deadline(call) from None
        except asyncio.CancelledError:
            self._finish(call, *self._cut_short())
            raise
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            return self._upstream_error(call, upstream, headers)
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: self._abandoned(call, upstream))
        return StreamingResponse(
            self._relay(call, upstream, deadline),
            media_type="text/event-stream",
            headers=headers,
        )

    async def _relay(
        self, call: ExchangeDraft, upstream: httpx.Response, deadline: float
    ) -> AsyncIterator[bytes]:
        """Pass SSE events through one by one, learning from each; a broken engine, or one past
        the deadline, ends the stream cleanly. The deadline bounds each read, never a `yield`:
        a timeout across one would cancel whatever the consumer is awaiting."""
        request = call.request
        wants_usage = bool((request.stream_options or {}).get("include_usage"))
        in_flight = metrics.REQUESTS_IN_FLIGHT.labels(call.route, call.adapter_label)
        in_flight.inc()
        status: int = 200
        error: str | None = None
        ending: Status | None = None
        lines = upstream.aiter_lines()
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    line = await anext(lines, None)
                if line is None:
                    break
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
                503,
                "The inference engine stopped mid-stream.",
                type="engine_error",
                code="engine_unavailable",
            )
            yield f"data: {json.dumps(failure.body())}\n\n".encode()
        except TimeoutError:
            status, error = 504, self._deadline_error()
            failure = OpenAIError(
                504,
                f"The inference engine did not finish within {self.config.engine_deadline_s:g} s.",
                type="engine_error",
                code="engine_timeout",
            )
            yield f"data: {json.dumps(failure.body())}\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):  # the client is gone, or the gateway
            status, error, ending = self._cut_short()
            raise
        finally:
            in_flight.dec()
            self._finish(call, status, error, ending)
            await asyncio.shield(self._close_soon(upstream))
        yield b"data: [DONE]\n\n"

    def _close_soon(self, upstream: httpx.Response) -> asyncio.Future[None]:
        """Close the engine's stream in a task of its own, which the request's cancellation (its
        client gone) cannot cut short: the closed connection is what tells vLLM to abort the
        request and free its slot."""
        closing = asyncio.ensure_future(upstream.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        return closing

    def _abandoned(self, call: ExchangeDraft, upstream: httpx.Response) -> None:
        """The request's task has ended: a relay that never began (the client gone before its
        first event) or was left at a `yield` (gone while one was sent) has neither recorded
        its call nor closed the engine's stream, so both are done here."""
        if not call.recorded:
            self._finish(call, *self._cut_short())
            self._close_soon(upstream)

    def _finish(
        self,
        call: ExchangeDraft,
        http_status: int,
        error: str | None = None,
        status: Status | None = None,
    ) -> None:
        """Give the call's slot back, record the exchange, update the metrics, and mirror it to
        the shadow if chosen; once per call."""
        if call.recorded:
            return
        call.recorded = True
        self.admission.leave(call.exchange_id)
        exchange = call.record(http_status, error, status)
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
        if call.mirror_to and error is None and not self.stopping:
            self._mirror(call)

    def _mirror(self, parent: ExchangeDraft) -> None:
        """Replay a finished primary request on the shadow adapter, after it, never in its way:
        skipped (and counted) when there is no room for it (serving/admission.py)."""
        request = parent.request.model_copy(update={"stream": False, "stream_options": None})
        shadow = ExchangeDraft(
            endpoint=parent.endpoint,
            request=request,
            route="shadow",
            adapter=parent.mirror_to,
            parent_id=parent.exchange_id,
            user=parent.user,
            api_key_id=parent.api_key_id,
        )
        if self.admission.enter(shadow.exchange_id, "shadow"):
            task = self._spawn(self._shadow(shadow))
            task.add_done_callback(lambda _: self.admission.leave(shadow.exchange_id))

    async def _shadow(self, shadow: ExchangeDraft) -> None:
        engine_model = self.adapters.resolve(shadow.adapter)
        in_flight = metrics.REQUESTS_IN_FLIGHT.labels(shadow.route, shadow.adapter_label)
        in_flight.inc()
        try:
            async with asyncio.timeout(self.config.engine_deadline_s):
                answer = await answer_whole(self.engine, shadow, engine_model)
        except TimeoutError:
            answer = 504, self._deadline_error()
        except asyncio.CancelledError:
            self._finish(shadow, *self._cut_short())
            raise
        finally:
            in_flight.dec()
        self._finish(shadow, *answer)

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coroutine)
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)
        return task

    async def drain(self) -> None:
        """Wait for shadow calls in flight, then for every queued record to be written."""
        while self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)
        await self.recorder.flush()

    # shutdown

    @property
    def stopping(self) -> bool:
        return self._shutdown_at is not None

    def begin_shutdown(self) -> float:
        """The shutdown's time runs from the first call (its loop time, returned), and shadow
        replays stop: no client waits for them, and their primaries are answered already."""
        if self._shutdown_at is None:
            self._shutdown_at = asyncio.get_running_loop().time()
        for task in self._shadows:
            task.cancel()
        return self._shutdown_at

    async def shutdown(self) -> None:
        """End within `shutdown_timeout_s` of `begin_shutdown`: shadows cancelled, requests in
        flight waited for `answers_timeout_s` and then cancelled (each cut short is recorded
        as interrupted), and the recorder given the rest of the time (it spills what is left)."""
        began, loop = self.begin_shutdown(), asyncio.get_running_loop()
        await asyncio.gather(*self._shadows, return_exceptions=True)
        answers_by = began + self.config.answers_timeout_s
        if self._answering:
            await asyncio.wait(self._answering, timeout=max(0.0, answers_by - loop.time()))
        for task in self._answering:
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        await self.recorder.stop(began + self.config.shutdown_timeout_s - loop.time())

    # feedback

    async def add_feedback(
        self, feedback: FeedbackRequest, caller: FeedbackCaller
    ) -> FeedbackResponse:
        """Store a reference and/or rating, within the caller's rate, the exchange's cap, and
        what the caller may label (serving/auth.py)."""
        wait_s = self.feedback_rate.take(caller.bucket)
        if wait_s is not None:
            raise OpenAIError(
                429,
                f"More than {self.config.feedback_per_minute} feedback posts a minute for this "
                "key; retry later.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": retry_after(wait_s)},
            )
        limit = self.config.feedback_reference_max_chars
        if feedback.reference is not None and len(feedback.reference) > limit:
            raise OpenAIError(
                400,
                f"reference: {len(feedback.reference)} characters; at most {limit} are taken.",
                param="reference",
                code="invalid_value",
            )
        add = lambda: self.store.add_feedback(  # noqa: E731
            feedback.exchange_id,
            feedback.reference,
            feedback.rating,
            made_by=caller.made_by,
            max_per_exchange=self.config.feedback_max_per_exchange,
        )
        try:
            try:
                feedback_id = await asyncio.to_thread(add)
            except UnknownExchangeError:
                await self.recorder.flush()  # it may be answered but not yet written
                feedback_id = await asyncio.to_thread(add)
        except UnknownExchangeError:
            raise OpenAIError(
                404,
                f"No exchange with id '{feedback.exchange_id}'.",
                param="exchange_id",
                code="exchange_not_found",
            ) from None
        except NotMadeByError:
            raise OpenAIError(
                403,
                f"Exchange '{feedback.exchange_id}' was not made with this API key: post its "
                "feedback with the key that made it, or with a feedback key.",
                type="permission_error",
                param="exchange_id",
                code="feedback_not_allowed",
            ) from None
        except FeedbackLimitError:
            raise OpenAIError(
                409,
                f"Exchange '{feedback.exchange_id}' has {self.config.feedback_max_per_exchange} "
                "feedback posts already, as many as it may have.",
                param="exchange_id",
                code="feedback_limit_reached",
            ) from None
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
            )
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
