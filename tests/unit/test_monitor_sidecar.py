"""The monitor's plumbing: traffic windows, golden sets, the exporter, one check pass."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from monitor import exporter
from monitor.drift import DriftConfig
from monitor.goldens import GoldenExample, GoldenSetError, load_golden_set, run_golden_set
from monitor.sidecar import Monitor, MonitorConfig
from monitor.traffic import read_window
from serving.engine import EngineClient
from store import Store
from tests.unit.views import exchange_record as exchange


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'monitor.db'}")


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_window_is_the_newest_exchanges_of_one_adapter_oldest_first(store: Store) -> None:
    store.record_exchanges([exchange(n) for n in range(10)] + [exchange(99, adapter="v1")])
    window = read_window(store, "base", 4)
    assert [e.id for e in window.exchanges] == ["x0006", "x0007", "x0008", "x0009"]


def test_a_reference_window_is_the_oldest_exchanges(store: Store) -> None:
    store.record_exchanges([exchange(n) for n in range(10)])
    assert [e.id for e in read_window(store, "base", 3, newest=False).exchanges] == [
        "x0000", "x0001", "x0002",
    ]  # fmt: skip


def test_golden_runs_stay_out_of_live_windows(store: Store) -> None:
    store.record_exchanges([exchange(1), exchange(2, route="golden")])
    assert [e.id for e in read_window(store, "base", 10).exchanges] == ["x0001"]
    assert [e.id for e in read_window(store, "base", 10, routes=("golden",)).exchanges] == ["x0002"]


def test_the_newest_reference_and_rating_are_attached_even_when_posted_apart(store: Store) -> None:
    store.record_exchanges([exchange(1)])
    store.add_feedback("x0001", "old reference", None)
    store.add_feedback("x0001", "new reference", None)
    store.add_feedback("x0001", None, 0.5)
    [view] = read_window(store, "base", 10).exchanges
    assert (view.reference, view.rating) == ("new reference", 0.5)


def test_a_golden_set_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "a", "reference": "b"}\n\n{broken\n')
    with pytest.raises(GoldenSetError, match=r"g\.jsonl:3: not valid JSON"):
        load_golden_set(path)


def test_a_golden_set_line_without_a_reference_is_named(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(GoldenSetError, match=r"g\.jsonl:1: needs"):
        load_golden_set(path)


def test_the_shipped_golden_set_loads() -> None:
    from monitor.goldens import DEFAULT_GOLDEN_SET

    assert len(load_golden_set(DEFAULT_GOLDEN_SET)) >= 20


def _engine_answering(text: str, fail_model: str | None = None) -> EngineClient:
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["model"] == fail_model:
            return httpx.Response(404, json={"error": {"message": "no such model"}})
        assert body["logprobs"] is True
        return httpx.Response(200, json={
            "choices": [{"message": {"role": "assistant", "content": text},
                         "logprobs": {"content": [{"token": text, "logprob": -0.1}]},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1},
        })  # fmt: skip

    return EngineClient("http://engine", transport=httpx.MockTransport(handle))


async def test_a_golden_run_records_answers_as_golden_exchanges_with_references(store: Store):
    engine = _engine_answering("Paris")
    examples = [GoldenExample("Capital of France?", "Paris")]
    [run] = await run_golden_set(engine, store, examples, {None: "identity"})
    assert (run.adapter, run.answered, run.failed) == ("base", 1, 0)
    [view] = read_window(store, "base", 10, routes=("golden",)).exchanges
    assert (view.response, view.reference, view.mean_logprob) == ("Paris", "Paris", -0.1)


async def test_a_golden_run_against_a_missing_adapter_is_recorded_as_failed(store: Store):
    engine = _engine_answering("Paris", fail_model="v9")
    runs = await run_golden_set(engine, store, [GoldenExample("q", "a")], {"v9": "v9"})
    assert (runs[0].answered, runs[0].failed) == (0, 1)
    assert store.events(kind="golden.run")[0].reason.startswith("0 of 1")


def test_a_value_that_cannot_be_computed_is_removed_not_zeroed() -> None:
    exporter.set_or_remove(exporter.QUALITY_BLEU, ("gone-v1",), 12.5)
    assert sample("tunewatch_quality_bleu", adapter="gone-v1") == 12.5
    exporter.set_or_remove(exporter.QUALITY_BLEU, ("gone-v1",), None)
    assert sample("tunewatch_quality_bleu", adapter="gone-v1") is None


def test_one_check_pass_exports_signals_quality_and_calibration(store: Store) -> None:
    store.register_adapter("tw-check-v1", "/adapters/v1", "f" * 64)
    store.record_exchanges([exchange(n, adapter="tw-check-v1", response="Paris") for n in range(6)])
    for n in range(3):
        store.add_feedback(f"x{n:04d}", "Paris", None)
    monitor = make_monitor(store, MonitorConfig())
    monitor.check_quality()
    assert sample("tunewatch_window_exchanges", adapter="tw-check-v1", window="current") == 6
    assert sample("tunewatch_quality_exact_match_ratio", adapter="tw-check-v1") == 1.0
    assert sample("tunewatch_calibration_brier", adapter="tw-check-v1") is not None
    assert sample("tunewatch_monitor_check_ok", adapter="base", check="quality") == 0


def test_the_baseline_is_the_first_labelled_window_and_stays_once_full(store: Store) -> None:
    store.register_adapter("tw-base-v1", "/adapters/v1", "f" * 64)
    answers = ["Paris"] * 4 + ["Lyon"] * 4  # right at first, wrong later
    rows = [exchange(n, adapter="tw-base-v1", response=a) for n, a in enumerate(answers)]
    store.record_exchanges(rows)
    for n in range(8):
        store.add_feedback(f"x{n:04d}", "Paris", None)
    monitor = make_monitor(store, MonitorConfig(window_size=4))
    monitor.check_quality()
    assert sample("tunewatch_quality_exact_match_ratio", adapter="tw-base-v1") == 0.0
    assert sample("tunewatch_quality_baseline_exact_match_ratio", adapter="tw-base-v1") == 1.0
    assert sample("tunewatch_quality_baseline_chrf", adapter="tw-base-v1") == 100.0


def test_each_check_publishes_its_schedule(store: Store) -> None:
    make_monitor(store, MonitorConfig(quality_interval_s=7, drift_interval_s=11)).checks()
    assert sample("tunewatch_monitor_check_interval_seconds", check="quality") == 7
    assert sample("tunewatch_monitor_check_interval_seconds", check="drift") == 11


def make_monitor(store: Store, config: MonitorConfig) -> Monitor:
    return Monitor(store, config, _engine_answering("-"), base_adapter="identity", embed=embed)


def embed(exchanges) -> np.ndarray:
    """Prompts about one topic point one way, the rest another: a cheap stand-in for MiniLM."""
    rng = np.random.default_rng(0)
    vectors = np.array([[1.0, 0.0] if "weather" in e.prompt else [0.0, 1.0] for e in exchanges])
    vectors = vectors + rng.normal(0, 0.05, vectors.shape)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def drift_monitor(store: Store) -> Monitor:
    config = DriftConfig(min_reference=20, min_current=20, embedding_rows=200)
    return make_monitor(store, MonitorConfig(window_size=40, reference_size=60, drift=config))


def test_a_topic_shift_is_a_drift_verdict_recorded_once_with_its_reason(store: Store) -> None:
    store.register_adapter("tw-drift-v1", "/adapters/v1", "d" * 64)
    rows = [
        exchange(n, adapter="tw-drift-v1", prompt=f"tell me about taxes {n}") for n in range(60)
    ]
    rows += [
        exchange(100 + n, adapter="tw-drift-v1", prompt=f"what is the weather {n}")
        for n in range(40)
    ]
    store.record_exchanges(rows)
    monitor = drift_monitor(store)
    monitor.check_drift()
    monitor.check_drift()
    assert sample("tunewatch_drift_detected", adapter="tw-drift-v1", column="prompt_embedding") == 1
    assert sample("tunewatch_drift_dataset_detected", adapter="tw-drift-v1") == 1
    [event] = store.events(kind="drift.verdict", subject="tw-drift-v1")
    assert event.reason.startswith("drift: ") and "prompt_embedding" in event.reason


def test_a_window_too_small_to_judge_is_stale_not_a_verdict(store: Store) -> None:
    store.register_adapter("tw-small-v1", "/adapters/v1", "e" * 64)
    store.record_exchanges([exchange(n, adapter="tw-small-v1") for n in range(10)])
    drift_monitor(store).check_drift()
    assert sample("tunewatch_drift_share_ratio", adapter="tw-small-v1") is None
    assert sample("tunewatch_monitor_check_ok", adapter="tw-small-v1", check="drift") == 0
    [event] = store.events(kind="drift.verdict", subject="tw-small-v1")
    assert event.reason.startswith("not judged")


def test_the_exposition_parses_and_names_follow_prometheus_conventions() -> None:
    from prometheus_client import generate_latest

    families = list(text_string_to_metric_families(generate_latest().decode()))
    ours = [f for f in families if f.name.startswith("tunewatch_")]
    assert ours
    for family in ours:
        assert ":" not in family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
