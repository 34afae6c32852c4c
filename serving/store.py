"""The store: every exchange, feedback, adapter, routing change and event, in one schema.

SQLAlchemy 2 with one code path for SQLite (the embedded default, WAL mode) and
PostgreSQL (several gateways on several hosts). The methods are synchronous; the
gateway calls them through `asyncio.to_thread` so a slow disk never blocks its event loop.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from serving.routing import RoutingTable


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware instant, written and read back in UTC on every database.

    SQLite has no timestamp type: SQLAlchemy writes the wall-clock text and drops the
    offset, so a value came back naive, and one not in UTC at the wrong instant (and out
    of order against the rest). Normalising to UTC on the way in keeps that text in
    instant order; attaching UTC on the way out gives both databases the same answer.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware ones")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class Exchange(Base):
    """One request and its answer, as the client saw them (shadow calls are exchanges too)."""

    __tablename__ = "exchanges"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    route: Mapped[str] = mapped_column(String(16))  # primary | canary | shadow | pinned
    adapter: Mapped[str] = mapped_column(String(128), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("exchanges.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))  # chat.completions | completions
    user: Mapped[str | None] = mapped_column(String(256))
    prompt: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any]]
    response: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    ttft_seconds: Mapped[float | None] = mapped_column(Float)
    latency_seconds: Mapped[float] = mapped_column(Float)
    mean_logprob: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # ok | error
    http_status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class Feedback(Base):
    """A reference answer and/or a rating posted later for a logged exchange."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exchange_id: Mapped[str] = mapped_column(ForeignKey("exchanges.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    reference: Mapped[str | None] = mapped_column(Text)
    rating: Mapped[float | None] = mapped_column(Float)


class TrainingJob(Base):
    """One retraining run: why it started, how far it got, what it produced or why it failed."""

    __tablename__ = "training_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # queued | running | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str] = mapped_column(Text)
    parent_adapter: Mapped[str | None] = mapped_column(String(128))
    adapter: Mapped[str | None] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)  # the trainer child while it runs


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


class Event(Base):
    """An automatic or manual decision, with its reason: the audit trail."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Rollout(Base):
    """One candidate adapter's way through shadow and canary steps to promoted or rolled back."""

    __tablename__ = "rollouts"

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
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what decide() remembers
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the settings it runs under


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


class UnknownExchangeError(LookupError):
    pass


class AdapterNameTakenError(ValueError):
    """The name is registered for other weights; reusing it would poison vLLM's prefix cache."""


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _enable_sqlite_wal)
        return engine
    return create_engine(url, pool_pre_ping=True)


class SchemaMismatchError(RuntimeError):
    """The database was made by another version of tunewatch; the message says what differs."""


def _check_schema(engine: Engine) -> None:
    """Refuse, with names, a database whose tables lack columns this version needs.

    `create_all` makes missing tables but never alters existing ones. There are no
    migrations before the first release; until then an old database is refused here
    rather than failing later, mid-request, on a missing column.
    """
    inspector = inspect(engine)
    missing = [
        f"{table.name}.{column.name}"
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if column.name not in {c["name"] for c in inspector.get_columns(table.name)}
    ]
    if missing:
        raise SchemaMismatchError(
            f"the database {engine.url.render_as_string(hide_password=True)} was made by an "
            f"older tunewatch and lacks {', '.join(missing)}; point database_url at a new "
            "database (schema migrations arrive with the first release)"
        )


class Store:
    """All reads and writes of the schema; one instance per process."""

    def __init__(self, url: str) -> None:
        self.engine = create_db_engine(url)
        Base.metadata.create_all(self.engine)
        _check_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # exchanges and feedback

    def record_exchanges(self, exchanges: list[dict[str, Any]]) -> None:
        """Insert in the given order (a shadow comes after its parent) in one transaction."""
        with self.engine.begin() as connection:  # Core insert: half the ORM's cost per row
            connection.execute(insert(Exchange.__table__), exchanges)

    def get_exchange(self, exchange_id: str) -> Exchange | None:
        with self.session() as session:
            return session.get(Exchange, exchange_id)

    def count_exchanges(self) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(Exchange)) or 0

    def add_feedback(self, exchange_id: str, reference: str | None, rating: float | None) -> int:
        with self.session() as session:
            if session.get(Exchange, exchange_id) is None:
                raise UnknownExchangeError(exchange_id)
            feedback = Feedback(exchange_id=exchange_id, reference=reference, rating=rating)
            session.add(feedback)
            session.flush()
            return feedback.id

    # adapters

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

    # drift checks

    def record_drift_check(
        self, adapter: str, share: float | None, detected: bool | None, reason: str,
        columns: dict[str, Any],
    ) -> None:  # fmt: skip
        with self.session() as session:
            session.add(DriftCheck(adapter=adapter, share=share, detected=detected, reason=reason,
                                   columns=json.loads(json.dumps(columns))))  # fmt: skip

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

    # controller state and the lease

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
        one conditional UPDATE (free, expired or ours) or one INSERT that only one can win."""
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        with self.engine.begin() as connection:
            taken = connection.execute(
                update(Lease)
                .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
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
            session.add(
                Event(kind=kind, subject=subject, reason=reason, data=json.loads(json.dumps(data)))
            )

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
