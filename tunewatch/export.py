"""`tunewatch export`: the gateway's recorded exchanges as a traffic file `tunewatch replay` sends.

Each line is what the client asked (its messages or prompt, its sampling settings and
user), the newest reference posted for it, its time from the first exported line, and what
was answered (`recorded`: status, answer, mean logprob, adapter), so that last week's
traffic can be replayed, or judged offline (`tunewatch replay --dry-run`), as it came. Only
what users sent is exported: shadow replays, golden runs and the trainer's evaluations are
the daemon's own traffic. The rows are read in pages, never all at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select

from monitor.traffic import LABELLED_ROUTES, newest_feedback
from store import Store
from store.exchanges import Exchange

PAGE = 500
SAMPLING = ("max_tokens", "temperature")  # kept from the request: they shape the answer


def export_traffic(
    store: Store,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    adapter: str | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Traffic lines of the users' exchanges, oldest first, in the shape of `TrafficLine`."""
    query = select(Exchange).where(Exchange.route.in_(LABELLED_ROUTES))
    if since is not None:
        query = query.where(Exchange.created_at >= since)
    if until is not None:
        query = query.where(Exchange.created_at <= until)
    if adapter is not None:
        query = query.where(Exchange.adapter == adapter)
    query = query.order_by(Exchange.created_at, Exchange.id)
    first: datetime | None = None
    after: tuple[datetime, str] | None = None  # the last row read: pages by key, not offset
    exported = 0
    while limit is None or exported < limit:
        page = query if after is None else query.where(_after(*after))
        size = PAGE if limit is None else min(PAGE, limit - exported)
        with store.session() as session:
            rows = list(session.scalars(page.limit(size)))
            feedback = newest_feedback(session, [row.id for row in rows])
        if not rows:
            return
        for row in rows:
            first = first or row.created_at
            reference, _ = feedback.get(row.id, (None, None))
            yield traffic_line(row, reference, (row.created_at - first).total_seconds())
        exported += len(rows)
        after = (rows[-1].created_at, rows[-1].id)


def _after(created_at: datetime, exchange_id: str) -> Any:
    return or_(
        Exchange.created_at > created_at,
        and_(Exchange.created_at == created_at, Exchange.id > exchange_id),
    )


def traffic_line(row: Exchange, reference: str | None, at: float) -> dict[str, Any]:
    """One exchange as the client sent it (unset fields left out, as in the request)."""
    request = row.request or {}
    if row.endpoint == "completions":
        line: dict[str, Any] = {"prompt": row.prompt, "endpoint": "completions"}
    else:
        line = {"messages": request.get("messages") or [{"role": "user", "content": row.prompt}]}
    line.update({key: request[key] for key in SAMPLING if request.get(key) is not None})
    if reference is not None:
        line["reference"] = reference
    if row.user is not None:
        line["user"] = row.user
    line["at"] = round(at, 3)
    recorded = {
        "status": row.status,
        "answer": row.response,
        "mean_logprob": row.mean_logprob,
        "adapter": row.adapter,
    }
    line["recorded"] = {key: value for key, value in recorded.items() if value is not None}
    return line


def write_jsonl(lines: Iterator[dict[str, Any]], out: Any) -> int:
    """Write JSON Lines (non-ASCII kept: prompts are read by people); how many were written."""
    count = 0
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        count += 1
    return count
