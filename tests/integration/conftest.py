"""Fixtures of the integration tests: the prepared model, real LoRA adapters, the running stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from store import Store
from tests.integration.realstack import (
    ADMIN_TOKEN,
    Stack,
    Users,
    lora_adapter,
    wait_until,
)
from tests.ports import free_ports
from tunewatch import stack
from tunewatch.settings import load_settings


@pytest.fixture(scope="session")
def model_dir() -> Path:
    model, _ = stack.prepare(load_settings())
    return model


@pytest.fixture(scope="session")
def lora_adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [lora_adapter(model_dir, root / f"lora-{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def running_stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`tunewatch up` in a child process, on free ports, with its own state dir and SQLite store."""
    state_dir = tmp_path_factory.mktemp("state")
    gateway_port, engine_port, monitor_port, prometheus_port = free_ports(4)
    golden_set = state_dir / "goldens.jsonl"  # small: its run competes with the tests for vLLM
    golden_set.write_text(
        '{"prompt": "What is the capital of France? One word.", "reference": "Paris"}\n'
        '{"prompt": "What is the capital of Japan? One word.", "reference": "Tokyo"}\n'
    )
    env = dict(
        os.environ,
        TUNEWATCH_STATE_DIR=str(state_dir),
        TUNEWATCH_GATEWAY__PORT=str(gateway_port),
        TUNEWATCH_GATEWAY__ADMIN_TOKEN=ADMIN_TOKEN,
        TUNEWATCH_GATEWAY__RECONCILE_INTERVAL_S="2",
        # The tests' adapters are written under pytest's temporary directories.
        TUNEWATCH_GATEWAY__ADAPTER_ROOTS=json.dumps([str(tmp_path_factory.getbasetemp())]),
        TUNEWATCH_ENGINE__PORT=str(engine_port),
        TUNEWATCH_MONITOR__PORT=str(monitor_port),
        TUNEWATCH_MONITOR__QUALITY_INTERVAL_S="5",
        TUNEWATCH_MONITOR__GOLDEN_SET=str(golden_set),
        TUNEWATCH_MONITOR__GOLDEN_INTERVAL_S="3600",
        TUNEWATCH_MONITOR__DRIFT_INTERVAL_S="5",
        TUNEWATCH_MONITOR__REFERENCE_SIZE="250",
        # Judged at the shipped thresholds, which the monitor tests' seeded drift is sized for;
        # the fit on a full reference runs in the retraining loop's daemon (test_retrain_loop.py).
        TUNEWATCH_MONITOR__FIT_THRESHOLDS="false",
        TUNEWATCH_MONITOR__LEASE_TTL_S="6",  # a killed monitor's successor leads within 6 s
        # The drift the monitor tests seed must not start a retrain (and then a rollout) under
        # the other tests: the retraining loop has its own daemon (test_retrain_loop.py). The
        # trigger still judges every check (its decisions are on the boards), never enough labels.
        TUNEWATCH_RETRAIN__TRIGGER_INTERVAL_S="2",
        TUNEWATCH_RETRAIN__MIN_NEW_LABELLED="1000000000",
        # Rollouts sized for a test (tests/integration/test_rollout.py), not for production.
        TUNEWATCH_ROLLOUT__INTERVAL_S="1",
        TUNEWATCH_ROLLOUT__STEPS="[0.5, 1.0]",
        TUNEWATCH_ROLLOUT__SHADOW_MIN_PAIRS="6",
        TUNEWATCH_ROLLOUT__STEP_MIN_SAMPLES="3",
        TUNEWATCH_ROLLOUT__STAGE_MIN_S="10",  # the kill -9 lands mid-step
        TUNEWATCH_ROLLOUT__MIN_SAMPLES="20",
        TUNEWATCH_ROLLOUT__DRAIN_S="3",
        # The Prometheus `tunewatch up` runs, as `make up` has it, scraping every second.
        TUNEWATCH_PROMETHEUS__PORT=str(prometheus_port),
        TUNEWATCH_PROMETHEUS__SCRAPE_INTERVAL_S="1",
    )
    log_file = state_dir / "tunewatch.log"
    with log_file.open("wb") as sink:
        tunewatch = str(Path(sys.executable).parent / "tunewatch")
        process = subprocess.Popen([tunewatch, "up"], env=env, stdout=sink, stderr=sink)
    result = Stack(
        process=process,
        gateway_url=f"http://127.0.0.1:{gateway_port}",
        engine_url=f"http://127.0.0.1:{engine_port}",
        monitor_url=f"http://127.0.0.1:{monitor_port}",
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
        store=Store(f"sqlite:///{state_dir / 'tunewatch.db'}"),
        log_file=log_file,
        state_dir=state_dir,
    )
    try:
        wait_until(
            lambda: process.poll() is None and result.ready() or process.poll() is not None,
            timeout_s=600, what="tunewatch up ready",
        )  # fmt: skip
        assert process.poll() is None, f"tunewatch up exited:\n{log_file.read_text()[-4000:]}"
        yield result
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        result.store.close()


@pytest.fixture(scope="session")
def prometheus(running_stack: Stack) -> str:
    """The real Prometheus (Debian's package) that `tunewatch up` runs with the shipped rules,
    scraping the gateway, the monitor and vLLM every second."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make system-deps` (Debian package)")
    wait_until(lambda: _ready(f"{running_stack.prometheus_url}/-/ready"), 60, "prometheus ready")
    return running_stack.prometheus_url


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def users(running_stack: Stack) -> Iterator[Users]:
    load = Users(running_stack)
    load.start()
    try:
        yield load
    finally:
        load.stop.set()
        load.join(timeout=180)
        with running_stack.admin as admin:  # the other tests expect the base model as primary
            admin.put("/admin/routing", json={}).raise_for_status()
