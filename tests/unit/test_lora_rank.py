"""The engine's --max-lora-rank under `tunewatch up`: the smallest vLLM takes that holds the
adapters loaded at start and those the trainer makes, unless the settings pin it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunewatch.settings import Settings, SettingsError, load_settings
from tunewatch.stack import engine_launch, max_lora_rank


def adapter(root: Path, name: str, r: int, rank_pattern: dict[str, int] | None = None) -> Path:
    directory = root / name
    directory.mkdir()
    config = {"peft_type": "LORA", "r": r, "rank_pattern": rank_pattern or {}}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def rank_of(settings: Settings, adapters: list[Path]) -> int:
    return max_lora_rank(settings, adapters)[0]


def test_with_no_adapter_the_rank_is_the_trainers(tmp_path: Path) -> None:
    assert rank_of(Settings(), []) == 8


def test_the_largest_adapter_at_start_sets_the_rank(tmp_path: Path) -> None:
    adapters = [adapter(tmp_path, "a", 8), adapter(tmp_path, "b", 16)]
    rank, why = max_lora_rank(Settings(), adapters)
    assert rank == 16
    assert str(adapters[1]) in why


def test_a_rank_vllm_does_not_take_is_rounded_up_to_one_it_does(tmp_path: Path) -> None:
    assert rank_of(Settings(), [adapter(tmp_path, "a", 12)]) == 16
    assert rank_of(Settings(), [adapter(tmp_path, "b", 4)]) == 8  # the trainer's 8


def test_a_rank_pattern_counts_as_vllm_counts_it(tmp_path: Path) -> None:
    assert rank_of(Settings(), [adapter(tmp_path, "a", 8, {"q_proj": 32})]) == 32


def test_the_configured_training_rank_gets_room(tmp_path: Path) -> None:
    settings = Settings(retrain={"training": {"rank": 32}})
    assert rank_of(settings, [adapter(tmp_path, "a", 8)]) == 32


def test_a_rank_search_gets_room_for_its_largest_rank() -> None:
    assert rank_of(Settings(retrain={"hpo_trials": 4}), []) == 16


def test_a_bad_training_rank_is_left_to_the_monitor_to_refuse() -> None:
    assert rank_of(Settings(retrain={"training": {"rank": "eight"}}), []) == 8


def test_an_unreadable_adapter_needs_no_room(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    assert rank_of(Settings(), [broken, tmp_path / "missing"]) == 8


def test_a_pinned_rank_is_kept_whatever_the_adapters(tmp_path: Path) -> None:
    settings = Settings(engine={"max_lora_rank": 64})
    assert max_lora_rank(settings, [adapter(tmp_path, "a", 128)]) == (64, "engine.max_lora_rank")


def test_a_rank_over_vllms_largest_is_refused_with_its_adapter(tmp_path: Path) -> None:
    huge = adapter(tmp_path, "huge", 1024)
    with pytest.raises(SettingsError, match=f"LoRA rank 1024 \\({huge}\\).*512"):
        max_lora_rank(Settings(), [huge])


def test_the_settings_refuse_a_rank_vllm_does_not_take(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("engine:\n  max_lora_rank: 12\n")
    with pytest.raises(SettingsError, match=r"engine.max_lora_rank: .*1, 8, 16, 32.* \(got 12\)"):
        load_settings(config)


def test_the_engine_is_launched_with_the_derived_rank(tmp_path: Path) -> None:
    launch = engine_launch(Settings(), tmp_path / "model", [adapter(tmp_path, "a", 16)])
    flags = launch.command()
    assert flags[flags.index("--max-lora-rank") + 1] == "16"
