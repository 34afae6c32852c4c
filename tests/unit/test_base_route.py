"""How `tunewatch up` chooses the base model's road: the engine's own base model once the
engine it launched confirms the LoRA fix, the identity adapter otherwise."""

from __future__ import annotations

import json
import time
from pathlib import Path

from serving import vllm_plugin
from store.adapters import RoutingTable
from tunewatch.settings import Settings
from tunewatch.stack import choose_base_route, engine_launch


def launch_in(tmp_path: Path):
    return engine_launch(Settings(state_dir=tmp_path), tmp_path / "model")


def test_the_engine_is_told_where_to_write_the_marker(tmp_path: Path) -> None:
    launch = launch_in(tmp_path)
    assert launch.environment()[vllm_plugin.MARKER_ENV] == str(launch.lora_fix_marker)
    assert launch.lora_fix_marker.parent == tmp_path


def test_a_confirmed_fix_sends_the_base_to_the_engines_base_model(gw, tmp_path: Path) -> None:
    launch, started = launch_in(tmp_path), time.time()
    line = {"pid": 1, "time": time.time(), "applied": True, "reason": "applied"}
    launch.lora_fix_marker.write_text(json.dumps(line) + "\n")
    gw.run(choose_base_route, gw.gateway, launch, started)
    assert gw.gateway.adapters.resolve(None) == launch.served_model_name


def test_an_unconfirmed_fix_keeps_the_identity_adapter(gw, tmp_path: Path) -> None:
    gw.gateway.adapters.serve_base_through(gw.served_model_name)  # as before a restart
    gw.run(choose_base_route, gw.gateway, launch_in(tmp_path), time.time())
    assert gw.gateway.adapters.resolve(None) == gw.base_adapter


def test_a_confirmed_fix_is_not_used_unless_the_settings_allow_it(gw, tmp_path: Path) -> None:
    launch, started = launch_in(tmp_path), time.time()
    line = {"pid": 1, "time": time.time(), "applied": True, "reason": "applied"}
    launch.lora_fix_marker.write_text(json.dumps(line) + "\n")
    gw.gateway.adapters.serve_base_through(gw.served_model_name)
    gw.run(choose_base_route, gw.gateway, launch, started, False)
    assert gw.gateway.adapters.resolve(None) == gw.base_adapter


def test_the_base_takes_the_lora_road_while_a_rollout_compares_a_candidate_with_it(gw) -> None:
    adapters = gw.gateway.adapters
    adapters.serve_base_through(gw.served_model_name)
    for during in (
        RoutingTable(shadow="cand", shadow_fraction=0.5),
        RoutingTable(canary="cand", canary_weight=0.25, shadow="cand", shadow_fraction=0.5),
    ):
        adapters._use_routing(during)
        assert adapters.resolve(None) == gw.base_adapter, during
    adapters._use_routing(RoutingTable(primary="cand"))  # promoted: nothing compared
    assert adapters.resolve(None) == gw.served_model_name
    assert adapters.resolve("cand") == "cand"
