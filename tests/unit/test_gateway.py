"""The gateway against a fake engine: pass-through, recording, routing, errors, admin, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from serving.gateway import EXCHANGE_HEADER, USER_HEADER, GatewayConfig
from serving.routing import unit_hash
from store.adapters import RoutingTable
from store.exchanges import Exchange

REPLY = "Paris is the capital."
MEAN_LOGPROB = -0.3  # the fake engine's five tokens: -0.1 ... -0.5


def events(response: Any) -> list[Any]:
    """The SSE events of a streamed answer: JSON chunks, and the final "[DONE]" as a string."""
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# pass-through


def test_a_chat_completion_passes_through(gw) -> None:
    response = gw.chat()
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["usage"]["completion_tokens"] == 5


def test_a_text_completion_passes_through(gw) -> None:
    response = gw.complete()
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == REPLY


def test_the_reply_names_the_model_the_client_asked_for(gw) -> None:
    assert gw.chat().json()["model"] == gw.served_model_name


def test_the_base_model_is_served_through_the_identity_adapter(gw) -> None:
    gw.chat()
    assert gw.engine.inference_bodies()[-1]["model"] == gw.base_adapter


def test_base_requests_go_to_the_engines_base_model_once_its_lora_fix_is_confirmed(gw) -> None:
    gw.gateway.adapters.serve_base_through(gw.served_model_name)
    response = gw.chat()
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert gw.engine.inference_bodies()[-1]["model"] == gw.served_model_name
    assert response.headers["x-tunewatch-adapter"] == "base"
    assert (exchange.route, exchange.adapter) == ("primary", "base")


def test_adapter_requests_keep_their_adapter_when_the_base_is_served_directly(gw) -> None:
    gw.load_adapter("v1")
    gw.set_routing(canary="v1", canary_weight=1.0)
    gw.gateway.adapters.serve_base_through(gw.served_model_name)
    gw.chat(user="alice")
    gw.client.post("/v1/completions", json={"model": "v1", "prompt": "hi"})
    assert [b["model"] for b in gw.engine.inference_bodies()[-2:]] == ["v1", "v1"]


def test_the_base_falls_back_to_the_identity_adapter_when_the_fix_is_lost(gw) -> None:
    gw.gateway.adapters.serve_base_through(gw.served_model_name)
    gw.gateway.adapters.serve_base_through(None)  # a restarted engine without the fix
    gw.chat()
    assert gw.engine.inference_bodies()[-1]["model"] == gw.base_adapter


def test_base_traffic_in_a_rollout_takes_the_lora_road_its_shadow_is_compared_on(gw) -> None:
    gw.load_adapter("v2")
    gw.gateway.adapters.serve_base_through(gw.served_model_name)
    gw.chat()
    gw.set_routing(shadow="v2", shadow_fraction=1.0)
    gw.chat()
    gw.drain()
    assert [b["model"] for b in gw.engine.inference_bodies()[-3:]] == [
        gw.served_model_name,  # no rollout: the base at its own speed
        gw.base_adapter,  # in shadow: the identity adapter's LoRA road, as the candidate's
        "v2",
    ]


def test_sampling_parameters_pass_through_to_the_engine_untouched(gw) -> None:
    gw.chat(temperature=0.2, max_tokens=17, seed=3, top_k=40)
    sent = gw.engine.inference_bodies()[-1]
    assert (sent["temperature"], sent["max_tokens"], sent["seed"], sent["top_k"]) == (
        0.2,
        17,
        3,
        40,
    )


def test_the_engine_is_always_asked_for_chat_logprobs(gw) -> None:
    gw.chat()
    assert gw.engine.inference_bodies()[-1]["logprobs"] is True


def test_the_engine_is_always_asked_for_completion_logprobs(gw) -> None:
    gw.complete()
    assert gw.engine.inference_bodies()[-1]["logprobs"] == 0


def test_logprobs_the_client_did_not_ask_for_are_stripped(gw) -> None:
    assert gw.chat().json()["choices"][0]["logprobs"] is None
    assert gw.complete().json()["choices"][0]["logprobs"] is None


def test_logprobs_the_client_asked_for_are_kept(gw) -> None:
    chat = gw.chat(logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]
    assert [t["logprob"] for t in chat["content"]] == [-0.1, -0.2, -0.3, -0.4, -0.5]
    completion = gw.complete(logprobs=1).json()["choices"][0]["logprobs"]
    assert completion["token_logprobs"] == [-0.1, -0.2, -0.3, -0.4, -0.5]


def test_the_client_s_own_logprobs_setting_reaches_the_engine(gw) -> None:
    gw.complete(logprobs=3)
    assert gw.engine.inference_bodies()[-1]["logprobs"] == 3


def test_the_models_list_names_the_served_model_and_loaded_adapters_but_not_the_identity(
    gw,
) -> None:
    gw.load_adapter("support-v1")
    ids = [m["id"] for m in gw.client.get("/v1/models").json()["data"]]
    assert ids == [gw.served_model_name, "support-v1"]


# streaming


def test_a_stream_relays_every_event_and_ends_with_done(gw) -> None:
    response = gw.chat(stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    received = events(response)
    assert received[-1] == "[DONE]"
    chunks = received[:-1]
    assert len(chunks) == 6  # the role chunk, then one per token; no usage chunk
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["model"] for c in chunks} == {gw.served_model_name}


def test_a_text_completion_stream_relays_every_token(gw) -> None:
    chunks = events(gw.complete(stream=True))[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY


def test_a_stream_always_asks_the_engine_for_usage_and_logprobs(gw) -> None:
    gw.chat(stream=True)
    sent = gw.engine.inference_bodies()[-1]
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["logprobs"] is True


def test_a_stream_hides_the_usage_chunk_the_client_did_not_ask_for(gw) -> None:
    chunks = events(gw.chat(stream=True))[:-1]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


def test_a_stream_passes_the_usage_chunk_on_when_the_client_asked_for_it(gw) -> None:
    chunks = events(gw.chat(stream=True, stream_options={"include_usage": True}))[:-1]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_a_stream_strips_logprobs_unless_asked_and_keeps_them_when_asked(gw) -> None:
    plain = events(gw.chat(stream=True))[:-1]
    assert all(c["choices"][0]["logprobs"] is None for c in plain)
    asked = events(gw.chat(stream=True, logprobs=True))[:-1]
    assert [c["choices"][0]["logprobs"]["content"][0]["logprob"] for c in asked[1:]] == [
        -0.1, -0.2, -0.3, -0.4, -0.5
    ]  # fmt: skip


def test_a_stream_that_breaks_midway_ends_with_an_error_event_then_done(gw) -> None:
    gw.engine.stream_breaks_after = 3
    response = gw.chat(stream=True)
    received = events(response)
    assert received[-1] == "[DONE]"
    error = received[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "engine_unavailable"
    assert len(received) == 3 + 2  # what arrived before the break, the error, [DONE]


def test_a_stream_that_breaks_midway_is_recorded_as_an_error(gw) -> None:
    gw.engine.stream_breaks_after = 3
    response = gw.chat(stream=True)
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert exchange.status == "error"
    assert "ReadError" in exchange.error
    assert exchange.response is None


# recording


def test_every_exchange_is_recorded_under_the_id_in_its_header(gw) -> None:
    response = gw.chat("What is the capital of France?", user="alice")
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert exchange.route == "primary"
    assert exchange.adapter == "base"
    assert exchange.endpoint == "chat.completions"
    assert exchange.user == "alice"
    assert exchange.prompt == "What is the capital of France?"
    assert exchange.response == REPLY
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (7, 5)
    assert exchange.latency_seconds > 0
    assert exchange.mean_logprob == pytest.approx(MEAN_LOGPROB)
    assert exchange.finish_reason == "stop"
    assert (exchange.status, exchange.http_status, exchange.error) == ("ok", 200, None)
    assert exchange.parent_id is None


def test_the_recorded_request_is_what_the_client_sent(gw) -> None:
    response = gw.chat(temperature=0.5)
    request = gw.exchange(response.headers[EXCHANGE_HEADER]).request
    assert request["temperature"] == 0.5
    assert "logprobs" not in request  # what the gateway added for itself is not the client's


def test_the_prompt_recorded_for_a_chat_is_its_last_user_turn(gw) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Peru?"}],
        },
    ]
    response = gw.client.post(
        "/v1/chat/completions", json={"model": gw.served_model_name, "messages": messages}
    )
    assert gw.exchange(response.headers[EXCHANGE_HEADER]).prompt == "Capital of Peru?"


def test_a_completion_is_recorded_with_its_prompt_and_mean_logprob(gw) -> None:
    response = gw.complete("The capital of France is")
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert exchange.endpoint == "completions"
    assert exchange.prompt == "The capital of France is"
    assert exchange.mean_logprob == pytest.approx(MEAN_LOGPROB)


def test_a_streamed_exchange_is_recorded_with_text_usage_logprobs_and_first_token_time(gw) -> None:
    response = gw.chat(stream=True)
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert exchange.response == REPLY
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (7, 5)
    assert exchange.mean_logprob == pytest.approx(MEAN_LOGPROB)
    assert exchange.finish_reason == "stop"
    assert 0 < exchange.ttft_seconds <= exchange.latency_seconds


def test_a_whole_answer_records_no_time_to_first_token(gw) -> None:
    """Without a stream the gateway cannot see the first token; a guess would skew the histogram."""
    exchange = gw.exchange(gw.chat().headers[EXCHANGE_HEADER])
    assert exchange.ttft_seconds is None


def test_the_answer_headers_name_the_route_and_adapter(gw) -> None:
    response = gw.chat()
    assert response.headers["x-tunewatch-route"] == "primary"
    assert response.headers["x-tunewatch-adapter"] == "base"


def test_exchanges_are_written_before_the_gateway_stops(make_harness) -> None:
    gw = make_harness()
    ids = [gw.chat().headers[EXCHANGE_HEADER] for _ in range(5)]
    gw.client.__exit__(None, None, None)  # shutdown: no explicit flush
    assert all(gw.gateway.store.get_exchange(i) is not None for i in ids)


# shutdown


def ask_in_background(gw) -> tuple[threading.Thread, list[Any]]:
    """A chat from another thread, as a client whose answer is pending; its outcome lands in
    the list (a response, or what its cancelled call raised)."""
    outcome: list[Any] = []

    def ask() -> None:
        try:
            outcome.append(gw.chat())
        except BaseException as exc:  # the gateway cancelled it
            outcome.append(exc)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    return asking, outcome


def wait_for_engine_call(gw, model: str) -> None:
    for _ in range(500):
        if any(body["model"] == model for body in gw.engine.inference_bodies()):
            return
        time.sleep(0.01)
    raise AssertionError(f"the engine was never asked on {model}")


def stop_within(gw, seconds: float) -> None:
    """Shut the gateway down as its server does (the app's lifespan); past `seconds`, fail
    rather than hang (the engine then answers, so that the test can end)."""
    stopping = threading.Thread(target=gw.client.__exit__, args=(None, None, None), daemon=True)
    stopping.start()
    stopping.join(seconds)
    if stopping.is_alive():
        gw.engine.hanging_adapters.clear()
        raise AssertionError(f"the gateway did not stop within {seconds} s")


def stored_exchanges(gw) -> list[Any]:
    with gw.gateway.store.session() as session:
        return list(session.scalars(select(Exchange).order_by(Exchange.created_at)))


def test_a_shadow_the_engine_never_answers_is_cut_short_at_once_and_recorded_interrupted(
    make_harness,
) -> None:
    gw = make_harness(shutdown_timeout_s=3600.0)  # shadows are not waited for at all
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", shadow="v2", shadow_fraction=1.0)
    gw.engine.hanging_adapters.add("v2")
    primary_id = gw.chat().headers[EXCHANGE_HEADER]
    wait_for_engine_call(gw, "v2")

    stop_within(gw, 10)

    primary, shadow = stored_exchanges(gw)
    assert (primary.id, primary.status) == (primary_id, "ok")
    assert (shadow.route, shadow.parent_id) == ("shadow", primary_id)
    assert (shadow.status, shadow.http_status, shadow.response) == ("interrupted", 503, None)


def test_a_request_unanswered_at_the_shutdown_deadline_is_cancelled_and_recorded_interrupted(
    make_harness,
) -> None:
    gw = make_harness(shutdown_timeout_s=2.0)  # 1.5 s for the answer, 0.5 s for the records
    gw.load_adapter("v1")
    gw.set_routing(primary="v1")
    gw.engine.hanging_adapters.add("v1")
    asking, outcome = ask_in_background(gw)
    wait_for_engine_call(gw, "v1")

    stop_within(gw, 10)
    asking.join(10)

    assert outcome and not isinstance(outcome[0], httpx.Response)  # it never got an answer
    [exchange] = stored_exchanges(gw)
    assert (exchange.route, exchange.adapter) == ("primary", "v1")
    assert (exchange.status, exchange.http_status) == ("interrupted", 503)


def test_a_request_answered_before_the_shutdown_deadline_is_waited_for(make_harness) -> None:
    gw = make_harness(shutdown_timeout_s=3600.0)
    gw.load_adapter("v1")
    gw.set_routing(primary="v1")
    gw.engine.hanging_adapters.add("v1")
    asking, outcome = ask_in_background(gw)
    wait_for_engine_call(gw, "v1")
    stopping = threading.Thread(target=gw.client.__exit__, args=(None, None, None), daemon=True)
    stopping.start()

    time.sleep(0.2)  # the shutdown waits ...
    gw.engine.hanging_adapters.clear()  # ... for the answer
    stopping.join(10)
    asking.join(10)

    assert not stopping.is_alive() and outcome[0].status_code == 200
    [exchange] = stored_exchanges(gw)
    assert (exchange.id, exchange.status) == (outcome[0].headers[EXCHANGE_HEADER], "ok")


# feedback


def test_feedback_for_a_recorded_exchange_is_accepted(gw) -> None:
    exchange_id = gw.chat().headers[EXCHANGE_HEADER]
    gw.drain()
    response = gw.client.post(
        "/v1/feedback", json={"exchange_id": exchange_id, "reference": "Paris.", "rating": 1.0}
    )
    assert response.status_code == 200
    assert response.json()["exchange_id"] == exchange_id
    assert response.json()["object"] == "feedback"


def test_feedback_right_after_the_answer_is_accepted_before_the_exchange_is_written(gw) -> None:
    exchange_id = gw.chat().headers[EXCHANGE_HEADER]
    response = gw.client.post("/v1/feedback", json={"exchange_id": exchange_id, "rating": 0.0})
    assert response.status_code == 200


def test_feedback_for_an_unknown_exchange_is_404(gw) -> None:
    response = gw.client.post("/v1/feedback", json={"exchange_id": "nope", "reference": "x"})
    error = assert_openai_error(response, 404, "exchange_not_found")
    assert error["param"] == "exchange_id"


def test_feedback_without_reference_or_rating_is_400(gw) -> None:
    exchange_id = gw.chat().headers[EXCHANGE_HEADER]
    response = gw.client.post("/v1/feedback", json={"exchange_id": exchange_id})
    assert_openai_error(response, 400)


# routing


def test_a_canary_at_weight_one_answers_every_request(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", canary="v2", canary_weight=1.0)
    response = gw.chat(user="alice")
    assert gw.engine.inference_bodies()[-1]["model"] == "v2"
    assert response.headers["x-tunewatch-route"] == "canary"
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert (exchange.route, exchange.adapter) == ("canary", "v2")


def routing_roles() -> set[tuple[str, str]]:
    [family] = [m for m in REGISTRY.collect() if m.name == "tunewatch_routing_adapter"]
    return {(s.labels["route"], s.labels["adapter"]) for s in family.samples}


def test_the_routing_table_in_force_is_on_metrics_and_a_role_left_empty_has_no_series(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", canary="v2", canary_weight=0.25, shadow="v2", shadow_fraction=0.5)
    roles = routing_roles()
    assert roles == {("primary", "v1"), ("canary", "v2"), ("shadow", "v2")}
    assert REGISTRY.get_sample_value("tunewatch_routing_canary_weight_ratio") == 0.25
    assert REGISTRY.get_sample_value("tunewatch_routing_shadow_fraction_ratio") == 0.5
    gw.set_routing()
    roles = routing_roles()
    assert roles == {("primary", "base")}
    assert REGISTRY.get_sample_value("tunewatch_routing_canary_weight_ratio") == 0.0


def test_the_primary_answers_users_outside_the_canary(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", canary="v2", canary_weight=0.5)
    outside = next(u for u in (f"user-{i}" for i in range(100)) if unit_hash("v2", u) >= 0.5)
    response = gw.chat(user=outside)
    assert response.headers["x-tunewatch-route"] == "primary"
    assert gw.engine.inference_bodies()[-1]["model"] == "v1"


def test_the_user_header_keeps_a_user_on_their_side_when_the_body_names_none(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", canary="v2", canary_weight=0.5)
    users = [f"user-{i}" for i in range(100)]
    inside = next(u for u in users if unit_hash("v2", u) < 0.5)
    outside = next(u for u in users if unit_hash("v2", u) >= 0.5)
    for _ in range(3):
        response = gw.client.post(
            "/v1/chat/completions",
            json={"model": gw.served_model_name, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-tunewatch-user": inside},
        )
        assert response.headers["x-tunewatch-route"] == "canary"
        response = gw.client.post(
            "/v1/chat/completions",
            json={"model": gw.served_model_name, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-tunewatch-user": outside},
        )
        assert response.headers["x-tunewatch-route"] == "primary"


def test_the_user_from_the_header_is_recorded_with_the_exchange(gw) -> None:
    response = gw.client.post(
        "/v1/chat/completions",
        json={"model": gw.served_model_name, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-tunewatch-user": "carol"},
    )
    assert gw.exchange(response.headers[EXCHANGE_HEADER]).user == "carol"


def test_an_adapter_s_own_name_pins_the_request_to_it(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1")
    response = gw.client.post(
        "/v1/chat/completions",
        json={"model": "v2", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200
    assert response.json()["model"] == "v2"
    assert gw.engine.inference_bodies()[-1]["model"] == "v2"
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert (exchange.route, exchange.adapter) == ("pinned", "v2")


def test_a_shadow_gets_a_mirrored_exchange_whose_parent_is_the_primary(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", shadow="v2", shadow_fraction=1.0)
    response = gw.chat("What is the capital of France?")
    assert response.status_code == 200
    primary_id = response.headers[EXCHANGE_HEADER]
    shadows = [e for e in gw.exchanges() if e.route == "shadow"]
    assert len(shadows) == 1
    shadow = shadows[0]
    assert shadow.parent_id == primary_id
    assert (shadow.adapter, shadow.status, shadow.response) == ("v2", "ok", REPLY)
    assert shadow.prompt == "What is the capital of France?"
    assert [b["model"] for b in gw.engine.inference_bodies()] == ["v1", "v2"]


def test_a_streamed_request_is_mirrored_to_the_shadow_without_streaming(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", shadow="v2", shadow_fraction=1.0)
    gw.chat(stream=True)
    gw.drain()
    shadow_body = gw.engine.inference_bodies()[-1]
    assert shadow_body["model"] == "v2"
    assert not shadow_body.get("stream")
    assert [e.route for e in gw.exchanges()] == ["primary", "shadow"]


def test_the_primary_answers_even_when_its_shadow_fails(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", shadow="v2", shadow_fraction=1.0)
    gw.engine.failing_adapters.add("v2")
    response = gw.chat()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == REPLY
    shadow = next(e for e in gw.exchanges() if e.route == "shadow")
    assert (shadow.status, shadow.http_status) == ("error", 500)
    assert shadow.parent_id == response.headers[EXCHANGE_HEADER]


def test_a_failed_primary_is_not_mirrored(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    gw.set_routing(primary="v1", shadow="v2", shadow_fraction=1.0)
    gw.engine.failing_adapters.add("v1")
    assert gw.chat().status_code == 500
    assert [e.route for e in gw.exchanges()] == ["primary"]


# request errors


def test_an_unknown_model_is_404_model_not_found(gw) -> None:
    response = gw.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
    )
    error = assert_openai_error(response, 404, "model_not_found")
    assert error["param"] == "model"
    assert "gpt-4" in error["message"]
    assert gw.engine.inference_bodies() == []


def test_the_identity_adapter_cannot_be_named_as_a_model(gw) -> None:
    response = gw.client.post("/v1/completions", json={"model": gw.base_adapter, "prompt": "hi"})
    assert_openai_error(response, 404, "model_not_found")


def test_a_body_that_is_not_json_is_400_invalid_json(gw) -> None:
    response = gw.client.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_json")


def test_a_chat_without_messages_is_400_naming_the_param(gw) -> None:
    response = gw.client.post("/v1/chat/completions", json={"model": gw.served_model_name})
    error = assert_openai_error(response, 400, "invalid_value")
    assert error["param"] == "messages"


def test_a_chat_with_empty_messages_is_400(gw) -> None:
    response = gw.client.post(
        "/v1/chat/completions", json={"model": gw.served_model_name, "messages": []}
    )
    assert assert_openai_error(response, 400)["param"] == "messages"


def test_a_field_of_the_wrong_type_is_400_naming_it(gw) -> None:
    response = gw.client.post(
        "/v1/chat/completions", json={"model": gw.served_model_name, "messages": "hello"}
    )
    assert assert_openai_error(response, 400)["param"] == "messages"
    response = gw.client.post("/v1/completions", json={"model": 7, "prompt": "hi"})
    assert assert_openai_error(response, 400)["param"] == "model"


def test_a_body_that_is_not_an_object_is_400(gw) -> None:
    response = gw.client.post("/v1/completions", json=["model", "prompt"])
    assert_openai_error(response, 400)


def test_batched_prompts_are_400(gw) -> None:
    response = gw.client.post(
        "/v1/completions", json={"model": gw.served_model_name, "prompt": ["a", "b"]}
    )
    assert "batched prompts" in assert_openai_error(response, 400)["message"]


def test_an_oversized_body_is_413(make_harness) -> None:
    gw = make_harness(max_body_bytes=4096)
    response = gw.chat("x" * 5000)
    assert_openai_error(response, 413, "body_too_large")
    assert gw.engine.inference_bodies() == []


def test_an_oversized_body_without_a_declared_length_is_413(make_harness) -> None:
    gw = make_harness(max_body_bytes=4096)
    body = json.dumps(
        {"model": gw.served_model_name, "messages": [{"role": "user", "content": "x" * 5000}]}
    ).encode()
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    response = gw.client.post(
        "/v1/chat/completions", content=chunks, headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "body_too_large")


def test_an_unknown_path_is_404_in_openai_shape(gw) -> None:
    assert_openai_error(gw.client.get("/v1/nothing-here"), 404)


# engine errors


def test_a_down_engine_is_503_with_retry_after(gw) -> None:
    gw.engine.down = True
    response = gw.chat()
    assert_openai_error(response, 503, "engine_unavailable")
    assert int(response.headers["retry-after"]) > 0


def test_a_503_names_the_exchange_it_was_recorded_under(gw) -> None:
    gw.engine.down = True
    response = gw.chat()
    assert gw.exchange(response.headers[EXCHANGE_HEADER]).http_status == 503


def test_a_down_engine_is_503_for_a_stream_too(gw) -> None:
    gw.engine.down = True
    response = gw.chat(stream=True)
    assert_openai_error(response, 503, "engine_unavailable")
    assert "retry-after" in response.headers


def test_a_request_a_down_engine_could_not_answer_is_recorded_as_an_error(gw) -> None:
    gw.engine.down = True
    gw.chat()
    [exchange] = gw.exchanges()
    assert (exchange.status, exchange.http_status) == ("error", 503)
    assert "engine unavailable" in exchange.error
    assert exchange.response is None


def test_an_engine_400_is_passed_on_in_openai_shape(gw) -> None:
    response = gw.chat(f"{'word ' * 10} [too long]")
    error = assert_openai_error(response, 400)
    assert "maximum context length" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_an_engine_400_is_recorded_as_an_error(gw) -> None:
    response = gw.chat("[too long]")
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert (exchange.status, exchange.http_status) == ("error", 400)
    assert "maximum context length" in exchange.error


def test_an_engine_400_on_a_stream_is_passed_on_before_any_event(gw) -> None:
    response = gw.chat("[too long]", stream=True)
    assert_openai_error(response, 400)
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert exchange.status == "error"


def test_an_engine_500_is_passed_on_as_an_engine_error(gw) -> None:
    gw.load_adapter("v1")
    gw.engine.failing_adapters.add("v1")
    response = gw.client.post("/v1/completions", json={"model": "v1", "prompt": "hi"})
    assert assert_openai_error(response, 500)["type"] == "engine_error"


# inference API keys


def test_without_api_keys_configured_inference_is_open(gw) -> None:
    assert gw.chat().status_code == 200


def test_with_api_keys_inference_without_a_key_is_401(make_harness) -> None:
    gw = make_harness(api_keys=["sk-good"])
    assert_openai_error(gw.chat(), 401, "invalid_api_key")
    assert_openai_error(gw.client.get("/v1/models"), 401, "invalid_api_key")
    assert gw.engine.inference_bodies() == []


def test_with_api_keys_a_wrong_key_is_401_and_a_right_one_answers(make_harness) -> None:
    gw = make_harness(api_keys=["sk-good"])
    body = {"model": gw.served_model_name, "prompt": "hi"}
    wrong = gw.client.post("/v1/completions", json=body, headers={"authorization": "Bearer sk-bad"})
    assert_openai_error(wrong, 401, "invalid_api_key")
    right = gw.client.post(
        "/v1/completions", json=body, headers={"authorization": "Bearer sk-good"}
    )
    assert right.status_code == 200


def test_an_api_key_does_not_open_the_admin_api(make_harness) -> None:
    gw = make_harness(api_keys=["sk-good"])
    response = gw.client.get("/admin/routing", headers={"authorization": "Bearer sk-good"})
    assert_openai_error(response, 401, "invalid_admin_token")


# admin


def test_the_admin_api_without_a_token_is_401(gw) -> None:
    assert_openai_error(gw.client.get("/admin/adapters"), 401, "invalid_admin_token")


def test_the_admin_api_with_a_wrong_token_is_401(gw) -> None:
    response = gw.client.get("/admin/routing", headers={"authorization": "Bearer wrong"})
    assert_openai_error(response, 401, "invalid_admin_token")


def test_the_admin_api_with_another_scheme_is_401(gw) -> None:
    response = gw.client.get("/admin/routing", headers={"authorization": f"Basic {gw.admin_token}"})
    assert_openai_error(response, 401)


def test_loading_an_adapter_answers_201_and_lists_it(gw) -> None:
    path = gw.adapter_dir("support-v1")
    response = gw.admin("POST", "/admin/adapters", json={"name": "support-v1", "path": str(path)})
    assert response.status_code == 201
    assert response.json()["name"] == "support-v1"
    assert response.json()["loaded"] is True
    assert "support-v1" in gw.engine.loaded
    listed = gw.admin("GET", "/admin/adapters").json()
    assert [a["name"] for a in listed] == ["support-v1"]
    assert listed[0]["path"] == str(path)


def test_loading_a_missing_path_is_400_invalid_adapter_and_never_reaches_the_engine(gw) -> None:
    loads_before = len(gw.engine.calls_to("/v1/load_lora_adapter"))
    response = gw.admin(
        "POST", "/admin/adapters", json={"name": "v1", "path": str(gw.adapters_root / "missing")}
    )
    error = assert_openai_error(response, 400, "invalid_adapter")
    assert error["param"] == "path"
    assert "missing" in error["message"]
    assert len(gw.engine.calls_to("/v1/load_lora_adapter")) == loads_before
    assert gw.admin("GET", "/admin/adapters").json() == []


def test_loading_other_weights_under_a_taken_name_is_409(gw) -> None:
    gw.load_adapter("v1")
    other = gw.adapter_dir("v1-retrained", b"different weights")
    response = gw.admin("POST", "/admin/adapters", json={"name": "v1", "path": str(other)})
    assert_openai_error(response, 409, "adapter_name_taken")


def test_loading_the_same_weights_under_the_same_name_again_is_fine(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v1")
    assert [a["name"] for a in gw.admin("GET", "/admin/adapters").json()] == ["v1"]


def test_loading_under_a_reserved_name_is_409(gw) -> None:
    path = str(gw.adapter_dir("x"))
    for name in (gw.served_model_name, gw.base_adapter):
        response = gw.admin("POST", "/admin/adapters", json={"name": name, "path": path})
        assert_openai_error(response, 409, "name_reserved")


def test_an_adapter_name_with_a_slash_is_400(gw) -> None:
    response = gw.admin(
        "POST", "/admin/adapters", json={"name": "../v1", "path": str(gw.adapter_dir("v1"))}
    )
    assert assert_openai_error(response, 400)["param"] == "name"


def test_an_adapter_the_engine_refuses_is_400_and_not_registered(gw) -> None:
    gw.engine.lists_loaded_adapters = False
    response = gw.admin(
        "POST", "/admin/adapters", json={"name": "v1", "path": str(gw.adapter_dir("v1"))}
    )
    assert_openai_error(response, 400, "invalid_adapter")
    gw.engine.lists_loaded_adapters = True
    gw.run(gw.gateway.adapters.reconcile)  # the next tick reads the store afresh
    assert gw.admin("GET", "/admin/adapters").json() == []


def test_unloading_an_adapter_removes_it(gw) -> None:
    gw.load_adapter("v1")
    response = gw.admin("DELETE", "/admin/adapters/v1")
    assert response.status_code == 200
    assert "v1" not in gw.engine.loaded
    assert gw.admin("GET", "/admin/adapters").json() == []
    gw.run(gw.gateway.adapters.reconcile)
    assert "v1" not in gw.engine.loaded  # and it stays unloaded


def test_unloading_an_adapter_in_the_routing_table_is_409(gw) -> None:
    gw.load_adapter("v1")
    gw.set_routing(primary="v1")
    assert_openai_error(gw.admin("DELETE", "/admin/adapters/v1"), 409, "adapter_in_use")
    assert "v1" in gw.engine.loaded


def test_unloading_an_unknown_adapter_or_the_identity_is_404(gw) -> None:
    assert_openai_error(gw.admin("DELETE", "/admin/adapters/nope"), 404, "adapter_not_found")
    response = gw.admin("DELETE", f"/admin/adapters/{gw.base_adapter}")
    assert_openai_error(response, 404, "adapter_not_found")


def test_a_routing_table_naming_an_unknown_adapter_is_400(gw) -> None:
    response = gw.admin("PUT", "/admin/routing", json={"primary": "ghost"})
    error = assert_openai_error(response, 400, "adapter_not_found")
    assert "ghost" in error["message"]


def test_an_inconsistent_routing_table_is_400(gw) -> None:
    gw.load_adapter("v1")
    response = gw.admin("PUT", "/admin/routing", json={"primary": "v1", "canary_weight": 0.2})
    assert "needs a canary" in assert_openai_error(response, 400)["message"]


def test_a_routing_table_put_is_what_get_returns(gw) -> None:
    for name in ("v1", "v2", "v3"):
        gw.load_adapter(name)
    table = {
        "primary": "v1", "canary": "v2", "canary_weight": 0.25,
        "shadow": "v3", "shadow_fraction": 0.5,
    }  # fmt: skip
    assert gw.admin("PUT", "/admin/routing", json=table).json() == table
    assert gw.admin("GET", "/admin/routing").json() == table
    assert gw.gateway.store.routing_table() == RoutingTable(**table)


def test_the_adapter_list_shows_each_adapter_s_routes(gw) -> None:
    for name in ("v1", "v2"):
        gw.load_adapter(name)
    gw.set_routing(primary="v1", canary="v2", canary_weight=0.1)
    routes = {a["name"]: a["routes"] for a in gw.admin("GET", "/admin/adapters").json()}
    assert routes == {"v1": ["primary"], "v2": ["canary"]}


# keeping the engine and the store in step


def test_a_restarted_engine_gets_its_adapters_back_at_the_next_reconcile(gw) -> None:
    gw.load_adapter("v1")
    gw.engine.loaded.clear()  # the engine restarted and lost them
    gw.run(gw.gateway.adapters.reconcile)
    assert gw.engine.loaded == {gw.base_adapter, "v1"}


def test_the_gateway_reconciles_on_its_own_every_interval(make_harness) -> None:
    gw = make_harness(reconcile_interval_s=0.05)
    gw.load_adapter("v1")
    gw.engine.loaded.clear()
    deadline = time.monotonic() + 5.0
    while "v1" not in gw.engine.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.engine.loaded == {gw.base_adapter, "v1"}


def test_routing_written_by_another_process_is_picked_up_at_the_next_reconcile(gw) -> None:
    gw.load_adapter("v1")
    gw.gateway.store.set_routing_table(RoutingTable(primary="v1"), reason="another host")
    gw.run(gw.gateway.adapters.reconcile)
    gw.chat()
    assert gw.engine.inference_bodies()[-1]["model"] == "v1"


def test_an_adapter_whose_files_have_gone_does_not_keep_the_others_off_the_engine(gw) -> None:
    gw.load_adapter("v1")
    gw.load_adapter("v2")
    for item in (gw.adapters_root / "v1").iterdir():
        item.unlink()
    gw.engine.loaded.clear()
    gw.run(gw.gateway.adapters.reconcile)
    assert {gw.base_adapter, "v2"} <= gw.engine.loaded


def test_a_gateway_starts_even_when_a_registered_adapter_s_files_have_gone(make_harness) -> None:
    first = make_harness()
    first.load_adapter("v1")
    first.load_adapter("v2")
    first.client.__exit__(None, None, None)
    for item in (first.adapters_root / "v1").iterdir():
        item.unlink()
    first.engine.loaded.clear()  # the engine restarted too
    second = make_harness()  # same store, same engine
    assert "v2" in second.engine.loaded
    assert (
        second.client.post("/v1/completions", json={"model": "v2", "prompt": "hi"}).status_code
        == 200
    )


def test_a_routing_change_made_during_a_reconcile_is_not_reverted_by_it(gw) -> None:
    gw.load_adapter("v1")
    gw.set_routing()  # the table in force: everyone on the base model
    adapters, store = gw.gateway.adapters, gw.gateway.store
    read_table = store.routing_table

    async def race() -> None:
        loop = asyncio.get_running_loop()
        read, written = asyncio.Event(), asyncio.Event()

        def slow_read() -> RoutingTable | None:
            """Read the old table, then hand it back only once the new one is written (or 0.5 s)."""
            table = read_table()
            loop.call_soon_threadsafe(read.set)
            waiting = asyncio.wait_for(written.wait(), 0.5)
            asyncio.run_coroutine_threadsafe(waiting, loop).exception()
            return table

        store.routing_table = slow_read  # type: ignore[method-assign]
        reconcile = asyncio.ensure_future(adapters.reconcile())
        await read.wait()
        store.routing_table = read_table  # type: ignore[method-assign]
        await adapters.set_routing(RoutingTable(primary="v1"), reason="controller")
        written.set()
        await reconcile

    gw.run(race)
    assert adapters.routing == RoutingTable(primary="v1")


# health and readiness


def test_healthz_answers_without_the_engine(gw) -> None:
    gw.engine.down = True
    assert gw.client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_ready_when_the_engine_serves_every_registered_adapter(gw) -> None:
    gw.load_adapter("v1")
    assert gw.client.get("/readyz").status_code == 200
    gw.engine.loaded.discard("v1")
    assert gw.client.get("/readyz").status_code == 503


def test_readyz_is_not_ready_while_the_engine_is_down(gw) -> None:
    gw.engine.down = True
    assert gw.client.get("/readyz").status_code == 503


# metrics


def scrape(gw) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = gw.client.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_are_counted_by_route_adapter_and_code(gw) -> None:
    gw.load_adapter("metrics-count")
    body = {"model": "metrics-count", "prompt": "hi"}
    for _ in range(3):
        gw.client.post("/v1/completions", json=body)
    gw.engine.failing_adapters.add("metrics-count")
    gw.client.post("/v1/completions", json=body)
    samples = scrape(gw)
    labels = {"route": "pinned", "adapter": "metrics-count"}
    ok = frozenset({**labels, "code": "200"}.items())
    failed = frozenset({**labels, "code": "500"}.items())
    assert samples[("tunewatch_requests_total", ok)] == 3
    assert samples[("tunewatch_requests_total", failed)] == 1


def test_request_durations_are_observed_per_adapter(gw) -> None:
    gw.load_adapter("metrics-duration")
    for _ in range(2):
        gw.client.post("/v1/completions", json={"model": "metrics-duration", "prompt": "hi"})
    samples = scrape(gw)
    labels = frozenset({"route": "pinned", "adapter": "metrics-duration"}.items())
    assert samples[("tunewatch_request_duration_seconds_count", labels)] == 2
    assert samples[("tunewatch_request_duration_seconds_sum", labels)] > 0
    infinite = labels | {("le", "+Inf")}
    assert samples[("tunewatch_request_duration_seconds_bucket", infinite)] == 2


def test_tokens_are_counted_per_adapter(gw) -> None:
    gw.load_adapter("metrics-tokens")
    gw.client.post("/v1/completions", json={"model": "metrics-tokens", "prompt": "hi"})
    samples = scrape(gw)
    labels = frozenset({"route": "pinned", "adapter": "metrics-tokens"}.items())
    assert samples[("tunewatch_output_tokens_total", labels)] == 5
    assert samples[("tunewatch_prompt_tokens_total", labels)] == 7


def test_the_base_model_is_measured_under_the_adapter_label_base(gw) -> None:
    key = (
        "tunewatch_requests_total",
        frozenset({"route": "primary", "adapter": "base", "code": "200"}.items()),
    )
    before = scrape(gw).get(key, 0.0)
    gw.chat()
    assert scrape(gw)[key] == before + 1


def test_how_the_base_is_served_is_a_metric(gw) -> None:
    key = ("tunewatch_base_served_directly", frozenset())
    assert scrape(gw)[key] == 0
    gw.gateway.adapters.serve_base_through(gw.served_model_name)
    assert scrape(gw)[key] == 1


def test_an_unknown_model_is_not_measured(gw) -> None:
    gw.client.post("/v1/completions", json={"model": "metrics-unknown", "prompt": "hi"})
    assert not any(dict(labels).get("adapter") == "metrics-unknown" for _, labels in scrape(gw))


def test_nothing_is_left_in_flight_after_answers_and_broken_streams(gw) -> None:
    gw.load_adapter("metrics-inflight")
    body = {"model": "metrics-inflight", "prompt": "hi"}
    gw.client.post("/v1/completions", json=body)
    gw.client.post("/v1/completions", json={**body, "stream": True})
    gw.engine.stream_breaks_after = 2
    gw.client.post("/v1/completions", json={**body, "stream": True})
    labels = frozenset({"route": "pinned", "adapter": "metrics-inflight"}.items())
    assert scrape(gw)[("tunewatch_requests_in_flight", labels)] == 0


def test_a_non_ascii_admin_token_is_a_401_not_a_500(gw) -> None:
    response = gw.client.get(
        "/admin/routing", headers={"authorization": "Bearer t\u00f6ken".encode()}
    )
    assert_openai_error(response, 401, "invalid_admin_token")


def test_a_non_ascii_api_key_is_a_401_not_a_500(make_harness) -> None:
    gw = make_harness(api_keys=["sk-good"])
    response = gw.client.post(
        "/v1/completions",
        json={"model": gw.served_model_name, "prompt": "hi"},
        headers={"authorization": "Bearer sk-g\u00f6\u00f6d".encode()},
    )
    assert_openai_error(response, 401, "invalid_api_key")


def test_an_empty_bearer_token_never_passes_and_an_empty_secret_is_refused(make_harness) -> None:
    gw = make_harness(api_keys=["sk-good"])
    response = gw.client.get("/admin/routing", headers={"authorization": "Bearer "})
    assert_openai_error(response, 401, "invalid_admin_token")
    with pytest.raises(ValueError, match="non-empty"):
        GatewayConfig(served_model_name="m", admin_token="", spill_file=Path("spill.jsonl"))
    with pytest.raises(ValueError, match="non-empty"):
        GatewayConfig("m", "t", Path("spill.jsonl"), api_keys=["sk", ""])


def test_a_user_longer_than_the_store_holds_is_a_400_naming_it(gw) -> None:
    response = gw.chat(user="u" * 257)
    assert_openai_error(response, 400)
    assert "user" in response.json()["error"]["message"]
    body = {"model": gw.served_model_name, "messages": [{"role": "user", "content": "hi"}]}
    headed = gw.client.post("/v1/chat/completions", json=body, headers={USER_HEADER: "u" * 257})
    assert_openai_error(headed, 400)
    assert headed.json()["error"]["param"] == USER_HEADER


def test_an_adapter_the_engine_lost_is_a_503_to_retry_not_the_engine_s_404(gw) -> None:
    gw.load_adapter("v1")
    gw.set_routing(primary="v1")
    gw.engine.loaded.discard("v1")  # the engine restarted; the reconcile loop has not run yet
    response = gw.chat()
    error = assert_openai_error(response, 503, "engine_unavailable")
    assert response.headers["retry-after"] and error["type"] == "service_unavailable"
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert (exchange.status, exchange.http_status) == ("error", 503)
