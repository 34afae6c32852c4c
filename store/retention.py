"""Deleting old exchanges: in bounded batches, each exchange with its feedback and its shadow
replays, never the rows a caller says are still read (the controller's retention job decides
which: controller/retention.py).

Each batch is one short transaction, so the gateways' writes wait for one batch at most
(SQLite has one writer) rather than for the whole prune. An exchange goes with its shadow
replays (their foreign key names it) and their feedback; one whose replay must stay, stays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, exists, or_, select
from sqlalchemy.orm import aliased

from store.base import StoreBase
from store.exchanges import Exchange, Feedback


@dataclass(frozen=True)
class Pruned:
    exchanges: int
    feedback: int


class RetentionRecords(StoreBase):
    def nth_newest_arrival(self, n: int) -> datetime | None:
        """When the `n`th newest exchange arrived (None: there are fewer): what a cap of `n`
        exchanges keeps from."""
        query = select(Exchange.created_at).order_by(Exchange.created_at.desc()).offset(n - 1)
        with self.session() as session:
            return session.scalars(query.limit(1)).first()

    def prune_exchanges(
        self, before: datetime, kept: Mapping[str, datetime], *, batch: int
    ) -> Pruned:
        """Delete the exchanges that arrived before `before`, oldest first, `batch` at a time,
        but none of an adapter in `kept` that arrived up to its instant there, and none whose
        shadow replay stays."""
        child = aliased(Exchange)

        def stays(row: type[Exchange]) -> ColumnElement[bool]:
            held = [and_(row.adapter == a, row.created_at <= until) for a, until in kept.items()]
            return or_(row.created_at >= before, *held)

        oldest = (
            select(Exchange.id)
            .where(
                Exchange.parent_id.is_(None),
                ~stays(Exchange),
                ~exists().where(child.parent_id == Exchange.id, stays(child)),
            )
            .order_by(Exchange.created_at)
            .limit(batch)
        )
        exchanges = feedback = 0
        while True:
            with self.engine.begin() as connection:
                roots = list(connection.scalars(oldest))
                if not roots:
                    return Pruned(exchanges, feedback)
                replays = list(
                    connection.scalars(select(Exchange.id).where(Exchange.parent_id.in_(roots)))
                )
                ids = roots + replays
                feedback += connection.execute(
                    delete(Feedback).where(Feedback.exchange_id.in_(ids))
                ).rowcount
                if replays:
                    connection.execute(delete(Exchange).where(Exchange.id.in_(replays)))
                exchanges += connection.execute(
                    delete(Exchange).where(Exchange.id.in_(roots))
                ).rowcount + len(replays)
