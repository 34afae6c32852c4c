"""Hostile bodies: refused early, in OpenAI's error shape, naming what is wrong; never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving.limits import RequestCaps
from tests.unit.test_gateway import assert_openai_error
from tunewatch.settings import Settings
from tunewatch.stack import request_caps

CHUNK = 1024


def post_raw(gw, path: str, content: bytes):
    return gw.client.post(path, content=content, headers={"content-type": "application/json"})


def chat_body(gw, **fields: Any) -> dict[str, Any]:
    return {
        "model": gw.served_model_name,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }


# the body as it arrives


def test_a_chunked_upload_is_refused_at_the_limit_while_it_streams(make_harness) -> None:
    """1 MiB sent in 1 KiB chunks without a declared length: the gateway stops reading at
    4 KiB rather than take it all first (the test client would buffer it, so the app is called
    as the server calls it)."""
    gw = make_harness(max_body_bytes=4096)
    chunks_read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b" " * CHUNK, "more_body": chunks_read < 1024}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 50000),
        "server": ("gateway.test", 80),
    }
    gw.run(gw.client.app, scope, receive, send)

    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 413
    body = json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    assert body["error"]["code"] == "body_too_large"
    assert chunks_read == 4096 // CHUNK + 1  # the chunk that crossed the limit, and no more


def test_deeply_nested_json_is_400_not_a_500(gw) -> None:
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = assert_openai_error(post_raw(gw, "/v1/chat/completions", deep), 400, "invalid_json")
    assert "nested" in error["message"]
    assert gw.engine.inference_bodies() == []


def test_json_nested_past_64_levels_is_400_naming_the_limit(gw) -> None:
    body = chat_body(gw, metadata=json.loads("[" * 64 + "]" * 64))  # 65 with the body itself
    error = assert_openai_error(gw.client.post("/v1/chat/completions", json=body), 400)
    assert "64" in error["message"]
    assert gw.engine.inference_bodies() == []


def test_json_nested_64_levels_deep_is_taken(gw) -> None:
    body = chat_body(gw, metadata=json.loads("[" * 63 + "]" * 63))
    assert gw.client.post("/v1/chat/completions", json=body).status_code == 200


def test_nan_and_infinity_are_not_json(gw) -> None:
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"model": "%s", "prompt": "hi", "temperature": %s}' % (
            gw.served_model_name.encode(),
            constant,
        )
        assert_openai_error(post_raw(gw, "/v1/completions", body), 400, "invalid_json")
    assert gw.engine.inference_bodies() == []


def test_the_feedback_and_admin_routes_read_bodies_the_same_way(gw) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_openai_error(post_raw(gw, "/v1/feedback", deep), 400, "invalid_json")
    response = gw.admin("PUT", "/admin/routing", content=deep)
    assert_openai_error(response, 400, "invalid_json")


# what a request may ask for


@pytest.mark.parametrize(
    ("field", "value", "limits"),
    [
        ("n", 5, {}),
        ("max_tokens", 4097, {}),
        ("max_completion_tokens", 4097, {}),
        ("n", 3, {"max_n": 2}),
        ("max_tokens", 101, {"max_tokens": 100}),
    ],
)
def test_a_chat_asking_past_a_cap_is_400_naming_the_field(
    make_harness, field: str, value: int, limits: dict[str, int]
) -> None:
    gw = make_harness(caps=RequestCaps(**limits))
    error = assert_openai_error(
        gw.client.post("/v1/chat/completions", json=chat_body(gw, **{field: value})), 400
    )
    assert error["param"] == field
    assert str(value - 1) in error["message"]
    assert gw.engine.inference_bodies() == []


def test_a_chat_at_the_caps_is_answered(gw) -> None:
    body = chat_body(gw, n=4, max_tokens=4096)
    assert gw.client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_completion_asking_past_a_cap_is_400_naming_the_field(gw) -> None:
    for field, value in (("n", 5), ("max_tokens", 4097)):
        body = {"model": gw.served_model_name, "prompt": "hi", field: value}
        error = assert_openai_error(gw.client.post("/v1/completions", json=body), 400)
        assert error["param"] == field


def test_a_cap_cannot_be_passed_by_writing_the_number_another_way(gw) -> None:
    """vLLM reads "5" and 5.0 as 5: so does the gateway, before it compares."""
    for value in ("5", 5.0):
        body = chat_body(gw, n=value)
        assert (
            assert_openai_error(gw.client.post("/v1/chat/completions", json=body), 400)["param"]
            == "n"
        )


def test_a_chat_with_more_messages_than_the_cap_is_400_naming_messages(make_harness) -> None:
    gw = make_harness(caps=RequestCaps(max_messages=3))
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(4)]
    body = {"model": gw.served_model_name, "messages": turns}
    error = assert_openai_error(gw.client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages"
    assert "3" in error["message"]
    assert (
        gw.client.post("/v1/chat/completions", json={**body, "messages": turns[:3]}).status_code
        == 200
    )


def test_the_message_cap_is_256_by_default(gw) -> None:
    turns = [{"role": "user", "content": "hi"}] * 257
    body = {"model": gw.served_model_name, "messages": turns}
    assert (
        assert_openai_error(gw.client.post("/v1/chat/completions", json=body), 400)["param"]
        == "messages"
    )


def test_an_ordinary_request_sends_nothing_it_did_not_ask_for(gw) -> None:
    """Declaring n and max_tokens (to compare them) adds neither to what vLLM receives."""
    gw.chat()
    sent = gw.engine.inference_bodies()[-1]
    assert not {"n", "max_tokens", "max_completion_tokens"} & set(sent)


def test_the_token_cap_follows_the_engine_up_starts_and_is_4096_in_front_of_another(
    tmp_path,
) -> None:
    settings = Settings(state_dir=tmp_path, engine={"max_model_len": 1024})
    assert request_caps(settings, launched=True).max_tokens == 1024
    assert request_caps(settings, launched=False).max_tokens == 4096
    pinned = Settings(state_dir=tmp_path, gateway={"max_tokens": 300, "max_n": 2})
    assert request_caps(pinned, launched=True) == RequestCaps(max_n=2, max_tokens=300)
