"""The adapter registry: version names, lineage and status changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.versions import (
    RegistryError,
    family_of,
    next_version,
    register,
    set_status,
    status_counts,
    versions,
)
from serving.engine import InvalidAdapterError
from store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'registry.db'}")


def lora_dir(root: Path, name: str, weights: bytes = b"w") -> Path:
    path = root / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_the_first_version_of_a_family_is_v1(store: Store) -> None:
    assert next_version(store, "support") == "support-v1"


def test_versions_count_up_and_a_number_is_never_reused(store: Store, tmp_path: Path) -> None:
    first = register(store, "support", lora_dir(tmp_path, "a", b"1"), reason="test")
    second = register(store, "support", lora_dir(tmp_path, "b", b"2"), reason="test")
    set_status(store, first.name, "failed", reason="rolled back")
    assert (first.name, second.name) == ("support-v1", "support-v2")
    assert next_version(store, "support") == "support-v3"


def test_a_family_is_not_confused_with_a_longer_one(store: Store, tmp_path: Path) -> None:
    register(store, "support-eu", lora_dir(tmp_path, "a"), reason="test")
    assert next_version(store, "support") == "support-v1"
    assert family_of("support-eu-v7") == "support-eu"


def test_a_new_version_is_a_candidate_with_its_lineage(store: Store, tmp_path: Path) -> None:
    version = register(
        store, "support", lora_dir(tmp_path, "a"), parent="support-v0", job_id=None,
        hyperparameters={"r": 8}, metrics={"exact_match": 0.7}, data={"train": 40},
        reason="drift",
    )  # fmt: skip
    [stored] = versions(store)
    assert stored == version
    assert (stored.status, stored.parent, stored.metrics) == (
        "candidate", "support-v0", {"exact_match": 0.7},
    )  # fmt: skip
    assert store.events(kind="adapter.registered")[0].subject == "support-v1"


def test_a_new_version_is_not_loaded_until_its_rollout_loads_it(
    store: Store, tmp_path: Path
) -> None:
    register(store, "support", lora_dir(tmp_path, "a"), reason="test")
    assert [a.loaded for a in store.adapters()] == [False]


def test_a_directory_that_is_not_a_lora_adapter_is_refused(store: Store, tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError):
        register(store, "support", tmp_path / "missing", reason="test")
    assert versions(store) == []


def test_a_status_change_is_an_event_with_its_reason(store: Store, tmp_path: Path) -> None:
    register(store, "support", lora_dir(tmp_path, "a"), reason="test")
    set_status(store, "support-v1", "shadow", reason="rollout started")
    [event] = store.events(kind="adapter.status")
    assert (event.reason, event.data) == ("rollout started", {"from": "candidate", "to": "shadow"})


def test_an_unknown_status_or_adapter_is_refused(store: Store, tmp_path: Path) -> None:
    register(store, "support", lora_dir(tmp_path, "a"), reason="test")
    with pytest.raises(RegistryError, match="status 'live'"):
        set_status(store, "support-v1", "live", reason="x")  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="no adapter named 'nope-v1'"):
        set_status(store, "nope-v1", "failed", reason="x")


def test_a_family_name_with_a_slash_is_refused(store: Store) -> None:
    with pytest.raises(RegistryError, match="adapter family"):
        next_version(store, "a/b")


def test_status_counts_name_every_status(store: Store, tmp_path: Path) -> None:
    for name in ("a", "b"):
        register(
            store, "support", lora_dir(tmp_path, name), parent=None, job_id=None,
            hyperparameters={}, metrics={}, data={}, reason="test",
        )  # fmt: skip
    set_status(store, "support-v1", "failed", "test")
    counts = status_counts(store)
    assert (counts["candidate"], counts["failed"], counts["primary"]) == (1, 1, 0)
