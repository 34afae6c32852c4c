"""Reads traffic windows from the store: exchanges of one adapter, each with its newest feedback."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import select

from monitor.window import ExchangeView, Window
from serving.exchange import BASE_LABEL
from serving.store import Exchange, Feedback, Store

# Live traffic: what users sent. Golden runs are judged apart; shadow replays are live
# prompts answered by another adapter, so they count for that adapter.
LIVE_ROUTES = ("primary", "canary", "pinned", "shadow")


def read_window(
    store: Store,
    adapter: str,
    size: int,
    *,
    newest: bool = True,
    routes: Collection[str] = LIVE_ROUTES,
) -> Window:
    """The newest (or, for a reference, the oldest) `size` exchanges of an adapter, oldest first."""
    order = Exchange.created_at.desc() if newest else Exchange.created_at.asc()
    with store.session() as session:
        rows = list(
            session.scalars(
                select(Exchange)
                .where(Exchange.adapter == adapter, Exchange.route.in_(tuple(routes)))
                .order_by(order)
                .limit(size)
            )
        )
        feedback = _newest_feedback(session, [row.id for row in rows])
    if newest:
        rows.reverse()
    views = tuple(
        ExchangeView(
            id=row.id,
            created_at=row.created_at,
            adapter=row.adapter,
            route=row.route,
            prompt=row.prompt,
            response=row.response,
            completion_tokens=row.completion_tokens,
            mean_logprob=row.mean_logprob,
            latency_seconds=row.latency_seconds,
            status=row.status,
            reference=feedback.get(row.id, (None, None))[0],
            rating=feedback.get(row.id, (None, None))[1],
        )
        for row in rows
    )
    return Window(adapter=adapter, exchanges=views)


def adapter_labels(store: Store, base_adapter: str) -> list[str]:
    """The adapters to judge, a bounded set: the base model and every registered adapter."""
    registered = [a.name for a in store.adapters() if a.name != base_adapter]
    return [BASE_LABEL, *registered]


def with_goldens(store: Store, live: Window, size: int) -> Window:
    """A live window plus the adapter's `size` latest golden runs: what quality is judged on."""
    golden = read_window(store, live.adapter, size, routes=("golden",))
    return Window(live.adapter, live.exchanges + golden.exchanges)


def _newest_feedback(
    session, exchange_ids: list[str]
) -> dict[str, tuple[str | None, float | None]]:
    """Per exchange: the newest reference and the newest rating (posted separately or together)."""
    newest: dict[str, tuple[str | None, float | None]] = {}
    for chunk_start in range(0, len(exchange_ids), 500):
        chunk = exchange_ids[chunk_start : chunk_start + 500]
        rows = session.scalars(
            select(Feedback).where(Feedback.exchange_id.in_(chunk)).order_by(Feedback.id)
        )
        for row in rows:
            reference, rating = newest.get(row.exchange_id, (None, None))
            newest[row.exchange_id] = (
                row.reference if row.reference is not None else reference,
                row.rating if row.rating is not None else rating,
            )
    return newest
