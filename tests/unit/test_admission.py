"""Under load: a fast 503 beyond the gateway's limit, shadows shed first, a deadline per engine
call; what was shed and what is in flight on /metrics."""

from __future__ import annotations

import threading
import time

from prometheus_client import REGISTRY

from serving.gateway import EXCHANGE_HEADER, GatewayConfig
from tests.unit.test_gateway import (
    ask_in_background,
    assert_openai_error,
    events,
    wait_for_engine_call,
)


def shed(kind: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "tunewatch_requests_shed_total", {"kind": kind, "reason": reason}
    )
    return value or 0.0


def in_flight(route: str, adapter: str) -> float:
    labels = {"route": route, "adapter": adapter}
    return REGISTRY.get_sample_value("tunewatch_requests_in_flight", labels) or 0.0


def pinned_in_background(gw, adapter: str) -> threading.Thread:
    """A request that names `adapter`, from another thread (its answer is not looked at)."""
    body = {"model": adapter, "messages": [{"role": "user", "content": "hi"}]}
    asking = threading.Thread(
        target=gw.client.post, args=("/v1/chat/completions",), kwargs={"json": body}, daemon=True
    )
    asking.start()
    return asking


def primary_on(gw, adapter: str, shadow: str | None = None) -> None:
    gw.load_adapter(adapter)
    if shadow is None:
        gw.set_routing(primary=adapter)
        return
    gw.load_adapter(shadow)
    gw.set_routing(primary=adapter, shadow=shadow, shadow_fraction=1.0)


# the gateway's limit


def test_beyond_the_limit_a_request_is_a_fast_503_overloaded_with_retry_after(make_harness) -> None:
    gw = make_harness(max_concurrency=1)
    primary_on(gw, "v1")
    gw.engine.hanging_adapters.add("v1")
    asking, outcome = ask_in_background(gw)
    wait_for_engine_call(gw, "v1")
    before = shed("primary", "concurrency")

    refused = gw.chat()

    assert_openai_error(refused, 503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert shed("primary", "concurrency") == before + 1
    assert len(gw.engine.inference_bodies()) == 1  # the engine never saw it
    gw.engine.hanging_adapters.clear()
    asking.join(10)
    assert outcome[0].status_code == 200


def test_a_refused_request_is_not_recorded_as_the_adapter_s_failure(make_harness) -> None:
    gw = make_harness(max_concurrency=1)
    primary_on(gw, "v1")
    gw.engine.hanging_adapters.add("v1")
    asking, _ = ask_in_background(gw)
    wait_for_engine_call(gw, "v1")
    gw.chat()
    gw.engine.hanging_adapters.clear()
    asking.join(10)
    assert [e.status for e in gw.exchanges()] == ["ok"]


def test_a_slot_is_free_again_once_its_answer_is_given(make_harness) -> None:
    gw = make_harness(max_concurrency=1)
    assert [gw.chat().status_code for _ in range(3)] == [200, 200, 200]
    assert gw.chat(stream=True).status_code == 200
    gw.engine.stream_breaks_after = 2
    gw.chat(stream=True)
    gw.engine.stream_breaks_after = None
    gw.engine.failing_adapters.add(gw.base_adapter)
    assert gw.chat().status_code == 500
    gw.engine.failing_adapters.clear()
    gw.engine.down = True
    assert gw.chat().status_code == 503
    gw.engine.down = False
    assert gw.chat().status_code == 200


def test_a_stream_holds_its_slot_until_it_ends(make_harness) -> None:
    gw = make_harness(max_concurrency=1)
    gw.engine.stream_stalls_after = 2
    with gw.client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": gw.served_model_name,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
    ) as streaming:
        lines = streaming.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has begun, and stalls
        assert_openai_error(gw.chat(), 503, "overloaded")
        gw.engine.stream_stalls_after = None
        list(lines)
    assert gw.chat().status_code == 200


def test_the_limit_defaults_to_256_with_a_quarter_of_it_for_shadows(tmp_path) -> None:
    config = GatewayConfig("m", "t", tmp_path / "spill.jsonl")
    assert (config.max_concurrency, config.shadow_limit) == (256, 64)
    assert GatewayConfig("m", "t", tmp_path / "s", max_concurrency=2).shadow_limit == 1


# shadows: bounded, and shed first


def test_a_shadow_beyond_the_shadow_limit_is_skipped_and_counted(make_harness) -> None:
    gw = make_harness(shadow_max_concurrency=1)
    primary_on(gw, "v1", shadow="v2")
    gw.engine.hanging_adapters.add("v2")
    first = gw.chat().headers[EXCHANGE_HEADER]
    wait_for_engine_call(gw, "v2")
    before = shed("shadow", "shadow_concurrency")

    second = gw.chat()

    assert second.status_code == 200  # the primary is answered all the same
    assert shed("shadow", "shadow_concurrency") == before + 1
    gw.engine.hanging_adapters.clear()
    shadows = [e for e in gw.exchanges() if e.route == "shadow"]
    assert [s.parent_id for s in shadows] == [first]


def test_a_shadow_is_skipped_while_the_gateway_is_full(make_harness) -> None:
    """Shadows are shed before any primary is refused: a shadow never takes the gateway's last
    free slot."""
    gw = make_harness(max_concurrency=2)
    primary_on(gw, "v1", shadow="v2")
    gw.load_adapter("v3")
    gw.engine.hanging_adapters.add("v3")
    asking = pinned_in_background(gw, "v3")  # holds one of the two slots
    wait_for_engine_call(gw, "v3")
    before = shed("shadow", "concurrency")

    assert gw.chat().status_code == 200  # its shadow would take the last slot

    assert shed("shadow", "concurrency") == before + 1
    gw.engine.hanging_adapters.clear()
    asking.join(10)
    assert [e.route for e in gw.exchanges() if e.route == "shadow"] == []


def test_shadows_in_flight_are_on_the_in_flight_gauge(make_harness) -> None:
    gw = make_harness()
    primary_on(gw, "gauge-v1", shadow="gauge-v2")
    gw.engine.hanging_adapters.add("gauge-v2")
    gw.chat()
    wait_for_engine_call(gw, "gauge-v2")
    assert in_flight("shadow", "gauge-v2") == 1
    gw.engine.hanging_adapters.clear()
    gw.drain()
    assert in_flight("shadow", "gauge-v2") == 0


# the deadline per engine call


def test_an_engine_call_past_its_deadline_is_504_and_recorded_as_an_error(make_harness) -> None:
    gw = make_harness(engine_deadline_s=0.2)
    primary_on(gw, "v1")
    gw.engine.hanging_adapters.add("v1")
    started = time.monotonic()

    response = gw.chat()

    assert time.monotonic() - started < 5
    assert_openai_error(response, 504, "engine_timeout")
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert (exchange.status, exchange.http_status) == ("error", 504)
    assert "deadline" in exchange.error
    gw.engine.hanging_adapters.clear()


def test_a_stream_whose_engine_never_starts_is_504_before_any_event(make_harness) -> None:
    gw = make_harness(engine_deadline_s=0.2)
    primary_on(gw, "v1")
    gw.engine.hanging_adapters.add("v1")
    response = gw.chat(stream=True)
    assert_openai_error(response, 504, "engine_timeout")
    assert gw.exchange(response.headers[EXCHANGE_HEADER]).http_status == 504
    gw.engine.hanging_adapters.clear()


def test_a_stream_past_its_deadline_ends_with_an_error_event_and_is_recorded(make_harness) -> None:
    gw = make_harness(engine_deadline_s=0.3)
    gw.engine.stream_stalls_after = 2
    response = gw.chat(stream=True)
    received = events(response)
    assert received[-1] == "[DONE]"
    assert received[-2]["error"]["code"] == "engine_timeout"
    assert len(received) == 2 + 2  # two events, the error, [DONE]
    exchange = gw.exchange(response.headers[EXCHANGE_HEADER])
    assert (exchange.status, exchange.http_status) == ("error", 504)
    gw.engine.stream_stalls_after = None


def test_a_shadow_past_its_deadline_is_recorded_504(make_harness) -> None:
    gw = make_harness(engine_deadline_s=0.2)
    primary_on(gw, "v1", shadow="v2")
    gw.engine.hanging_adapters.add("v2")
    assert gw.chat().status_code == 200
    [shadow] = [e for e in gw.exchanges() if e.route == "shadow"]
    assert (shadow.status, shadow.http_status) == ("error", 504)
    gw.engine.hanging_adapters.clear()
