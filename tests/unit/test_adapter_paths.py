"""Adapter paths on the admin API: inside the configured roots only, safetensors only, and the
weights hashed off the event loop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import serving.engine
from retrain.jobs import job_dir
from tests.unit.conftest import write_adapter
from tests.unit.test_gateway import assert_openai_error
from tunewatch.retraining import retrain_config
from tunewatch.settings import Settings
from tunewatch.stack import adapter_roots


def load(gw, name: str, path: Path | str):
    return gw.admin("POST", "/admin/adapters", json={"name": name, "path": str(path)})


def test_an_adapter_inside_a_root_is_loaded(gw) -> None:
    assert load(gw, "v1", gw.adapter_dir("v1")).status_code == 201


def test_an_adapter_outside_every_root_is_400_and_never_reaches_the_engine(gw, tmp_path) -> None:
    elsewhere = write_adapter(tmp_path / "elsewhere" / "v1")
    loads_before = len(gw.engine.calls_to("/v1/load_lora_adapter"))
    error = assert_openai_error(load(gw, "v1", elsewhere), 400, "adapter_path_not_allowed")
    assert error["param"] == "path"
    assert str(gw.adapters_root) in error["message"]  # it names the roots
    assert len(gw.engine.calls_to("/v1/load_lora_adapter")) == loads_before
    assert gw.admin("GET", "/admin/adapters").json() == []


def test_dot_dot_cannot_climb_out_of_a_root(gw, tmp_path) -> None:
    write_adapter(tmp_path / "elsewhere" / "v1")
    sneaky = f"{gw.adapters_root}/../elsewhere/v1"
    assert_openai_error(load(gw, "v1", sneaky), 400, "adapter_path_not_allowed")


def test_a_symlink_inside_a_root_to_a_directory_outside_is_refused(gw, tmp_path) -> None:
    outside = write_adapter(tmp_path / "elsewhere" / "v1")
    gw.adapters_root.mkdir(parents=True, exist_ok=True)
    (gw.adapters_root / "v1").symlink_to(outside, target_is_directory=True)
    assert_openai_error(load(gw, "v1", gw.adapters_root / "v1"), 400, "adapter_path_not_allowed")


def test_a_weights_file_linked_from_outside_the_root_is_refused(gw, tmp_path) -> None:
    directory = gw.adapter_dir("v1")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"someone else's file")
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.safetensors").symlink_to(outside)
    error = assert_openai_error(load(gw, "v1", directory), 400, "adapter_path_not_allowed")
    assert "adapter_model.safetensors" in error["message"]


def test_a_symlink_that_stays_inside_the_root_is_followed_and_the_real_path_registered(
    gw,
) -> None:
    real = gw.adapter_dir("v1-real")
    (gw.adapters_root / "v1").symlink_to(real, target_is_directory=True)
    response = load(gw, "v1", gw.adapters_root / "v1")
    assert response.status_code == 201, response.text
    assert response.json()["path"] == str(real)  # what vLLM is told to load is what was checked


def test_a_relative_path_is_400(gw) -> None:
    error = assert_openai_error(load(gw, "v1", "adapters/v1"), 400, "adapter_path_not_allowed")
    assert "absolute" in error["message"]


def test_a_pickled_adapter_is_refused_with_a_clear_400(gw) -> None:
    directory = gw.adapter_dir("v1")
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    error = assert_openai_error(load(gw, "v1", directory), 400, "invalid_adapter")
    assert "adapter_model.bin" in error["message"] and "safetensors" in error["message"]
    assert gw.admin("GET", "/admin/adapters").json() == []


def test_safetensors_beside_a_pickle_are_what_is_loaded(gw) -> None:
    """vLLM reads adapter_model.safetensors first where both are."""
    directory = gw.adapter_dir("v1")
    (directory / "adapter_model.bin").write_bytes(b"a pickle")
    assert load(gw, "v1", directory).status_code == 201


def test_an_adapter_s_weights_are_hashed_off_the_event_loop(gw, monkeypatch) -> None:
    hashed_on: list[threading.Thread] = []
    real_sha256 = serving.engine.sha256

    def observed(*args):
        hashed_on.append(threading.current_thread())
        return real_sha256(*args)

    monkeypatch.setattr(serving.engine, "sha256", observed)

    async def loop_thread() -> threading.Thread:
        return threading.current_thread()

    assert load(gw, "v1", gw.adapter_dir("v1")).status_code == 201
    gw.engine.loaded.clear()  # the engine restarted: the reconcile loads it again
    gw.run(gw.gateway.adapters.reconcile)

    assert "v1" in gw.engine.loaded
    assert hashed_on and gw.run(loop_thread) not in hashed_on


# the default roots


def test_the_default_roots_are_the_state_dir_s_adapters_and_training_and_the_cache(
    tmp_path,
) -> None:
    settings = Settings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    assert adapter_roots(settings) == [
        tmp_path / "state" / "adapters",
        tmp_path / "state" / "training",  # where the daemon's candidates are written
        tmp_path / "cache",  # the identity adapter
    ]
    pinned = Settings(state_dir=tmp_path, gateway={"adapter_roots": ["/srv/adapters"]})
    assert adapter_roots(pinned) == [Path("/srv/adapters")]


def test_the_daemon_s_own_candidates_are_inside_the_default_roots(tmp_path) -> None:
    settings = Settings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    candidate = job_dir(retrain_config(settings, tmp_path / "model"), 7) / "adapter"
    assert any(candidate.is_relative_to(root) for root in adapter_roots(settings))


@pytest.mark.parametrize("root", ["", "relative/dir"])
def test_a_root_must_be_an_absolute_path(tmp_path, root: str) -> None:
    with pytest.raises(ValueError, match="absolute"):
        Settings(state_dir=tmp_path, gateway={"adapter_roots": [root]})
