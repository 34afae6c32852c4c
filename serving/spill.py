"""The spill file: exchanges the store cannot take now, kept on local disk until it can.

The recorder appends here what it could not write (its queue full, the database
unreachable, the shutdown's deadline passed) and replays it into the store later. One
JSON object a line, in the order appended, fsync'd per append (or, for an exchange
appended on the event loop, where a fsync's milliseconds would hold up every request, by
the recorder's next `sync`). It holds prompts, so it is created private (0600). Instants
are written in ISO 8601 and read back as the same timezone-aware datetimes, so a replayed
exchange is the dict that was spilled.

A replay first `take`s the file: its rows move to a replay file (behind those an
unfinished replay left there), and new spills start a fresh file, so an append during a
replay is never lost to it. `release` removes the replay file once the store has it all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from serving import metrics
from store.base import UTCDateTime
from store.exchanges import Exchange

log = logging.getLogger(__name__)

_INSTANTS = frozenset(
    column.name for column in Exchange.__table__.columns if isinstance(column.type, UTCDateTime)
)


def encode(exchange: dict[str, Any]) -> str:
    return json.dumps(
        {
            key: value.isoformat() if key in _INSTANTS and value is not None else value
            for key, value in exchange.items()
        },
        ensure_ascii=False,
    )


def decode(line: str) -> dict[str, Any]:
    row = json.loads(line)
    for key in _INSTANTS.intersection(row):
        if row[key] is not None:
            row[key] = datetime.fromisoformat(row[key])
    return row


class SpillFile:
    """Appended to from the event loop and from worker threads alike (one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replay_path = path.with_name(f"{path.stem}.replaying{path.suffix}")
        self._lock = threading.Lock()

    def holds_rows(self) -> bool:
        return self.path.exists() or self.replay_path.exists()

    def append(self, exchanges: list[dict[str, Any]], fsync: bool = True) -> None:
        data = "".join(encode(exchange) + "\n" for exchange in exchanges).encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "ab") as file:
                file.write(data)
                file.flush()
                if fsync:
                    os.fsync(file.fileno())

    def sync(self) -> None:
        """Make what was appended without fsync durable (a replay may have moved it aside)."""
        with self._lock:
            for path in (self.path, self.replay_path):
                if path.exists():
                    with path.open("ab") as file:
                        os.fsync(file.fileno())

    def take(self) -> bool:
        """Move every row spilled so far into the replay file, in order; False if none."""
        with self._lock:
            if self.path.exists() and self.replay_path.exists():
                with self.replay_path.open("ab") as replay, self.path.open("rb") as new:
                    shutil.copyfileobj(new, replay)
                    replay.flush()
                    os.fsync(replay.fileno())
                self.path.unlink()
            elif self.path.exists():
                os.replace(self.path, self.replay_path)
            return self.replay_path.exists()

    def rows(self) -> Iterator[dict[str, Any]]:
        """The replay file's rows; a line a crash tore mid-append is counted lost."""
        with self.replay_path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    yield decode(line)
                except (json.JSONDecodeError, ValueError):
                    metrics.STORE_WRITE_FAILURES.inc()
                    log.error("%s:%d is not a spilled exchange; lost", self.replay_path, number)

    def release(self) -> None:
        """The replay file is in the store: remove it."""
        self.replay_path.unlink(missing_ok=True)
