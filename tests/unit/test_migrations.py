"""The schema's migrations: they build what the models declare, and a database of each release
(as that release made it, with rows in it) upgrades to the newest with its rows kept; on SQLite
and on PostgreSQL. released_schemas/ holds each release's DDL, as its `create_all` wrote it."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner, Result

from store import Store
from store.base import Base
from store.exchanges import Exchange, Feedback, new_id
from store.jobs import TrainingJob
from store.rollouts import ONE_ACTIVE, Rollout
from store.schema import (
    SchemaMismatchError,
    SchemaOutdatedError,
    alembic_config,
    current,
    head,
    tunewatch_tables,
    upgrade,
)

RELEASED = Path(__file__).with_name("released_schemas")
FIRST, SECOND = "2026-11-25", "2026-12-01"  # the releases made before migrations
AT = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


def differences(url: str) -> list[Any]:
    """What autogenerate would write to bring the database to the models: [] when they agree."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"include_name": tunewatch_tables, "compare_type": True}
            )
            with warnings.catch_warnings():  # PostgreSQL compares it; both refuse a second below
                warnings.filterwarnings("ignore", f".*expression-based index.*{ONE_ACTIVE}")
                return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def build_release(url: str, release: str) -> None:
    """A database as that release left it: its tables, no revision stamped."""
    engine = create_engine(url)
    dialect = engine.dialect.name
    script = (RELEASED / f"{release}.{dialect}.sql").read_text()
    try:
        with engine.begin() as connection:
            for statement in script.split(";"):
                if statement.strip("\n -").strip() and "CREATE" in statement:
                    connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


def fill_release(url: str, release: str) -> None:
    """Rows in every table the release had, as its store wrote them."""
    engine = create_engine(url)
    tables = MetaData()
    tables.reflect(engine)
    parent = dict(
        id="p" * 32, created_at=AT, route="primary", adapter="support-v1", parent_id=None,
        endpoint="chat.completions", user="user-1", prompt="Capital of France?",
        request={"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]},
        response="Paris", prompt_tokens=5, completion_tokens=1, ttft_seconds=0.1,
        latency_seconds=0.2, mean_logprob=-0.1, finish_reason="stop", status="ok",
        http_status=200, error=None,
    )  # fmt: skip
    shadow = {**parent, "id": "s" * 32, "route": "shadow", "adapter": "support-v2",
              "parent_id": "p" * 32}  # fmt: skip
    rows: dict[str, list[dict[str, Any]]] = {
        "exchanges": [parent, shadow],
        "feedback": [dict(exchange_id="p" * 32, created_at=AT, reference="Paris", rating=1.0)],
        "training_jobs": [
            dict(id=1, created_at=AT, status="succeeded", reason="drift", spec={}, progress={},
                 result={"eval": 0.6})
        ],
        "adapters": [
            dict(name="support-v2", path="/a/v2", fingerprint="f" * 64, created_at=AT,
                 loaded=True, status="candidate", parent="support-v1", job_id=1,
                 hyperparameters={"rank": 8}, metrics={}, data={})
        ],
        "routing": [dict(created_at=AT, table={"primary": "support-v1"}, reason="by hand")],
        "events": [dict(created_at=AT, kind="routing.changed", reason="by hand", data={})],
    }  # fmt: skip
    if release == SECOND:
        rows |= {
            "rollouts": [
                dict(created_at=AT, updated_at=AT, candidate="support-v2", baseline="support-v1",
                     stage="shadow", step=-1, stage_started_at=AT, reason="started",
                     state={}, config={})
            ],
            "drift_checks": [
                dict(created_at=AT, adapter="support-v1", share=0.5, detected=True,
                     reason="prompt drifted", columns={"prompt": 0.3})
            ],
            "controller_state": [dict(name="trigger", updated_at=AT, state={"streak": 2})],
            "leases": [dict(name="scheduler", holder="host:1", expires_at=AT)],
        }  # fmt: skip
    try:
        with engine.begin() as connection:
            for name, values in rows.items():
                connection.execute(insert(tables.tables[name]), values)
    finally:
        engine.dispose()


def test_the_revisions_build_what_the_models_declare(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
    finally:
        engine.dispose()

    assert differences(store_url) == []


def test_a_new_database_is_made_at_the_newest_revision(store_url: str) -> None:
    Store(store_url).close()

    assert current(store_url).revision == head()
    assert current(store_url).stamped
    assert differences(store_url) == []


@pytest.mark.parametrize("release", [FIRST, SECOND])
def test_a_database_of_a_release_is_refused_with_the_command_that_upgrades_it(
    store_url: str, release: str
) -> None:
    build_release(store_url, release)

    with pytest.raises(SchemaOutdatedError, match="run `tunewatch db upgrade`"):
        Store(store_url)
    assert not current(store_url).stamped  # refused untouched


@pytest.mark.parametrize("release", [FIRST, SECOND])
def test_a_database_of_a_release_upgrades_to_the_newest_with_its_rows(
    store_url: str, release: str
) -> None:
    build_release(store_url, release)
    fill_release(store_url, release)

    before, after = upgrade(store_url, "test")

    assert (before, after) == ({FIRST: "0001", SECOND: "0002"}[release], head())
    assert differences(store_url) == []
    store = Store(store_url)
    try:
        with store.session() as session:
            parent = session.get(Exchange, "p" * 32)
            assert parent is not None and parent.response == "Paris"
            assert parent.recorded_at == parent.created_at == AT  # arrival stands in
            assert parent.api_key_id is None
            shadow = session.get(Exchange, "s" * 32)
            assert shadow is not None and shadow.parent_id == parent.id
            assert session.scalar(select(Feedback.reference)) == "Paris"
            assert session.get(TrainingJob, 1).result == {"eval": 0.6}
        assert store.routing_table().primary == "support-v1"
        assert [a.name for a in store.adapters()] == ["support-v2"]
        upgraded = store.events(kind="store.upgraded")[0]
        assert upgraded.data == {"from": before, "to": head()}
        # and it works as a new one does
        row = {**_row(), "api_key_id": "0123456789abcdef"}
        store.record_exchanges([row])
        store.add_feedback(row["id"], "Rome", None, made_by="0123456789abcdef")
        assert store.acquire_lease("scheduler", "host:2", 30)  # the old lease had expired
        assert store.count_exchanges() == 3
    finally:
        store.close()


def test_an_upgraded_database_keeps_one_rollout_in_progress_and_refuses_a_second(
    store_url: str,
) -> None:
    # Two controllers starting at once could each insert one before 0005: the oldest stays.
    build_release(store_url, SECOND)
    fill_release(store_url, SECOND)
    engine = create_engine(store_url)
    tables = MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        second = dict(created_at=AT, updated_at=AT, candidate="support-v3", baseline="support-v1",
                      stage="canary", step=0, stage_started_at=AT, reason="started", state={},
                      config={})  # fmt: skip
        connection.execute(insert(tables.tables["rollouts"]), [second])
    engine.dispose()

    upgrade(store_url, "test")

    store = Store(store_url)
    try:
        with store.session() as session:
            rows = session.scalars(select(Rollout).order_by(Rollout.id)).all()
            assert [(r.candidate, r.stage) for r in rows] == [
                ("support-v2", "shadow"),
                ("support-v3", "rolled_back"),
            ]
            assert rows[1].finished_at is not None and "revision 0005" in rows[1].reason
        with pytest.raises(IntegrityError, match=ONE_ACTIVE), store.session() as session:
            session.add(Rollout(candidate="support-v4", stage="paused", reason="started"))
    finally:
        store.close()


def test_a_first_release_database_a_later_tunewatch_opened_upgrades(store_url: str) -> None:
    # Before migrations, every start ran create_all: a first-release database opened by the
    # 2026-12-01 release (and refused for training_jobs.pid) holds that release's new tables.
    build_release(store_url, SECOND)
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE training_jobs DROP COLUMN pid"))
    engine.dispose()

    assert upgrade(store_url, "test") == ("0001", head())
    assert differences(store_url) == []


def test_a_database_of_a_newer_tunewatch_is_refused(store_url: str) -> None:
    Store(store_url).close()
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()

    with pytest.raises(SchemaMismatchError, match="9999, which this tunewatch does not know"):
        Store(store_url)


def test_upgrading_a_database_at_the_newest_changes_nothing(store_url: str) -> None:
    Store(store_url).close()

    assert upgrade(store_url, "test") == (head(), head())
    store = Store(store_url)
    try:
        assert store.events(kind="store.upgraded") == []
        with store.session() as session:
            assert session.scalar(select(func.count()).select_from(Exchange)) == 0
    finally:
        store.close()


def test_the_cli_refuses_an_old_database_and_upgrades_it_on_request(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tunewatch.db'}"
    build_release(url, FIRST)
    env = {"TUNEWATCH_DATABASE_URL": url}
    from tunewatch.cli import app

    refused = CliRunner().invoke(app, ["events"], env=env)
    told = CliRunner().invoke(app, ["db", "current"], env=env)
    upgraded = CliRunner().invoke(app, ["db", "upgrade"], env=env)
    events = CliRunner().invoke(app, ["events"], env=env)

    assert refused.exit_code == 2 and "run `tunewatch db upgrade`" in said(refused)
    assert "Traceback" not in said(refused)
    assert "revision 0001 (made before migrations" in said(told)
    assert upgraded.exit_code == 0
    assert f"from revision 0001 to {head()}" in said(upgraded)
    assert events.exit_code == 0 and "store.upgraded" in said(events)


def test_the_cli_names_a_database_it_cannot_reach_without_a_traceback() -> None:
    from tunewatch.cli import app

    env = {"TUNEWATCH_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/tunewatch"}
    result = CliRunner().invoke(app, ["db", "upgrade"], env=env)

    assert result.exit_code == 1
    assert "error: the database postgresql+psycopg://nobody@127.0.0.1:1/tunewatch" in said(result)
    assert result.exception is None or isinstance(result.exception, SystemExit)


def said(result: Result) -> str:
    """What the command printed, unwrapped (rich folds lines at the terminal's width)."""
    return " ".join(result.output.split())


def _row() -> dict[str, Any]:
    return dict(
        id=new_id(), created_at=AT, recorded_at=AT, route="primary", adapter="support-v1",
        parent_id=None, endpoint="chat.completions", user=None, prompt="Capital of Italy?",
        request={}, response="Rome", prompt_tokens=5, completion_tokens=1, ttft_seconds=0.1,
        latency_seconds=0.2, mean_logprob=-0.1, finish_reason="stop", status="ok",
        http_status=200, error=None,
    )  # fmt: skip
