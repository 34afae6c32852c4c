"""Windows of traffic: the exchanges the monitor judges, as plain values read from the store.

A window is the last N exchanges of one adapter (the current window) or its first N, or
the data it was trained on (the reference window). Every analysis module takes windows,
never the store, so each can be tested on lists built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

AnswerMetric = Literal["exact_match", "chrf", "rouge_l"]  # a score of one answer, in [0, 1]


@dataclass(frozen=True)
class ExchangeView:
    """One exchange as the monitor reads it, with the newest reference and rating posted for it."""

    id: str
    created_at: datetime
    adapter: str
    route: str
    prompt: str
    response: str | None
    completion_tokens: int | None
    mean_logprob: float | None
    latency_seconds: float
    status: str  # ok | error | cancelled | interrupted
    reference: str | None = None
    rating: float | None = None
    parent_id: str | None = None  # a shadow replay: the exchange it mirrored

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def interrupted(self) -> bool:
        """Cut short by the gateway's shutdown: neither an answer nor an error of the adapter."""
        return self.status == "interrupted"


@dataclass(frozen=True)
class Window:
    adapter: str
    exchanges: tuple[ExchangeView, ...]

    def __len__(self) -> int:
        return len(self.exchanges)

    def answered(self) -> list[ExchangeView]:
        """Exchanges that produced an answer (errors are counted, not scored)."""
        return [e for e in self.exchanges if e.ok and e.response is not None]

    def labelled(self) -> list[ExchangeView]:
        """Answered exchanges with a reference: what quality and calibration can judge."""
        return [e for e in self.answered() if e.reference is not None]
