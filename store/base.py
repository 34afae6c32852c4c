"""The schema's foundation: the declarative base, instants in UTC, the engine, the schema check.

SQLAlchemy 2 with one code path for SQLite (the embedded default, WAL mode) and
PostgreSQL (several gateways on several hosts). The methods are synchronous; the
gateway calls them through `asyncio.to_thread` so a slow disk never blocks its event loop.
The tables live by concern in the modules next to this one; `store.Store` is all of them,
and store.schema keeps the database at their revision.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Float, TypeDecorator, create_engine, event, literal
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


def utcnow() -> datetime:
    return datetime.now(UTC)


def json_safe(value: Any) -> Any:
    """`value` as a JSON column reads it back on both databases: lists for tuples, string
    keys, and None for NaN and infinity (PostgreSQL's JSON has neither)."""
    return json.loads(json.dumps(value), parse_constant=lambda _: None)


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


class DatabaseNow(FunctionElement[datetime]):
    """The database's clock, `offset_s` seconds ahead, as SQL: what a lease's expiry is
    judged by, so that daemons on hosts whose clocks disagree agree on who holds it."""

    type = UTCDateTime()
    name = "database_now"
    inherit_cache = True

    def __init__(self, offset_s: float = 0.0) -> None:
        super().__init__(literal(float(offset_s), Float()))


@compiles(DatabaseNow, "sqlite")
def _sqlite_now(element: DatabaseNow, compiler: SQLCompiler, **kw: Any) -> str:
    # The text SQLAlchemy writes a DateTime as on SQLite (microseconds; `%f` gives
    # milliseconds), so that the column's text order stays its instant order.
    offset = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', ({offset}) || ' seconds')"


@compiles(DatabaseNow, "postgresql")
def _postgresql_now(element: DatabaseNow, compiler: SQLCompiler, **kw: Any) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"(CURRENT_TIMESTAMP + make_interval(secs => CAST({offset} AS double precision)))"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def private_sqlite_file(url: str | URL) -> None:
    """Create the SQLite database's file (and folder) if need be, readable by its owner only:
    it holds every prompt (SQLite gives its -wal and -shm files the database file's mode)."""
    database = make_url(url).database
    if database and database != ":memory:":
        path = Path(database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _enable_sqlite_wal)
        return engine
    return create_engine(url, pool_pre_ping=True)


class StoreBase:
    """The engine and its sessions; the reads and writes of each table come with its module."""

    def __init__(self, url: str) -> None:
        self.engine = create_db_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
