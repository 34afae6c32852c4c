"""Adapters the engine may serve, and the routing table's history (the newest row is in force).

`RoutingTable` is the shape of one routing row: serving routes requests by it, the rollouts
write it, and the store keeps its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import ForeignKey, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from store.base import Base, StoreBase, utcnow
from store.events import Event


class RoutingTable(BaseModel):
    """Primary (None: the base model), an optional weighted canary and an optional shadow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    primary: str | None = None
    canary: str | None = None
    canary_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    shadow: str | None = None
    shadow_fraction: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.canary_weight > 0 and self.canary is None:
            raise ValueError("canary_weight > 0 needs a canary adapter")
        if self.shadow_fraction > 0 and self.shadow is None:
            raise ValueError("shadow_fraction > 0 needs a shadow adapter")
        if self.canary is not None and self.canary == self.primary:
            raise ValueError("the canary must differ from the primary")
        if self.shadow is not None and self.shadow == self.primary:
            raise ValueError("the shadow must differ from the primary")
        return self

    def adapters(self) -> set[str]:
        return {name for name in (self.primary, self.canary, self.shadow) if name}

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


class Adapter(Base):
    """A LoRA adapter the engine may serve, and its lineage. A name never changes weights."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    loaded: Mapped[bool] = mapped_column(default=True)
    # registered (by hand) | candidate | shadow | canary | primary | retired | failed
    status: Mapped[str] = mapped_column(String(16), default="registered")
    parent: Mapped[str | None] = mapped_column(String(128))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("training_jobs.id"))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the training window: lineage


class RoutingChange(Base):
    """The routing table's history; the newest row is the table in force."""

    __tablename__ = "routing"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    table: Mapped[dict[str, Any]]
    reason: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    path: str
    fingerprint: str
    loaded: bool


def add_routing_change(session: Session, table: RoutingTable, reason: str) -> None:
    """A new routing table in force, in the caller's transaction (with what else changes)."""
    session.add(RoutingChange(table=table.as_dict(), reason=reason))
    session.add(Event(kind="routing.changed", reason=reason, data=table.as_dict()))


class AdapterNameTakenError(ValueError):
    """The name is registered for other weights; reusing it would poison vLLM's prefix cache."""


class AdapterRecords(StoreBase):
    """The adapters the gateways keep loaded, and the routing table (lifecycle: registry)."""

    def register_adapter(self, name: str, path: str, fingerprint: str) -> None:
        with self.session() as session:
            existing = session.get(Adapter, name)
            if existing is None:
                session.add(Adapter(name=name, path=path, fingerprint=fingerprint))
            elif existing.fingerprint != fingerprint:
                raise AdapterNameTakenError(name)
            else:
                existing.path, existing.loaded = path, True

    def set_adapter_loaded(self, name: str, loaded: bool) -> None:
        with self.session() as session:
            adapter = session.get(Adapter, name)
            if adapter is not None:
                adapter.loaded = loaded

    def adapters(self) -> list[AdapterRecord]:
        with self.session() as session:
            rows = session.scalars(select(Adapter).order_by(Adapter.created_at))
            return [AdapterRecord(r.name, r.path, r.fingerprint, r.loaded) for r in rows]

    # routing

    def routing_table(self) -> RoutingTable | None:
        with self.session() as session:
            row = session.scalars(
                select(RoutingChange).order_by(RoutingChange.id.desc()).limit(1)
            ).first()
            return None if row is None else RoutingTable(**row.table)

    def set_routing_table(self, table: RoutingTable, reason: str) -> None:
        with self.session() as session:
            add_routing_change(session, table, reason)
