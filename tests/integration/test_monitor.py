"""The monitor sidecar under `tunewatch up`: golden runs judged, figures on /metrics, scraped by a
real Prometheus and answered by PromQL."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.realstack import SERVED_NAME, Stack, traffic, wait_until

pytestmark = pytest.mark.slow


def monitor_samples(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{stack.monitor_url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(stack: Stack, name: str, **labels: str) -> float | None:
    return monitor_samples(stack).get((name, tuple(sorted(labels.items()))))


def labelled(stack: Stack) -> float | None:
    return sample(stack, "tunewatch_window_exchanges", adapter="base", window="labelled")


def test_golden_runs_are_recorded_with_references_and_scored(running_stack: Stack):
    wait_until(
        lambda: labelled(running_stack) == 2,
        timeout_s=240, what="the two golden answers judged",
    )  # fmt: skip
    chrf = sample(running_stack, "tunewatch_quality_chrf", adapter="base")
    assert chrf is not None and 0 <= chrf <= 100
    assert sample(running_stack, "tunewatch_monitor_check_ok", adapter="base", check="quality") == 1
    [event] = running_stack.store.events(kind="golden.run")
    assert event.subject == "base" and event.reason.startswith("2 of 2")


def test_feedback_on_live_traffic_is_judged_too(running_stack: Stack):
    client = openai.OpenAI(base_url=f"{running_stack.gateway_url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6, temperature=0,
    )  # fmt: skip
    answer = raw.parse().choices[0].message.content
    httpx.post(
        f"{running_stack.gateway_url}/v1/feedback",
        json={"exchange_id": raw.headers["x-tunewatch-exchange-id"], "reference": answer},
    ).raise_for_status()
    wait_until(
        lambda: labelled(running_stack) == 3,
        timeout_s=60, what="the labelled live exchange judged",
    )  # fmt: skip
    assert sample(running_stack, "tunewatch_response_mean_logprob", adapter="base") < 0


def test_promtool_finds_both_metrics_endpoints_clean(running_stack: Stack):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make system-deps`"
    for url in (running_stack.gateway_url, running_stack.monitor_url):
        exposition = httpx.get(f"{url}/metrics", timeout=10).text
        result = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{url}: {result.stdout}{result.stderr}"


def test_a_topic_shift_is_a_drift_verdict_answered_by_promql(running_stack: Stack, prometheus):
    now = datetime.now(UTC)
    reference = traffic("taxes", 250, now - timedelta(days=1))
    # The current window, ending now: traffic dated in the future would stay the newest for
    # minutes and count as live traffic in whatever the later tests measure.
    current = traffic("gardening", 200, now - timedelta(seconds=200))
    # One transaction: a drift check between two writes would judge a window of taxes, and
    # its verdict (no drift) would be the first one Prometheus shows.
    running_stack.store.record_exchanges(reference + current)
    wait_until(
        lambda: bool(query(prometheus, 'tunewatch_drift_share_ratio{adapter="base"}')),
        timeout_s=240, what="tunewatch_drift_share_ratio in Prometheus",
    )  # fmt: skip
    [embedding] = query(
        prometheus, 'tunewatch_drift_detected{adapter="base", column="prompt_embedding"}'
    )
    assert embedding["value"][1] == "1"
    verdicts = running_stack.store.events(kind="drift.verdict", subject="base")
    assert verdicts[0].reason.startswith("drift: ") and "prompt_embedding" in verdicts[0].reason


def query(prometheus: str, expression: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}).json()
    return answer["data"]["result"]


def test_prometheus_scrapes_the_sidecar_and_promql_answers(running_stack: Stack, prometheus: str):
    for expression in (
        'tunewatch_quality_chrf{adapter="base"}',
        'tunewatch_response_mean_logprob{adapter="base"}',
        'sum by (adapter) (tunewatch_request_duration_seconds_count{route="primary"})',
    ):
        wait_until(lambda e=expression: bool(query(prometheus, e)), 30, f"PromQL {expression}")
