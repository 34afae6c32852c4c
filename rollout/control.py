"""What people ask of the rollouts, and what they see of them: one code path for the CLI
(`tunewatch rollout ...`) and the admin API (`/admin/rollouts`).

A request is checked at once against the rollout as it stands (a clear refusal, never a
queued mistake), then written to `rollout_commands`; the controller's rollout job carries
it out on its next tick (every few seconds), so one process alone ever moves a rollout or
the routing table it owns. `wait` follows a request to its outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from rollout.machine import Command, RolloutRefusal, command
from rollout.repository import RolloutRecord, load, load_active, load_newest
from store import Store
from store.adapters import Adapter, RoutingTable
from store.rollouts import RolloutCommand

STARTABLE = ("candidate", "registered")  # adapter statuses a rollout may start from
COMMANDS: tuple[str, ...] = ("start", "pause", "resume", "promote", "rollback")


@dataclass(frozen=True)
class RolloutView:
    id: int
    candidate: str
    baseline: str | None
    stage: str
    step: int
    weight: float
    steps: tuple[float, ...]
    created_at: datetime
    stage_started_at: datetime
    finished_at: datetime | None
    reason: str  # the latest transition's, or the latest look's while it waits
    look: dict[str, Any]  # the latest look's figures: guards, samples

    @classmethod
    def of(cls, rollout: RolloutRecord) -> RolloutView:
        row, state, config = rollout.row, rollout.state, rollout.config
        return cls(
            row.id,
            row.candidate,
            row.baseline,
            state.stage,
            state.step,
            state.weight(config),
            config.steps,
            row.created_at,
            state.stage_started_at,
            row.finished_at,
            row.state.get("waiting") or row.reason,
            dict(row.state.get("look") or {}),
        )


@dataclass(frozen=True)
class CommandView:
    id: int
    command: str
    adapter: str | None
    by: str
    status: str
    result: str | None
    rollout_id: int | None

    @classmethod
    def of(cls, row: RolloutCommand) -> CommandView:
        return cls(row.id, row.command, row.adapter, row.by, row.status, row.result, row.rollout_id)


def active_rollout(store: Store) -> RolloutView | None:
    with store.session() as session:
        rollout = load_active(session)
        return None if rollout is None else RolloutView.of(rollout)


def rollouts(store: Store, limit: int = 20) -> list[RolloutView]:
    """The newest rollouts first."""
    with store.session() as session:
        return [RolloutView.of(rollout) for rollout in load_newest(session, limit)]


def get_rollout(store: Store, rollout_id: int) -> RolloutView | None:
    with store.session() as session:
        rollout = load(session, rollout_id)
        return None if rollout is None else RolloutView.of(rollout)


def start_refusal(store: Store, adapter: str) -> str | None:
    """Why a rollout of `adapter` cannot start now, or None."""
    active = active_rollout(store)
    if active is not None:
        return one_at_a_time(active)
    with store.session() as session:
        row = session.get(Adapter, adapter)
        if row is None:
            return f"no adapter named {adapter!r} is registered"
        status = row.status
    if status not in STARTABLE:
        return f"adapter {adapter!r} is {status}: only a candidate can be rolled out"
    routing = store.routing_table() or RoutingTable()
    if routing.primary == adapter:
        return f"adapter {adapter!r} is already the primary"
    if routing.canary or routing.shadow:
        return (
            f"the routing table has a canary ({routing.canary}) or shadow ({routing.shadow}) "
            "set by hand; clear them (PUT /admin/routing) before a rollout takes over"
        )
    return None


def one_at_a_time(active: RolloutView) -> str:
    """The refusal of a start while `active` is in progress."""
    return (
        f"rollout {active.id} of {active.candidate} is {active.stage}: one rollout at a "
        "time; finish, promote or roll it back first"
    )


def request(store: Store, name: str, *, adapter: str | None = None, by: str) -> CommandView:
    """Check and queue what a person asks; RolloutRefusal says why it cannot be done now."""
    if name not in COMMANDS:
        raise RolloutRefusal(f"unknown command {name!r}: one of {', '.join(COMMANDS)}")
    rollout_id = None
    if name == "start":
        if not adapter:
            raise RolloutRefusal("start needs the adapter to roll out")
        refusal = start_refusal(store, adapter)
        if refusal:
            raise RolloutRefusal(refusal)
    else:
        with store.session() as session:
            active = load_active(session)
        if active is None:
            raise RolloutRefusal(f"no rollout is in progress: nothing to {name}")
        command(active.config, active.state, _command(name), datetime.now(UTC))  # or refuses
        rollout_id = active.row.id
    with store.session() as session:
        row = RolloutCommand(command=name, adapter=adapter, by=by, rollout_id=rollout_id)
        session.add(row)
        session.flush()
        return CommandView.of(row)


def _command(name: str) -> Command:
    assert name in ("pause", "resume", "promote", "rollback")
    return name  # type: ignore[return-value]


def pending(store: Store) -> list[CommandView]:
    with store.session() as session:
        rows = session.scalars(
            select(RolloutCommand)
            .where(RolloutCommand.status == "pending")
            .order_by(RolloutCommand.id)
        )
        return [CommandView.of(row) for row in rows]


def settle(store: Store, command_id: int, status: str, result: str, rollout_id: int | None) -> None:
    with store.session() as session:
        row = session.get(RolloutCommand, command_id)
        assert row is not None
        row.status, row.result, row.rollout_id = status, result, rollout_id


def get_command(store: Store, command_id: int) -> CommandView | None:
    with store.session() as session:
        row = session.get(RolloutCommand, command_id)
        return None if row is None else CommandView.of(row)


def wait(store: Store, command_id: int, timeout_s: float = 60.0) -> CommandView:
    """Follow a request until the controller has carried it out (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = get_command(store, command_id)
        assert view is not None
        if view.status != "pending" or time.monotonic() >= deadline:
            return view
        time.sleep(0.5)
