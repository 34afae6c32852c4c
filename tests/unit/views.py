"""Exchanges built by hand: as the monitor reads them (analysis tests) and as the store holds
them (plumbing tests)."""

from datetime import UTC, datetime, timedelta
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


T0 = datetime(2026, 11, 1, tzinfo=UTC)


def exchange_record(n: int, adapter: str = "base", route: str = "primary", **fields: Any) -> dict:
    """The store row of the n-th exchange (one second apart); `fields` override any part."""
    return dict(
        id=f"x{n:04d}", created_at=T0 + timedelta(seconds=n), route=route, adapter=adapter,
        parent_id=None, endpoint="chat.completions", user=None, prompt=f"prompt {n}",
        request={}, response=f"answer {n}", prompt_tokens=5, completion_tokens=3,
        ttft_seconds=None, latency_seconds=0.5, mean_logprob=-0.2, finish_reason="stop",
        status="ok", http_status=200, error=None,
    ) | fields  # fmt: skip
