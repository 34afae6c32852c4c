"""The schema's foundation: the declarative base, instants in UTC, the engine, the schema check.

SQLAlchemy 2 with one code path for SQLite (the embedded default, WAL mode) and
PostgreSQL (several gateways on several hosts). The methods are synchronous; the
gateway calls them through `asyncio.to_thread` so a slow disk never blocks its event loop.
The tables live by concern in the modules next to this one; `store.Store` is all of them,
and store.schema keeps the database at their revision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.errors import _WaitTimeout
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


# The longest one call waits for the database, unless its engine is given another bound.
# SQLite: its busy timeout (a write lock held by another connection), short because a writer
# retries (the recorder three times) and a local file has no other reason to be slow.
SQLITE_WAIT_S = 5.0
# PostgreSQL: every wait (docs/design.md, "When the database fails"). Long enough for the
# biggest single statement the store sends (a rollout's whole reading, one query a table);
# short enough that threads blocked on a silent server come back within a lease renewal or
# three (the scheduler abandons its own call after a third of the lease anyway).
POSTGRES_WAIT_S = 30.0
# The server's own statement_timeout and lock_timeout, as a share of the wait: the server
# cancels a slow statement first (the connection survives, the server stops working on it);
# only a server or network gone silent reaches the client's deadline.
SERVER_SHARE = 0.8

_Result = TypeVar("_Result")


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any, *, wait_s: float) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={max(1, round(wait_s * 1000))}")
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


class _AnsweredInTime(psycopg.Connection[Any]):
    """psycopg's connection, waiting at most `wait_s` for each answer from the server.

    A server gone silent (its host down, the network dropping packets, a proxy or pooler in
    front of it answering for a server that no longer does) leaves the socket open: TCP
    notices after minutes, or never while the proxy is up, and the call would hold its
    thread, its pool slot and whatever waits on them (the lease). Past the deadline the
    connection is dropped, so the pool discards it, and the call raises.
    """

    wait_s: float = POSTGRES_WAIT_S

    def wait(
        self, gen: PQGen[_Result], interval: float = 0.1, timeout: float | None = None
    ) -> _Result:
        if timeout is not None and timeout <= self.wait_s:  # psycopg's own shorter wait
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.wait_s)
        except _WaitTimeout:
            self.pgconn.finish()  # mid-protocol: unusable, and `broken` tells SQLAlchemy so
            raise psycopg.OperationalError(
                f"no answer from PostgreSQL in {self.wait_s:g} s: connection dropped"
            ) from None


def _connect_bounded(
    _dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any], *, wait_s: float
) -> psycopg.Connection[Any]:
    """A connection whose every wait is bounded: connecting (libpq's connect_timeout, at least
    its 2 s), each answer, and the server's statements and lock waits. Bounds the URL sets
    itself (`?connect_timeout=...`, `?options=-c statement_timeout=...`) win over these."""
    server_ms = max(1, round(wait_s * SERVER_SHARE * 1000))
    bounds = f"-c statement_timeout={server_ms} -c lock_timeout={server_ms}"
    params = {
        **cparams,
        "connect_timeout": cparams.get("connect_timeout", max(2, math.ceil(wait_s))),
        "options": f"{bounds} {cparams.get('options', '')}".strip(),  # a later -c wins
    }
    connection = _AnsweredInTime.connect(*cargs, **params)
    connection.wait_s = wait_s
    return connection


def create_db_engine(url: str, wait_s: float | None = None) -> Engine:
    """The engine for `url`, no call waiting longer than `wait_s` for the database (unset:
    SQLITE_WAIT_S or POSTGRES_WAIT_S). A connection found dead is replaced at its next use."""
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        wait_s = SQLITE_WAIT_S if wait_s is None else wait_s
        event.listen(engine, "connect", partial(_enable_sqlite_wal, wait_s=wait_s))
        return engine
    wait_s = POSTGRES_WAIT_S if wait_s is None else wait_s
    engine = create_engine(url, pool_pre_ping=True, pool_timeout=wait_s)
    if engine.dialect.driver == "psycopg":  # the driver tunewatch ships; another keeps its own
        event.listen(engine, "do_connect", partial(_connect_bounded, wait_s=wait_s))
    return engine


class StoreBase:
    """The engine and its sessions; the reads and writes of each table come with its module."""

    def __init__(self, url: str, wait_s: float | None = None) -> None:
        self.engine = create_db_engine(url, wait_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
