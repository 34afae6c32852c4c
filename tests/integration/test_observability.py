"""The shipped boards and rules on a real Prometheus, scraping the real stack during a rollout.

`tunewatch up` runs Prometheus (Debian's package) with the shipped rule files, scraping the
gateway, the monitor and vLLM. While users ask and post references, a drift is seeded and a
candidate is rolled out; then every query of every board (Grafana's variables substituted)
and every rule goes through Prometheus's HTTP API. Each must evaluate, and each panel must
return data, but for the ones that only show events that this run does not cause (a
training job ending, a retrain; a guard's verdict, absent while inconclusive).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest

import dashboards
from dashboards.common import AFTER_ROLLOUT
from tests.integration.realstack import (
    SERVED_NAME,
    Stack,
    Users,
    add_candidate,
    lora_adapter,
    rollout_of,
    stage_is,
    traffic,
    wait_until,
)

pytestmark = pytest.mark.slow

RATE_INTERVAL = "30s"  # Grafana's $__rate_interval at a 1 s scrape, with room for slow scrapes


def query(prometheus: str, expression: str) -> dict:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=30)
    return answer.json()


def results(prometheus: str, expression: str) -> list[dict]:
    answer = query(prometheus, expression)
    assert answer["status"] == "success", f"{expression}: {answer.get('error')}"
    return answer["data"]["result"]


def must_show_data(panel: dashboards.PanelQuery) -> bool:
    """During a rollout, every panel but those waiting for an event this run does not cause."""
    return panel.only_after in (None, AFTER_ROLLOUT)


def ask_streaming(stack: Stack, count: int) -> None:
    """Streamed answers: the time-to-first-token panels have nothing else to draw."""
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", timeout=120)
    for _ in range(count):
        stream = client.chat.completions.create(
            model=SERVED_NAME, max_tokens=8, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Name a colour."}],
        )  # fmt: skip
        for _chunk in stream:
            pass


def test_every_panel_and_rule_evaluates_during_a_rollout(
    running_stack: Stack, prometheus: str, model_dir: Path, tmp_path: Path, users: Users
):
    stack = running_stack
    now = datetime.now(UTC)
    stack.store.record_exchanges(
        traffic("taxes", 250, now - timedelta(days=1))
        + traffic("gardening", 200, now - timedelta(seconds=200))
    )
    name = add_candidate(stack, lora_adapter(model_dir, tmp_path / "w", seed=11, b_std=0.0), "w")
    wait_until(stage_is(stack, name, "canary", "promoted"), 300, f"{name} in canary")
    ask_streaming(stack, 3)

    panels = dashboards.panel_queries(rate_interval=RATE_INTERVAL)
    required = [p for p in panels if must_show_data(p)]
    empty = list(required)

    def all_show_data() -> bool:
        empty[:] = [p for p in empty if not results(prometheus, p.expr)]
        return not empty

    try:
        wait_until(all_show_data, 180, "every panel showing data", interval_s=3)
    except TimeoutError:
        pytest.fail("panels without data:\n" + "\n".join(f"{p.board} / {p.panel}: {p.expr}"
                                                         for p in empty))  # fmt: skip
    for panel in panels:  # the event-only ones too: each must parse and evaluate
        results(prometheus, panel.expr)
    for panel in panels:  # what the two boards a person opens first showed (pytest -s)
        if panel.board.endswith(("Overview", "Loop")):
            shown = [(_labels(r["metric"]), r["value"][1]) for r in results(prometheus, panel.expr)]
            print(f"{panel.board} / {panel.panel}: {shown}")
    files = {group["file"].rsplit("/", 1)[-1] for group in _rule_groups(prometheus)}
    assert files >= {"tunewatch.rules.yml", "recording.rules.yml"}
    wait_until(lambda: all(r["health"] == "ok" for r in _rules(prometheus)), 30, "rules evaluated")
    for rule in _rules(prometheus):  # a rule's health says it ran; its query must answer too
        results(prometheus, rule["query"])
    firing = {a["labels"]["alertname"] for a in _alerts(prometheus) if a["state"] == "firing"}
    assert "Watchdog" in firing

    view = rollout_of(stack, name)
    assert view is not None
    if view.stage == "canary":
        with stack.admin as admin:
            admin.post("/admin/rollouts/current/rollback").raise_for_status()
    wait_until(stage_is(stack, name, "promoted", "rolled_back"), 120, f"{name} ended")
    outcome = "Promotions" if rollout_of(stack, name).stage == "promoted" else "Rollbacks"
    [marked] = [p for p in panels if p.board.endswith("Loop") and p.panel == outcome]
    wait_until(lambda: bool(results(prometheus, marked.expr)), 30, f"the {outcome} annotation")


def _rule_groups(prometheus: str) -> list[dict]:
    return httpx.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]


def _rules(prometheus: str) -> list[dict]:
    return [rule for group in _rule_groups(prometheus) for rule in group["rules"]]


def _alerts(prometheus: str) -> list[dict]:
    return httpx.get(f"{prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]


def _labels(metric: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metric.items() if k not in ("__name__", "instance")}
