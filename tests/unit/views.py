"""Exchanges as the monitor reads them, built by hand for the analysis tests."""

from datetime import UTC, datetime
from typing import Any

from monitor.window import ExchangeView


def exchange_view(**fields: Any) -> ExchangeView:
    """An answered, unlabelled exchange; `fields` override any part of it."""
    defaults: dict[str, Any] = dict(
        id="x",
        created_at=datetime(2026, 11, 1, tzinfo=UTC),
        adapter="a",
        route="primary",
        prompt="q",
        response="An answer.",
        completion_tokens=None,
        mean_logprob=None,
        latency_seconds=0.1,
        status="ok",
    )
    return ExchangeView(**(defaults | fields))
