"""The audit trail (events), what controller parts remember (state), and who may act (leases)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, Text, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from store.base import Base, DatabaseNow, StoreBase, json_safe, utcnow


class Event(Base):
    """An automatic or manual decision, with its reason: the audit trail."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ControllerState(Base):
    """What a controller part (the retrain trigger, a rollout) remembers across restarts."""

    __tablename__ = "controller_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    state: Mapped[dict[str, Any]]


class Lease(Base):
    """Who may act: one daemon per database runs the scheduled jobs, for as long as it renews."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime]


class EventRecords(StoreBase):
    """Events, controller state and leases."""

    def load_state(self, name: str) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.get(ControllerState, name)
            return None if row is None else dict(row.state)

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        with self.session() as session:
            row = session.get(ControllerState, name)
            if row is None:
                session.add(ControllerState(name=name, state=state))
            else:
                row.state = state

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease; True while `holder` has it. Atomic on both databases:
        one conditional UPDATE (free, expired or ours) or one INSERT that only one can win.
        Expiry is written and judged by the database's clock, never the caller's: a holder
        whose clock runs behind would otherwise write a lease already expired, one ahead
        take a lease still held."""
        expires = DatabaseNow(ttl_s)
        with self.engine.begin() as connection:
            taken = connection.execute(
                update(Lease)
                .where(
                    Lease.name == name,
                    or_(Lease.holder == holder, Lease.expires_at < DatabaseNow()),
                )
                .values(holder=holder, expires_at=expires)
            )
            if taken.rowcount == 1:
                return True
            exists = connection.scalar(select(func.count()).where(Lease.name == name))
            if exists:
                return False
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(Lease).values(name=name, holder=holder, expires_at=expires)
                )
        except IntegrityError:  # another holder inserted it first
            return False
        return True

    def release_lease(self, name: str, holder: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))

    # events

    def record_event(self, kind: str, reason: str, subject: str | None = None, **data: Any) -> None:
        with self.session() as session:
            # JSON round trip: the audit trail never holds a value it cannot read back.
            session.add(Event(kind=kind, subject=subject, reason=reason, data=json_safe(data)))

    def events(
        self,
        kind: str | None = None,
        limit: int = 100,
        subject: str | None = None,
        *,
        kind_prefix: str | None = None,
    ) -> list[Event]:
        """The newest events first, optionally of one kind (or kinds by prefix), one subject."""
        with self.session() as session:
            query = select(Event).order_by(Event.id.desc()).limit(limit)
            if kind is not None:
                query = query.where(Event.kind == kind)
            if kind_prefix is not None:
                query = query.where(Event.kind.startswith(kind_prefix, autoescape=True))
            if subject is not None:
                query = query.where(Event.subject == subject)
            return list(session.scalars(query))
