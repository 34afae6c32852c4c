"""A client that hangs up: its exchange is recorded as cancelled with the text it had so far, and
the engine's request is closed (what makes vLLM abort it), streamed or not.

The client here speaks ASGI to the app as uvicorn carries a connection (ASGI spec 2.3): the
body, then nothing until the connection is lost, then `http.disconnect`. The TestClient
cannot hang up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from serving.gateway import EXCHANGE_HEADER

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's, for HTTP/1.1
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "query_string": b"",
    "root_path": "",
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def ask_then_hang_up(
    app: Any, path: str, body: dict[str, Any], hang_up_when: Callable[[list[Any]], bool]
) -> list[Any]:
    """Send `body` to `path`, hang up once `hang_up_when(messages sent back)` holds, and return
    those messages once the app is done with the request."""
    messages: list[Any] = []
    gone = asyncio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)  # uvicorn takes what is sent after a hang-up, and drops it

    async def hang_up() -> None:
        while not hang_up_when(messages):
            await asyncio.sleep(0.005)
        gone.set()

    headers = [(b"host", b"gateway.test"), (b"content-type", b"application/json")]
    scope = {**SCOPE, "path": path, "raw_path": path.encode(), "headers": headers}
    hanging_up = asyncio.create_task(hang_up())
    try:
        await asyncio.wait_for(app(scope, receive, send), 10)
    finally:
        hanging_up.cancel()
    return messages


def events_sent(messages: list[Any]) -> list[bytes]:
    return [m["body"] for m in messages if m["type"] == "http.response.body" and m["body"]]


def exchange_id(messages: list[Any]) -> str:
    [start] = [m for m in messages if m["type"] == "http.response.start"]
    return dict(start["headers"])[EXCHANGE_HEADER.encode()].decode()


def chat_body(gw, **fields: Any) -> dict[str, Any]:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    return {"model": gw.served_model_name, "messages": question, **fields}


def test_a_stream_whose_client_hangs_up_is_recorded_cancelled_with_its_text_so_far(gw) -> None:
    gw.engine.stream_stalls_after = 3  # the role, "Paris", " is"; then the engine is slow
    messages = gw.run(
        ask_then_hang_up,
        gw.client.app,
        "/v1/chat/completions",
        chat_body(gw, stream=True),
        lambda sent: len(events_sent(sent)) >= 3,
    )
    exchange = gw.exchange(exchange_id(messages))
    assert (exchange.status, exchange.http_status) == ("cancelled", 499)
    assert exchange.response == "Paris is"
    assert exchange.error is not None and "client disconnected" in exchange.error


def hang_up_mid_stream(gw) -> None:
    """A streamed chat whose client hangs up after three events, the engine stalled there."""
    gw.engine.stream_stalls_after = 3
    gw.run(
        ask_then_hang_up,
        gw.client.app,
        "/v1/chat/completions",
        chat_body(gw, stream=True),
        lambda sent: len(events_sent(sent)) >= 3,
    )


def test_a_stream_whose_client_hangs_up_closes_the_engine_s_stream(gw) -> None:
    hang_up_mid_stream(gw)
    gw.drain()
    assert gw.engine.abandoned == 1


def test_a_whole_answer_whose_client_hangs_up_is_recorded_cancelled(gw) -> None:
    gw.engine.hanging_adapters.add(gw.base_adapter)
    asked = lambda _: bool(gw.engine.inference_bodies())  # noqa: E731
    messages = gw.run(ask_then_hang_up, gw.client.app, "/v1/chat/completions", chat_body(gw), asked)
    [exchange] = gw.exchanges()
    assert (exchange.status, exchange.http_status, exchange.response) == ("cancelled", 499, "")
    assert not events_sent(messages)  # nothing was answered to a client that had gone


def test_a_whole_answer_whose_client_hangs_up_closes_the_engine_s_request(gw) -> None:
    gw.engine.hanging_adapters.add(gw.base_adapter)
    asked = lambda _: bool(gw.engine.inference_bodies())  # noqa: E731
    gw.run(
        ask_then_hang_up,
        gw.client.app,
        "/v1/completions",
        {"model": gw.served_model_name, "prompt": "The capital of France is"},
        asked,
    )
    assert gw.engine.abandoned == 1


def test_a_client_that_hangs_up_gives_its_slot_back(make_harness) -> None:
    gw = make_harness(max_concurrency=1)
    hang_up_mid_stream(gw)
    gw.engine.stream_stalls_after = None
    assert gw.chat().status_code == 200


def test_a_client_that_stays_is_answered_while_the_gateway_watches_for_a_hang_up(gw) -> None:
    messages = gw.run(
        ask_then_hang_up, gw.client.app, "/v1/chat/completions", chat_body(gw), lambda _: False
    )
    [body] = events_sent(messages)
    assert json.loads(body)["choices"][0]["message"]["content"] == "Paris is the capital."
    assert gw.exchange(exchange_id(messages)).status == "ok"
