"""Rollouts and the commands people queue for them (their reader: rollout.repository)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text, literal_column, text
from sqlalchemy.orm import Mapped, mapped_column

from store.base import Base, utcnow

ACTIVE_STAGES = ("shadow", "canary", "paused")  # a rollout in progress: one at a time
# The database holds at most one: a unique index on a constant, over the rows in those stages.
ONE_ACTIVE = "rollouts_one_active"
_ACTIVE = literal_column("stage").in_(ACTIVE_STAGES)


class Rollout(Base):
    """One candidate adapter's way through shadow and canary steps to promoted or rolled back."""

    __tablename__ = "rollouts"
    # Two controllers starting at once (a stale leader and the new one) both see none in
    # progress; the second insert fails here, and that start is refused.
    __table_args__ = (
        Index(ONE_ACTIVE, text("(1)"), unique=True, sqlite_where=_ACTIVE, postgresql_where=_ACTIVE),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    candidate: Mapped[str] = mapped_column(String(128), index=True)
    baseline: Mapped[str | None] = mapped_column(String(128))  # the primary; None: the base
    # shadow | canary | paused | promoted | rolled_back
    stage: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[int] = mapped_column(Integer, default=-1)  # the canary step; -1 before
    stage_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    reason: Mapped[str] = mapped_column(Text)  # of the latest transition
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what decide_rollout() remembers
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the settings it runs under
    # One more at each write by the controller, which writes only where it is still the one
    # it read: a stale leader's transition is dropped, never written over a newer state.
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RolloutCommand(Base):
    """What a person asked of the rollouts (CLI or admin API); the controller carries it out."""

    __tablename__ = "rollout_commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    command: Mapped[str] = mapped_column(String(16))  # start | pause | resume | promote | rollback
    adapter: Mapped[str | None] = mapped_column(String(128))  # the candidate, for start
    by: Mapped[str] = mapped_column(String(64))  # who asked: cli, admin api
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|refused
    result: Mapped[str | None] = mapped_column(Text)  # what came of it, for people
    rollout_id: Mapped[int | None] = mapped_column(Integer)
