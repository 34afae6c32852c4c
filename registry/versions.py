"""The adapter registry: every adapter version, where it came from, and where it stands.

Versions are named `family-vN` and a number is never reused (vLLM's prefix cache keys on
the name, so a name must always mean the same weights). Each version keeps its parent,
the training job and data window it came from, its hyperparameters and metrics, and a
status the rollout moves along: candidate -> shadow -> canary -> primary -> retired, or
failed. Every status change is an event with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from serving.engine import adapter_fingerprint
from store import Store
from store.adapters import Adapter
from store.events import Event

Status = Literal["registered", "candidate", "shadow", "canary", "primary", "retired", "failed"]
STATUSES: tuple[str, ...] = get_args(Status)
_VERSIONED = re.compile(r"^(?P<family>[A-Za-z0-9._-]+?)-v(?P<number>\d+)$")
_FAMILY = re.compile(r"^[A-Za-z0-9._-]+$")


class RegistryError(ValueError):
    pass


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    path: str
    status: str
    loaded: bool
    parent: str | None
    job_id: int | None
    created_at: datetime
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    data: dict[str, Any]

    @classmethod
    def of(cls, row: Adapter) -> AdapterVersion:
        return cls(
            row.name,
            row.path,
            row.status,
            row.loaded,
            row.parent,
            row.job_id,
            row.created_at,
            row.hyperparameters,
            row.metrics,
            row.data,
        )


def family_of(name: str) -> str:
    """`support-v3` -> `support`; a name without a version is its own family."""
    match = _VERSIONED.match(name)
    return match["family"] if match else name


def next_version(store: Store, family: str) -> str:
    """The first unused `family-vN`: one past the highest number ever registered."""
    if not _FAMILY.match(family):
        raise RegistryError(f"adapter family {family!r}: use letters, digits, '.', '_' or '-'")
    with store.session() as session:
        names = session.scalars(select(Adapter.name).where(Adapter.name.like(f"{family}-v%")))
        numbers = [int(m["number"]) for n in names if (m := _VERSIONED.match(n))]
    return f"{family}-v{max(numbers, default=0) + 1}"


def register(
    store: Store,
    family: str,
    path: Path,
    *,
    parent: str | None = None,
    job_id: int | None = None,
    hyperparameters: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    reason: str,
) -> AdapterVersion:
    """Register a new candidate version (not loaded on the engine until its rollout starts)."""
    fingerprint = adapter_fingerprint(path)  # refuses what is not a PEFT LoRA directory
    name = next_version(store, family)
    with store.session() as session:
        row = Adapter(
            name=name,
            path=str(Path(path).resolve()),
            fingerprint=fingerprint,
            loaded=False,
            status="candidate",
            parent=parent,
            job_id=job_id,
            hyperparameters=hyperparameters or {},
            metrics=metrics or {},
            data=data or {},
        )
        session.add(row)
        session.add(
            Event(
                kind="adapter.registered",
                subject=name,
                reason=reason,
                data={"parent": parent, "job_id": job_id, "path": row.path},
            )
        )
        session.flush()
        return AdapterVersion.of(row)


def set_status(store: Store, name: str, status: Status, reason: str) -> AdapterVersion:
    with store.session() as session:
        return AdapterVersion.of(change_status(session, name, status, reason))


def change_status(session: Session, name: str, status: Status, reason: str) -> Adapter:
    """The status change and its event, in the caller's transaction."""
    if status not in STATUSES:
        raise RegistryError(f"status {status!r}: one of {', '.join(STATUSES)}")
    row = session.get(Adapter, name)
    if row is None:
        raise RegistryError(f"no adapter named {name!r}")
    previous, row.status = row.status, status
    session.add(
        Event(
            kind="adapter.status",
            subject=name,
            reason=reason,
            data={"from": previous, "to": status},
        )
    )
    return row


def status_counts(store: Store) -> dict[str, int]:
    """How many versions stand at each status (every status named, zeros included)."""
    with store.session() as session:
        rows = session.execute(select(Adapter.status, func.count()).group_by(Adapter.status))
        counted = dict(rows.tuples().all())
    return {status: counted.get(status, 0) for status in STATUSES}


def versions(store: Store) -> list[AdapterVersion]:
    """Every registered adapter, oldest first (the identity adapter included)."""
    with store.session() as session:
        rows = session.scalars(select(Adapter).order_by(Adapter.created_at))
        return [AdapterVersion.of(row) for row in rows]
