"""The rollouts' Prometheus metrics, declared once; exported on the monitor sidecar's /metrics
(the process that runs the scheduler and so the rollout job). Labels stay bounded:
`adapter` is a registered adapter, `stage`, `guard`, `side` and `outcome` come from fixed
lists.
"""

from typing import Any

from prometheus_client import Counter, Gauge

from monitor.exporter import set_or_remove
from rollout.guards.types import Judgement

REGISTRY_ADAPTERS = Gauge(
    "tunewatch_registry_adapters", "Registered adapter versions, by status.", ["status"]
)

STAGES = ("shadow", "canary", "paused", "promoted", "rolled_back")
ROLLOUT_STAGE = Gauge(
    "tunewatch_rollout_stage",
    "1 for the stage the candidate's rollout is in, 0 for the others (one-hot).",
    ["adapter", "stage"],
)
CANARY_WEIGHT = Gauge(
    "tunewatch_canary_weight_ratio", "Share of users the candidate answers.", ["adapter"]
)
GUARD_PASSED = Gauge(
    "tunewatch_rollout_guard_passed",
    "1 if the guard passed at the last look, 0 if it failed; absent while inconclusive.",
    ["adapter", "guard"],
)
ROLLOUT_ENDS = Counter(
    "tunewatch_rollouts_total",
    "Rollouts that ended, by outcome (promoted, rolled_back).",
    ["outcome"],
)
SHADOW_AGREEMENT = Gauge(
    "tunewatch_shadow_agreement_ratio",
    "Mean chrF/100 between the candidate's shadow answers and the primary's.",
    ["adapter"],
)
ROLLOUT_QUALITY = Gauge(
    "tunewatch_rollout_quality_ratio",
    "Mean paired quality score (0-1) of each side over the rollout.",
    ["adapter", "side"],
)
ROLLOUT_LATENCY_P95 = Gauge(
    "tunewatch_rollout_latency_p95_seconds",
    "95th-percentile latency of each side over the rollout.",
    ["adapter", "side"],
)


# Each known label value starts at 0: the first event is then an increase Prometheus sees.
for _outcome in ("promoted", "rolled_back"):
    ROLLOUT_ENDS.labels(_outcome)


def publish_registry(counts: dict[str, int]) -> None:
    for status, count in counts.items():
        REGISTRY_ADAPTERS.labels(status).set(count)


def publish_rollout(adapter: str, stage: str, weight: float) -> None:
    for each in STAGES:
        ROLLOUT_STAGE.labels(adapter, each).set(int(each == stage))
    CANARY_WEIGHT.labels(adapter).set(weight)


def publish_look(adapter: str, judgement: Judgement, figures: dict[str, Any]) -> None:
    """A look's figures: the guards' verdicts and the comparison behind them."""
    for result in judgement.results:
        verdict = {"pass": 1.0, "fail": 0.0}.get(result.verdict)
        set_or_remove(GUARD_PASSED, (adapter, result.name), verdict)
    set_or_remove(SHADOW_AGREEMENT, (adapter,), figures.get("agreement"))
    for side in ("candidate", "primary"):
        set_or_remove(ROLLOUT_QUALITY, (adapter, side), figures.get(f"quality_{side}"))
        set_or_remove(ROLLOUT_LATENCY_P95, (adapter, side), figures.get(f"latency_p95_{side}"))
