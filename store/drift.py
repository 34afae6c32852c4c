"""Drift checks: the monitor records each one, the retrain trigger judges them in order."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from store.base import Base, StoreBase, json_safe, utcnow


class DriftCheck(Base):
    """One drift check of one adapter's window: what the retrain trigger judges, check by check."""

    __tablename__ = "drift_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    adapter: Mapped[str] = mapped_column(String(128), index=True)
    share: Mapped[float | None] = mapped_column(Float)  # None: not judged
    detected: Mapped[bool | None]
    reason: Mapped[str] = mapped_column(Text)  # why it was not judged, or what drifted
    columns: Mapped[dict[str, Any]] = mapped_column(default=dict)


class DriftRecords(StoreBase):
    def record_drift_check(
        self,
        adapter: str,
        share: float | None,
        detected: bool | None,
        reason: str,
        columns: dict[str, Any],
    ) -> None:
        with self.session() as session:
            session.add(
                DriftCheck(
                    adapter=adapter,
                    share=share,
                    detected=detected,
                    reason=reason,
                    columns=json_safe(columns),
                )
            )

    def drift_checks(self, adapter: str, after_id: int = 0, limit: int = 100) -> list[DriftCheck]:
        """The adapter's drift checks after `after_id`, oldest first."""
        with self.session() as session:
            query = (
                select(DriftCheck)
                .where(DriftCheck.adapter == adapter, DriftCheck.id > after_id)
                .order_by(DriftCheck.id)
                .limit(limit)
            )
            return list(session.scalars(query))
