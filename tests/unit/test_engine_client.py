"""The engine client: adapter checks before vLLM sees a path, and vLLM's API behind a timeout."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from serving.engine import (
    EngineClient,
    EngineUnavailableError,
    InvalidAdapterError,
    adapter_fingerprint,
)

ENGINE_URL = "http://engine.test"


def write_adapter(
    directory: Path, weights: bytes = b"lora weights", peft_type: str = "LORA"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def client_for(engine) -> EngineClient:  # engine: conftest's FakeEngine
    return EngineClient(ENGINE_URL, transport=engine.transport())


# adapter_fingerprint: what counts as a LoRA adapter directory


def test_a_lora_directory_has_a_fingerprint_of_its_config_and_weights(tmp_path: Path) -> None:
    fingerprint = adapter_fingerprint(write_adapter(tmp_path / "a"))
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0


def test_the_fingerprint_is_the_same_for_the_same_bytes_anywhere(tmp_path: Path) -> None:
    assert adapter_fingerprint(write_adapter(tmp_path / "a")) == adapter_fingerprint(
        write_adapter(tmp_path / "b")
    )


def test_other_weights_have_another_fingerprint(tmp_path: Path) -> None:
    assert adapter_fingerprint(write_adapter(tmp_path / "a", b"one")) != adapter_fingerprint(
        write_adapter(tmp_path / "b", b"two")
    )


@pytest.mark.parametrize("pickle", ["adapter_model.bin", "adapter_model.pt"])
def test_pickled_weights_are_refused_by_name(tmp_path: Path, pickle: str) -> None:
    directory = write_adapter(tmp_path / "a")
    (directory / "adapter_model.safetensors").rename(directory / pickle)
    with pytest.raises(InvalidAdapterError, match=f"{pickle}, a pickle.*safetensors"):
        adapter_fingerprint(directory)


def test_a_missing_directory_is_refused_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(InvalidAdapterError, match="no-such-adapter.*not a directory"):
        adapter_fingerprint(missing)


def test_a_directory_without_adapter_config_is_refused_by_name(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "bare")
    (directory / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapterError, match="bare.*no adapter_config.json"):
        adapter_fingerprint(directory)


def test_an_adapter_config_that_is_not_json_is_refused_by_name(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "broken")
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="broken.*not valid JSON"):
        adapter_fingerprint(directory)


def test_a_non_lora_adapter_is_refused_by_name(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "prefix", peft_type="PREFIX_TUNING")
    with pytest.raises(InvalidAdapterError, match="prefix.*'PREFIX_TUNING'.*only LORA"):
        adapter_fingerprint(directory)


def test_a_directory_without_weights_is_refused_by_name(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "weightless")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapterError, match="weightless.*adapter_model.safetensors"):
        adapter_fingerprint(directory)


# the client against the fake engine


async def test_load_adapter_sends_name_and_path_and_sees_it_listed(engine, tmp_path: Path) -> None:
    client = client_for(engine)
    path = write_adapter(tmp_path / "v1")
    await client.load_adapter("v1", str(path))
    assert engine.calls_to("/v1/load_lora_adapter") == [{"lora_name": "v1", "lora_path": str(path)}]
    assert "v1" in await client.model_ids()


async def test_load_adapter_checks_the_directory_before_calling_the_engine(
    engine, tmp_path: Path
) -> None:
    client = client_for(engine)
    with pytest.raises(InvalidAdapterError, match="not a directory"):
        await client.load_adapter("v1", str(tmp_path / "missing"))
    assert engine.received == []


async def test_an_adapter_accepted_but_not_listed_is_invalid(engine, tmp_path: Path) -> None:
    engine.lists_loaded_adapters = False
    client = client_for(engine)
    with pytest.raises(InvalidAdapterError, match="accepted adapter 'v1' but does not list it"):
        await client.load_adapter("v1", str(write_adapter(tmp_path / "v1")))


async def test_loading_an_adapter_the_engine_already_has_succeeds(engine, tmp_path: Path) -> None:
    engine.loaded.add("v1")
    await client_for(engine).load_adapter("v1", str(write_adapter(tmp_path / "v1")))
    assert "v1" in engine.loaded


async def test_an_adapter_the_engine_refuses_is_invalid_with_the_engine_s_reason(
    tmp_path: Path,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400, json={"error": {"message": "LoRA rank 64 is greater than max_lora_rank 16."}}
        )

    client = EngineClient(ENGINE_URL, transport=httpx.MockTransport(refuse))
    with pytest.raises(InvalidAdapterError, match="refused adapter 'v1'.*max_lora_rank"):
        await client.load_adapter("v1", str(write_adapter(tmp_path / "v1")))


async def test_unloading_an_adapter_removes_it_from_the_engine(engine) -> None:
    engine.loaded.add("v1")
    await client_for(engine).unload_adapter("v1")
    assert engine.calls_to("/v1/unload_lora_adapter") == [{"lora_name": "v1"}]
    assert "v1" not in engine.loaded


async def test_unloading_an_adapter_the_engine_lacks_is_not_an_error(engine) -> None:
    await client_for(engine).unload_adapter("never-loaded")


async def test_model_ids_lists_the_base_model_and_loaded_adapters(engine) -> None:
    engine.loaded.update({"v1", "v2"})
    assert set(await client_for(engine).model_ids()) == {engine.served_model_name, "v1", "v2"}


async def test_a_reachable_engine_is_healthy_and_a_down_one_is_not(engine) -> None:
    client = client_for(engine)
    assert await client.healthy()
    engine.down = True
    assert not await client.healthy()


async def test_a_down_engine_makes_every_call_unavailable(engine, tmp_path: Path) -> None:
    engine.down = True
    client = client_for(engine)
    with pytest.raises(EngineUnavailableError, match="unreachable"):
        await client.post("/v1/completions", {"model": "m", "prompt": "hi"})
    with pytest.raises(EngineUnavailableError):
        await client.open_stream("/v1/completions", {"model": "m", "prompt": "hi", "stream": True})
    with pytest.raises(EngineUnavailableError):
        await client.model_ids()
    with pytest.raises(EngineUnavailableError):
        await client.load_adapter("v1", str(write_adapter(tmp_path / "v1")))


async def test_a_timeout_makes_the_engine_unavailable() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = EngineClient(ENGINE_URL, transport=httpx.MockTransport(slow))
    with pytest.raises(EngineUnavailableError):
        await client.post("/v1/chat/completions", {"model": "m", "messages": []})


async def test_post_passes_the_engine_s_own_error_response_back(engine) -> None:
    response = await client_for(engine).post("/v1/completions", {"model": "nope", "prompt": "hi"})
    assert response.status_code == 404


async def test_a_base_url_with_a_trailing_slash_reaches_the_same_paths(engine) -> None:
    client = EngineClient(ENGINE_URL + "/", transport=engine.transport())
    await client.model_ids()
    assert engine.received[-1][:2] == ("GET", "/v1/models")
