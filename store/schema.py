"""The schema's version: Alembic revisions from the first release on (store/migrations/).

Every store checks its database's revision as it starts. An empty database is made at the
newest revision and stamped; one at an older revision is refused with the command that
upgrades it (`tunewatch db upgrade`, `upgrade` here), so that nothing fails later, mid-
request, on a missing column. Databases made before migrations carry no revision: each
release's schema is told apart by a column it added (`RELEASES`), and is taken to be at that
release's revision.

Each upgrade runs in one transaction (SQLite and PostgreSQL both roll DDL back), under a
lock: PostgreSQL's advisory lock for several gateways starting at once, SQLite's write lock
taken at BEGIN. On SQLite the connection runs without foreign keys enforced (altering a
table there copies it, and a copy dropped under enforcement would cascade), and the keys are
checked whole before the commit instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, event, insert, inspect, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from store.base import Base, private_sqlite_file
from store.events import Event

MIGRATIONS = Path(__file__).with_name("migrations")
# The revision of each schema released before migrations, newest first, with the column it
# added (what tells a database of that release from one of the release before).
RELEASES = (
    ("0003", "exchanges", "api_key_id"),
    ("0002", "training_jobs", "pid"),
    ("0001", "exchanges", "id"),
)
_LOCK_KEY = 0x7475_6E65  # "tune": PostgreSQL's advisory lock for schema changes


class SchemaMismatchError(RuntimeError):
    """The database's schema is not the one this tunewatch runs on; the message says why."""


class SchemaOutdatedError(SchemaMismatchError):
    """The database is at an older revision: `tunewatch db upgrade` brings it up to date."""


class DatabaseUnavailableError(RuntimeError):
    """The database cannot be reached (or stays locked) now."""


@dataclass(frozen=True)
class SchemaVersion:
    revision: str | None  # None: an empty database (no tunewatch table in it)
    stamped: bool  # False: told by its columns (made before migrations)


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration, made in code (no alembic.ini): revisions run on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def tunewatch_tables(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
    """Alembic's `include_name`: only tunewatch's tables are compared. APScheduler keeps its job
    store in the same database (controller/scheduler.py), and a PostgreSQL one may be shared."""
    return type_ != "table" or name in Base.metadata.tables


@cache  # read from the revision files once per process: every store's start asks
def head() -> str:
    """The newest revision: the schema of the models in store/."""
    script = ScriptDirectory(str(MIGRATIONS))
    revision = script.get_current_head()
    assert revision is not None
    return revision


def version(connection: Connection) -> SchemaVersion:
    """The database's revision: the one stamped, else the release its columns match."""
    stamped = MigrationContext.configure(connection).get_current_revision()
    if stamped is not None:
        return SchemaVersion(stamped, True)
    inspector = inspect(connection)
    ours = set(inspector.get_table_names()) & set(Base.metadata.tables)
    if not ours:
        return SchemaVersion(None, False)
    for revision, table, column in RELEASES:
        if table in ours and column in {c["name"] for c in inspector.get_columns(table)}:
            return SchemaVersion(revision, False)
    raise SchemaMismatchError(
        f"the database {_shown(connection)} holds the tables {', '.join(sorted(ours))} but "
        "matches no released tunewatch schema; point database_url at tunewatch's database"
    )


def ensure_current(engine: Engine) -> None:
    """Make an empty database at the newest revision, or refuse one that is not at it.

    The usual case (stamped at the newest) costs one query on the store's own engine."""
    with _explained(engine.url), engine.connect() as connection:
        if MigrationContext.configure(connection).get_current_revision() == head():
            return
    with _explained(engine.url), _locked(engine.url) as connection:
        found = version(connection)
        if found.revision is None:
            _make(connection)
            return
        _refuse_unknown(connection, found)
        if found.revision != head():
            raise SchemaOutdatedError(
                f"the database {_shown(connection)} has the schema of revision "
                f"{found.revision}, and this tunewatch needs {head()}: run `tunewatch db "
                "upgrade` (with the same settings) to upgrade it in place, after a backup"
            )
        # The newest release, made before migrations: stamped, so the next start reads it.
        command.stamp(alembic_config(connection), "head")


def upgrade(url: str | URL, reason: str) -> tuple[str | None, str]:
    """Bring the database to the newest revision; (the revision it had, the newest). An empty
    database is made whole. Each change of revision is recorded as an event with `reason`."""
    with _explained(url), _locked(url) as connection:
        found = version(connection)
        if found.revision is None:
            _make(connection)
            return None, head()
        _refuse_unknown(connection, found)
        if not found.stamped:
            command.stamp(alembic_config(connection), found.revision)
        if found.revision != head():
            command.upgrade(alembic_config(connection), "head")
            connection.execute(
                insert(Event).values(
                    kind="store.upgraded",
                    reason=reason,
                    subject=head(),
                    data={"from": found.revision, "to": head()},
                )
            )
        return found.revision, head()


def current(url: str | URL) -> SchemaVersion:
    """The database's revision, read without changing anything."""
    if make_url(url).get_backend_name() == "sqlite":
        private_sqlite_file(url)  # connecting would create it, readable by all
    engine = create_engine(url)
    try:
        with _explained(url), engine.connect() as connection:
            return version(connection)
    finally:
        engine.dispose()


@contextmanager
def _explained(url: str | URL) -> Iterator[None]:
    """The database's own errors as one line for people (the CLI prints it, no traceback)."""
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        yield
    except OperationalError as exc:
        raise unavailable(url, exc) from None
    except DBAPIError as exc:
        raise SchemaMismatchError(
            f"the database {shown}: {_first_line(exc)}; its schema was left as it was"
        ) from None


def unavailable(url: str | URL, exc: OperationalError) -> DatabaseUnavailableError:
    """A database that cannot be reached or is locked, in one line that names it (no password)."""
    shown = make_url(url).render_as_string(hide_password=True)
    return DatabaseUnavailableError(f"the database {shown}: {_first_line(exc)}")


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc).__name__


def _make(connection: Connection) -> None:
    """An empty database made from the models, stamped at the newest revision."""
    Base.metadata.create_all(connection)
    command.stamp(alembic_config(connection), "head")


def _refuse_unknown(connection: Connection, found: SchemaVersion) -> None:
    script = ScriptDirectory(str(MIGRATIONS))
    known = {rev.revision for rev in script.walk_revisions()}
    if found.revision not in known:
        raise SchemaMismatchError(
            f"the database {_shown(connection)} is at revision {found.revision}, which this "
            f"tunewatch does not know (it knows up to {head()}): a newer tunewatch made it"
        )


@contextmanager
def _locked(url: str | URL) -> Iterator[Connection]:
    """One transaction holding the schema lock, on a connection of its own."""
    engine = _schema_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield connection
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise SchemaMismatchError(
                        f"the upgrade would break {len(broken)} foreign keys (first: {broken[0]})"
                        "; nothing was changed"
                    )
    finally:
        engine.dispose()


def _schema_engine(url: str | URL) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name != "sqlite":
        return engine
    private_sqlite_file(engine.url)

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        # Python's sqlite3 would commit each DDL statement on its own: the transaction is ours.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout=60000")  # another store's upgrade

    @event.listens_for(engine, "begin")
    def _write_lock(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _shown(connection: Connection) -> str:
    return connection.engine.url.render_as_string(hide_password=True)
