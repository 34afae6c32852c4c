"""Unit-test fixtures: a fake vLLM engine on `httpx.MockTransport`, and a gateway in front of it.

The fake engine speaks the slice of vLLM's OpenAI server the gateway uses (health, model
list, runtime LoRA load/unload, chat and text completions, plain and streamed) in vLLM's
shapes, and remembers every request it received so a test can check what the gateway
sent upstream. Its failure switches (down, a failing adapter, an adapter that does not
answer, a stream that breaks or stalls) stand for the ways a real engine lets the gateway down.
No server, no vLLM, no network.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from serving.adapters import AdapterSet
from serving.app import create_app
from serving.engine import EngineClient
from serving.gateway import Gateway, GatewayConfig
from store import Store
from store.exchanges import Exchange

SERVED_MODEL_NAME = "smollm2-135m-instruct"
BASE_ADAPTER = "base-identity-test"
ADMIN_TOKEN = "admin-secret"
ENGINE_URL = "http://engine.test"

# What the fake engine answers, one token at a time, and each token's logprob.
REPLY_TOKENS = ["Paris", " is", " the", " capital", "."]
REPLY_LOGPROBS = [-0.1, -0.2, -0.3, -0.4, -0.5]
PROMPT_TOKENS = 7
TOO_LONG = "[too long]"  # a prompt holding this is refused with vLLM's context-length 400


def write_adapter(directory: Path, weights: bytes = b"lora weights") -> Path:
    """A PEFT-shaped LoRA adapter directory: all the gateway checks is its shape and bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


@dataclass
class FakeEngine:
    """vLLM's OpenAI server in miniature, with switches for its failures."""

    loaded: set[str] = field(default_factory=set)
    received: list[tuple[str, str, Any]] = field(default_factory=list)  # method, path, JSON body
    down: bool = False  # every call fails to connect
    failing_adapters: set[str] = field(default_factory=set)  # inference on these answers 500
    hanging_adapters: set[str] = field(default_factory=set)  # on these, no answer while listed
    stream_breaks_after: int | None = None  # events sent before the connection drops
    stream_stalls_after: int | None = None  # events sent before the stream waits, while set
    lists_loaded_adapters: bool = True  # False: accepts a load but never lists the adapter
    abandoned: int = 0  # requests closed by the gateway before their answer ended (vLLM aborts)
    served_model_name: str = SERVED_MODEL_NAME

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def inference_bodies(self) -> list[dict[str, Any]]:
        """The bodies of the completion calls the engine received, in order."""
        return [body for _, path, body in self.received if path.endswith("completions")]

    def calls_to(self, path: str) -> list[Any]:
        return [body for _, p, body in self.received if p == path]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.received.append((request.method, path, body))
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            names = [self.served_model_name, *(self.loaded if self.lists_loaded_adapters else ())]
            data = [{"id": name, "object": "model", "owned_by": "vllm"} for name in names]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path == "/v1/load_lora_adapter":
            if body["lora_name"] in self.loaded:
                return _error(
                    400, f"The lora adapter '{body['lora_name']}' has already been loaded."
                )
            self.loaded.add(body["lora_name"])
            return httpx.Response(
                200, text=f"Success: LoRA adapter '{body['lora_name']}' added successfully."
            )
        if path == "/v1/unload_lora_adapter":
            if body["lora_name"] not in self.loaded:
                return _error(
                    404, f"The lora adapter '{body['lora_name']}' cannot be found.", "NotFoundError"
                )
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="Success")
        if path in ("/v1/chat/completions", "/v1/completions"):
            try:
                while body["model"] in self.hanging_adapters:
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # the connection closed while it waited
                self.abandoned += 1
                raise
            return self._complete(path, body)
        return _error(404, "Not Found", "NotFoundError")

    def _complete(self, path: str, body: dict[str, Any]) -> httpx.Response:
        model = body["model"]
        if model not in self.loaded and model != self.served_model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if model in self.failing_adapters:
            return _error(500, "EngineCore encountered an issue.", "InternalServerError")
        if TOO_LONG in json.dumps(body.get("messages") or body.get("prompt")):
            return _error(
                400,
                "This model's maximum context length is 2048 tokens. However, you requested "
                "4100 tokens in the messages. Please reduce the length of the messages.",
            )
        chat = path == "/v1/chat/completions"
        if body.get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                stream=_EngineStream(self, self._stream(chat, body)),
            )
        return httpx.Response(200, json=_completion(chat, body))

    async def _stream(self, chat: bool, body: dict[str, Any]) -> AsyncIterator[bytes]:
        events = _chunks(chat, body)
        for sent, event in enumerate(events):
            while sent == self.stream_stalls_after:
                await asyncio.sleep(0.01)
            if self.stream_breaks_after is not None and sent == self.stream_breaks_after:
                raise httpx.ReadError(
                    "peer closed connection without sending complete message body"
                )
            yield f"data: {json.dumps(event)}\n\n".encode()
            await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"


class _EngineStream(httpx.AsyncByteStream):
    """A streamed answer's body, which counts a close before its end as an abandoned request."""

    def __init__(self, engine: FakeEngine, events: AsyncIterator[bytes]) -> None:
        self.engine, self.events, self.ended = engine, events, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self.events:
            yield event
        self.ended = True

    async def aclose(self) -> None:
        if not self.ended:
            self.engine.abandoned += 1
            self.ended = True


def _error(status: int, message: str, type: str = "BadRequestError") -> httpx.Response:
    """vLLM's error body (OpenAI's shape, with the HTTP status as the code)."""
    error = {"message": message, "type": type, "param": None, "code": status}
    return httpx.Response(status, json={"error": error})


def _wants_logprobs(chat: bool, body: dict[str, Any]) -> bool:
    return bool(body.get("logprobs")) if chat else body.get("logprobs") is not None


def _logprobs(chat: bool, tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    if chat:
        content = [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, logprobs, strict=True)
        ]
        return {"content": content}
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)],
        "text_offset": [0] * len(tokens),
    }


def _usage() -> dict[str, int]:
    completion = len(REPLY_TOKENS)
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }


def _completion(chat: bool, body: dict[str, Any]) -> dict[str, Any]:
    logprobs = (
        _logprobs(chat, REPLY_TOKENS, REPLY_LOGPROBS) if _wants_logprobs(chat, body) else None
    )
    text = "".join(REPLY_TOKENS)
    choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": "cmpl-fake",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [choice],
        "usage": _usage(),
    }


def _chunks(chat: bool, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of one streamed answer; the usage-only chunk comes last when asked for."""
    head = {
        "id": "cmpl-fake",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body["model"],
    }
    wants = _wants_logprobs(chat, body)
    events = []
    if chat:
        first = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        events.append({**head, "choices": [first]})
    last = len(REPLY_TOKENS) - 1
    for i, (token, logprob) in enumerate(zip(REPLY_TOKENS, REPLY_LOGPROBS, strict=True)):
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": _logprobs(chat, [token], [logprob]) if wants else None,
            "finish_reason": "stop" if i == last else None,
        }
        if chat:
            choice["delta"] = {"content": token}
        else:
            choice["text"] = token
        events.append({**head, "choices": [choice]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**head, "choices": [], "usage": _usage()})
    return events


@dataclass
class Harness:
    """A running gateway (lifespan and all) in front of a fake engine, and ways to look inside."""

    client: TestClient
    gateway: Gateway
    engine: FakeEngine
    adapters_root: Path
    served_model_name: str = SERVED_MODEL_NAME
    base_adapter: str = BASE_ADAPTER
    admin_token: str = ADMIN_TOKEN

    def chat(
        self, content: str = "What is the capital of France?", **fields: Any
    ) -> httpx.Response:
        body = {"model": self.served_model_name, "messages": [{"role": "user", "content": content}]}
        return self.client.post("/v1/chat/completions", json={**body, **fields})

    def complete(self, prompt: str = "The capital of France is", **fields: Any) -> httpx.Response:
        body = {"model": self.served_model_name, "prompt": prompt}
        return self.client.post("/v1/completions", json={**body, **fields})

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.admin_token}"}
        return self.client.request(method, path, headers=headers, **kwargs)

    def adapter_dir(self, name: str, weights: bytes | None = None) -> Path:
        return write_adapter(self.adapters_root / name, weights or f"weights of {name}".encode())

    def load_adapter(self, name: str) -> None:
        response = self.admin(
            "POST", "/admin/adapters", json={"name": name, "path": str(self.adapter_dir(name))}
        )
        assert response.status_code == 201, response.text

    def set_routing(self, **table: Any) -> None:
        response = self.admin("PUT", "/admin/routing", json=table)
        assert response.status_code == 200, response.text

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run an async function on the gateway's own event loop."""
        return self.client.portal.call(function, *args)

    def drain(self) -> None:
        """Wait for shadow calls in flight and for every exchange to be written."""
        self.run(self.gateway.drain)

    def exchange(self, exchange_id: str) -> Exchange:
        self.drain()
        exchange = self.gateway.store.get_exchange(exchange_id)
        assert exchange is not None, f"exchange {exchange_id} was not recorded"
        return exchange

    def exchanges(self) -> list[Exchange]:
        self.drain()
        with self.gateway.store.session() as session:
            return list(session.scalars(select(Exchange).order_by(Exchange.created_at)))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_harness(tmp_path: Path, engine: FakeEngine) -> Iterator[Callable[..., Harness]]:
    """Start a gateway with the given GatewayConfig overrides (and admin routers made from its
    store); everything stops at teardown."""
    stack = ExitStack()

    def start(routers: Callable[[Store], list[Any]] | None = None, **config: Any) -> Harness:
        store = Store(f"sqlite:///{tmp_path}/t.db")
        stack.callback(store.close)
        client = EngineClient(ENGINE_URL, transport=engine.transport())
        stack.callback(asyncio.run, client.aclose())
        # By default it reconciles at start-up, then only when a test calls it; the admin API
        # loads adapters from the test's adapters folder.
        config = {
            "reconcile_interval_s": 3600.0,
            "adapter_roots": [tmp_path / "adapters"],
            **config,
        }
        settings = GatewayConfig(SERVED_MODEL_NAME, ADMIN_TOKEN, tmp_path / "spill.jsonl", **config)
        gateway = Gateway(settings, store, client, AdapterSet(store, client, BASE_ADAPTER))
        # As `tunewatch serve` does: the identity adapter stands for the base model, loaded first.
        identity = write_adapter(tmp_path / "identity", b"zero B matrices")
        asyncio.run(gateway.adapters.load(BASE_ADAPTER, str(identity), reason="identity adapter"))
        app = create_app(gateway, admin_routers=routers(store) if routers else None)
        test_client = stack.enter_context(TestClient(app))
        return Harness(test_client, gateway, engine, tmp_path / "adapters")

    with stack:
        yield start


@pytest.fixture
def gw(make_harness: Callable[..., Harness]) -> Harness:
    """A gateway with the default configuration: no API keys, routing to the base model."""
    return make_harness()
