"""`tunewatch status`: the current picture per adapter, as a table for people at a terminal."""

from __future__ import annotations

from rich.table import Table

from monitor.calibration import calibration
from monitor.quality import quality
from monitor.signals import signals
from monitor.traffic import adapter_labels, read_window, with_goldens
from serving.exchange import BASE_LABEL
from store import Store
from store.adapters import RoutingTable


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def status_table(
    store: Store, base_adapter: str | None, window_size: int, correct_rouge_l: float
) -> Table:
    routing = store.routing_table() or RoutingTable()
    roles = {  # later entries win: a rollout's candidate is both shadow and canary
        routing.shadow: "shadow",
        routing.canary: "canary",
        routing.primary or BASE_LABEL: "primary",
    }
    table = Table(title=f"tunewatch: last {window_size} exchanges per adapter")
    for column in (
        "adapter",
        "role",
        "exchanges",
        "errors",
        "p50 s",
        "p95 s",
        "mean logprob",
        "labelled",
        "chrF",
        "exact match",
        "ECE",
        "last drift verdict",
    ):
        table.add_column(column, justify="left" if column in ("adapter", "role") else "right")
    for adapter in adapter_labels(store, base_adapter):
        live = read_window(store, adapter, window_size)
        judged = with_goldens(store, live, window_size)
        traffic, scores = signals(live), quality(judged)
        ece = calibration(judged, threshold=correct_rouge_l, pairs=scores.pairs).ece
        drift = store.events(kind="drift.verdict", limit=1, subject=adapter)
        table.add_row(
            adapter,
            roles.get(adapter, ""),
            str(traffic.n),
            _fmt(traffic.error_rate, ".1%"),
            _fmt(traffic.latency_p50_seconds, ".2f"),
            _fmt(traffic.latency_p95_seconds, ".2f"),
            _fmt(traffic.mean_logprob),
            str(scores.n),
            _fmt(scores.chrf, ".1f"),
            _fmt(scores.exact_match_ratio, ".1%"),
            _fmt(ece),
            drift[0].reason if drift else "-",
        )
    return table
