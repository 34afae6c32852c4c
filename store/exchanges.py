"""Exchanges and their feedback: what the gateway records, and the monitor and the rollouts read.

`Route` names every route an exchange is recorded under: the gateway's (primary, canary,
shadow, pinned), the monitor's golden runs and the trainer's held-out evaluation. `Status`
says how it ended: answered, failed, cancelled by a client that hung up before the answer
ended (with the text it had so far), or interrupted by the gateway's own shutdown before the
engine answered (no fault of the adapter's, so no guard counts it as an error).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    cast,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from store.base import Base, StoreBase, UTCDateTime, utcnow

Route = Literal["primary", "canary", "shadow", "pinned", "golden", "evaluation"]
Status = Literal["ok", "error", "cancelled", "interrupted"]


def new_id() -> str:
    return uuid.uuid4().hex


class Exchange(Base):
    """One request and its answer, as the client saw them (shadow calls are exchanges too)."""

    __tablename__ = "exchanges"
    # Every reader asks for one adapter's exchanges in time order: the newest window, the
    # rollout's since it started, what was written since the last look.
    __table_args__ = (
        Index("ix_exchanges_adapter_created_at", "adapter", "created_at"),
        Index("ix_exchanges_adapter_recorded_at", "adapter", "recorded_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # request arrived
    # When the store wrote it: a reader that follows the table reads from here (ids are
    # random, and `created_at` is the arrival, written a whole request later).
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    route: Mapped[str] = mapped_column(String(16))  # primary | canary | shadow | pinned
    adapter: Mapped[str] = mapped_column(String(128))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("exchanges.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))  # chat.completions | completions
    user: Mapped[str | None] = mapped_column(String(256))
    # Which API key made it (serving.auth.key_id: a hash's first 16 hex, never the key): that
    # key may post its feedback. None: made without one (an open gateway, a golden run).
    api_key_id: Mapped[str | None] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any]]
    response: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    ttft_seconds: Mapped[float | None] = mapped_column(Float)
    latency_seconds: Mapped[float] = mapped_column(Float)
    mean_logprob: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # ok | error | cancelled | interrupted
    http_status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class Feedback(Base):
    """A reference answer and/or a rating posted later for a logged exchange."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exchange_id: Mapped[str] = mapped_column(ForeignKey("exchanges.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # when written
    reference: Mapped[str | None] = mapped_column(Text)
    rating: Mapped[float | None] = mapped_column(Float)


class UnknownExchangeError(LookupError):
    pass


class NotMadeByError(PermissionError):
    """Feedback from an API key for an exchange another key (or none) made."""


class FeedbackLimitError(RuntimeError):
    """The exchange has all the feedback rows it may have."""


class ExchangeRecords(StoreBase):
    """The writes of exchanges and feedback (their reads for analysis: monitor.traffic)."""

    def record_exchanges(self, exchanges: list[dict[str, Any]]) -> None:
        """Insert in the given order (a shadow comes after its parent) in one transaction."""
        with self.engine.begin() as connection:  # Core insert: half the ORM's cost per row
            connection.execute(insert(Exchange.__table__), exchanges)

    def recorded_ids(self, exchange_ids: list[str]) -> set[str]:
        """Those of `exchange_ids` already in the store (a replayed spill skips them)."""
        with self.session() as session:
            query = select(Exchange.id).where(Exchange.id.in_(exchange_ids))
            return set(session.scalars(query))

    def get_exchange(self, exchange_id: str) -> Exchange | None:
        with self.session() as session:
            return session.get(Exchange, exchange_id)

    def count_exchanges(self) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(Exchange)) or 0

    def add_feedback(
        self,
        exchange_id: str,
        reference: str | None,
        rating: float | None,
        *,
        made_by: str | None = None,
        max_per_exchange: int | None = None,
    ) -> int:
        """One feedback row; with `made_by`, only for an exchange that API key id made; with
        `max_per_exchange`, only while the exchange has fewer rows.

        The count and the insert are one statement, so concurrent posts cannot pass the cap
        together: SQLite runs a statement under its write lock, and on PostgreSQL the
        exchange's row is locked first (FOR UPDATE; SQLite has none), which orders the posts
        for one exchange across gateways."""
        with self.session() as session:
            found = session.execute(
                select(Exchange.api_key_id).where(Exchange.id == exchange_id).with_for_update()
            ).one_or_none()
            if found is None:
                raise UnknownExchangeError(exchange_id)
            if made_by is not None and found.api_key_id != made_by:
                raise NotMadeByError(exchange_id)
            values = select(
                literal(exchange_id, String()),
                literal(utcnow(), UTCDateTime()),
                literal(reference, Text()),
                cast(literal(rating), Float()),  # on PostgreSQL an untyped NULL reads as text
            )
            if max_per_exchange is not None:
                count = select(func.count()).where(Feedback.exchange_id == exchange_id)
                values = values.where(count.scalar_subquery() < max_per_exchange)
            columns = ["exchange_id", "created_at", "reference", "rating"]
            statement = insert(Feedback).from_select(columns, values).returning(Feedback.id)
            feedback_id = session.scalar(statement)
            if feedback_id is None:
                raise FeedbackLimitError(exchange_id)
            return feedback_id
