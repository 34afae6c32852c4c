"""Reads traffic windows from the store: exchanges of one adapter, each with its newest feedback."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select

from monitor.window import ExchangeView, Window
from serving.exchange import BASE_LABEL
from store import Store
from store.exchanges import Exchange, Feedback

# Live traffic: what users sent. Golden runs are judged apart; shadow replays are live
# prompts answered by another adapter, so they count for that adapter.
LIVE_ROUTES = ("primary", "canary", "pinned", "shadow")
LABELLED_ROUTES = ("primary", "canary", "pinned")  # where users see answers and post feedback


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
        feedback = newest_feedback(session, [row.id for row in rows])
    if newest:
        rows.reverse()
    views = tuple(_view(row, feedback) for row in rows)
    return Window(adapter=adapter, exchanges=views)


def exchanges_since(
    store: Store,
    adapter: str,
    since: datetime,
    routes: Collection[str],
    *,
    until: datetime | None = None,
) -> list[ExchangeView]:
    """Every exchange of an adapter on these routes from `since` on (to `until`), oldest first."""
    query = select(Exchange).where(
        Exchange.adapter == adapter, Exchange.route.in_(tuple(routes)), Exchange.created_at >= since
    )
    if until is not None:
        query = query.where(Exchange.created_at <= until)
    with store.session() as session:
        rows = list(session.scalars(query.order_by(Exchange.created_at, Exchange.id)))
        feedback = newest_feedback(session, [row.id for row in rows])
    return [_view(row, feedback) for row in rows]


def recorded_since(
    store: Store,
    adapter: str,
    routes: Collection[str],
    recorded_from: datetime,
    *,
    since: datetime,
    until: datetime | None = None,
) -> list[tuple[str, datetime, str]]:
    """(id, created_at, route) of the exchanges `exchanges_since` reads that the store wrote
    from `recorded_from` on: what a reader following the table may not have seen yet."""
    query = select(Exchange.id, Exchange.created_at, Exchange.route).where(
        Exchange.adapter == adapter,
        Exchange.recorded_at >= recorded_from,
        Exchange.route.in_(tuple(routes)),
    )
    with store.session() as session:
        rows = session.execute(query)
        # The arrival is checked here: in SQL, the planner may range over it (the whole
        # rollout) rather than over the write stamp (the last few seconds).
        return [
            (row.id, row.created_at, row.route)
            for row in rows
            if row.created_at >= since and (until is None or row.created_at <= until)
        ]


def feedback_since(store: Store, posted_from: datetime) -> list[tuple[int, str, datetime]]:
    """(feedback id, exchange id, when written) of the feedback the store wrote from
    `posted_from` on."""
    query = select(Feedback.id, Feedback.exchange_id, Feedback.created_at).where(
        Feedback.created_at >= posted_from
    )
    with store.session() as session:
        return [(row.id, row.exchange_id, row.created_at) for row in session.execute(query)]


def exchanges_by_id(store: Store, ids: Collection[str]) -> list[ExchangeView]:
    """These exchanges (those that exist), with their newest feedback."""
    wanted, rows = sorted(ids), []
    with store.session() as session:
        for at in range(0, len(wanted), 500):
            chunk = wanted[at : at + 500]
            rows += session.scalars(select(Exchange).where(Exchange.id.in_(chunk)))
        feedback = newest_feedback(session, [row.id for row in rows])
    return [_view(row, feedback) for row in rows]


def labelled_exchanges(
    store: Store,
    limit: int,
    *,
    since: datetime | None = None,
    adapter: str | None = None,
    newest: bool = True,
) -> list[ExchangeView]:
    """The newest (or oldest) `limit` answered live exchanges with a reference, newest
    (oldest) first.

    `since` keeps those whose reference was posted after it (new labels since a retrain);
    `adapter` keeps one adapter's. Shadow replays carry no feedback of their own (it is
    posted for the exchange the user saw), golden runs are read from their set.
    """
    labelled = select(Feedback.id).where(
        Feedback.exchange_id == Exchange.id, Feedback.reference.is_not(None)
    )
    if since is not None:
        labelled = labelled.where(Feedback.created_at > since)
    # The exchanges in time order (an index), each checked for a reference, up to `limit`:
    # never the whole labelled history, as a join grouped and then sorted would read.
    query = (
        select(Exchange.id)
        .where(Exchange.status == "ok", Exchange.route.in_(LABELLED_ROUTES), labelled.exists())
        .order_by(Exchange.created_at.desc() if newest else Exchange.created_at.asc())
        .limit(limit)
    )
    if adapter is not None:
        query = query.where(Exchange.adapter == adapter)
    with store.session() as session:
        ids = list(session.scalars(query))
        found = session.scalars(select(Exchange).where(Exchange.id.in_(ids)))
        rows = {row.id: row for row in found}
        feedback = newest_feedback(session, ids)
    return [_view(rows[i], feedback) for i in ids]


def count_labelled(store: Store, *, at_most: int, since: datetime | None = None) -> int:
    """How many live exchanges got a reference after `since` (since the first when None),
    counted up to `at_most`: a threshold needs no more, and the count reads no further than
    it must (the references in the order posted, an index), never the whole history."""
    query = (
        select(Feedback.exchange_id)
        .join(Exchange, Feedback.exchange_id == Exchange.id)
        .where(Feedback.reference.is_not(None), Exchange.route.in_(LABELLED_ROUTES))
        .order_by(Feedback.created_at)
        .execution_options(yield_per=500)
    )
    if since is not None:
        query = query.where(Feedback.created_at > since)
    labelled: set[str] = set()
    with store.session() as session:
        for exchange_id in session.scalars(query):
            if len(labelled) >= at_most:
                break
            labelled.add(exchange_id)
    return len(labelled)


def adapter_labels(store: Store, base_adapter: str | None) -> list[str]:
    """The adapters to judge, a bounded set: the base model and every registered adapter
    (`base_adapter`: the identity adapter's name, the base model's under another label)."""
    registered = [a.name for a in store.adapters() if a.name != base_adapter]
    return [BASE_LABEL, *registered]


def baseline_window(store: Store, adapter: str, size: int) -> Window:
    """The adapter's first `size` labelled live exchanges and first `size` golden runs: the
    quality it started with, what its later windows are held against."""
    live = labelled_exchanges(store, size, adapter=adapter, newest=False)  # oldest first
    golden = read_window(store, adapter, size, newest=False, routes=("golden",))
    return Window(adapter, tuple(live) + golden.exchanges)


def with_goldens(store: Store, live: Window, size: int) -> Window:
    """A live window plus the adapter's `size` latest golden runs: what quality is judged on."""
    golden = read_window(store, live.adapter, size, routes=("golden",))
    return Window(live.adapter, live.exchanges + golden.exchanges)


def _view(row: Exchange, feedback: dict[str, tuple[str | None, float | None]]) -> ExchangeView:
    reference, rating = feedback.get(row.id, (None, None))
    return ExchangeView(
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
        reference=reference,
        rating=rating,
        parent_id=row.parent_id,
    )


def newest_feedback(session, exchange_ids: list[str]) -> dict[str, tuple[str | None, float | None]]:
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
