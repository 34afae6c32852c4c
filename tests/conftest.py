"""Shared fixtures: the store's databases, SQLite and a real, throwaway PostgreSQL.

The store has one code path for both databases (docs/design.md), so its tests run on both:
`store_url` gives each test a fresh, empty database of either kind. PostgreSQL is a
private cluster that lives for one test session: started from Debian's binaries on a
free local port, with trust authentication (nothing outside this machine can reach it),
and deleted afterwards. Its tests are marked `slow`; CI runs them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.ports import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_SUPERUSER = "postgres"
PG_START_TIMEOUT_S = 60


def _pg_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory; fail (never skip) when there is none."""
    candidates = [Path(d) for d in glob.glob(PG_BIN_GLOB) if (Path(d) / "initdb").exists()]
    if not candidates:
        pytest.fail(
            f"PostgreSQL is not installed (no initdb under {PG_BIN_GLOB}): run `make system-deps`",
            pytrace=False,
        )
    return max(candidates, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def _as_cluster_owner() -> tuple[list[str], int | None, int | None]:
    """How to run PostgreSQL's tools: as `postgres` when we are root (it refuses root)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(
            "running as root and there is no `postgres` system user to run PostgreSQL as: "
            "run `make system-deps`",
            pytrace=False,
        )
    return ["runuser", "-u", "postgres", "--"], owner.pw_uid, owner.pw_gid


def _run(command: list[str], timeout: float) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )


def _admin_connection(port: int) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname="postgres", autocommit=True
    )


@dataclass(frozen=True)
class PostgresCluster:
    """A private cluster: its URL, and pg_ctl to stop and start it again (fault tests)."""

    url: str
    pg_ctl: list[str]
    log: Path
    options: str

    def stop(self) -> None:
        _run([*self.pg_ctl, "-m", "fast", "-w", "-t", "30", "stop"], timeout=60)

    def start(self) -> None:
        try:
            _run(
                [*self.pg_ctl, "-l", str(self.log), "-o", self.options, "-w",
                 "-t", str(PG_START_TIMEOUT_S), "start"],
                timeout=PG_START_TIMEOUT_S + 30,
            )  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            server_log = self.log.read_text() if self.log.exists() else "(no server log)"
            pytest.fail(f"PostgreSQL did not start: {exc}\n--- server log ---\n{server_log}")


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway cluster on a free local port with an empty `tunewatch` database, deleted
    afterwards."""
    bin_dir = _pg_bin_dir()
    prefix, uid, gid = _as_cluster_owner()
    root = Path(tempfile.mkdtemp(prefix="tunewatch-pg-"))
    data = root / "data"
    if uid is not None:
        os.chown(root, uid, gid)
    port = free_port()
    server_options = " ".join([
        "-c listen_addresses=127.0.0.1", f"-p {port}", f"-k {root}",
        # A throwaway cluster: durability buys nothing here and costs seconds.
        "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
    ])  # fmt: skip
    cluster = PostgresCluster(
        f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{port}/tunewatch",
        [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data)],
        root / "server.log",
        server_options,
    )
    started = False
    try:
        _run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust",
             f"--username={PG_SUPERUSER}", "--encoding=UTF8", "--locale=C", "--no-sync",
             "--no-instructions"],
            timeout=120,
        )  # fmt: skip
        cluster.start()
        started = True
        with _admin_connection(port) as admin:
            admin.execute("CREATE DATABASE tunewatch")
        yield cluster
    finally:
        if started:
            subprocess.run(
                [*cluster.pg_ctl, "-m", "immediate", "-w", "-t", "30", "stop"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL to an empty database on a private PostgreSQL cluster for this session."""
    with postgres_cluster() as cluster:
        yield cluster.url


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test, on SQLite or on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tunewatch.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    port, name = server.port, f"test_{uuid.uuid4().hex}"
    with _admin_connection(port) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connection(port) as admin:
            # FORCE: a test that forgot to close its Store must not leave the database behind.
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
