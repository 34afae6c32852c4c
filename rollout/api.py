"""The admin API of rollouts (`/admin/rollouts`), mounted on the gateway by the composition
root behind the admin token. It calls retrain/control.py, as the CLI does: a request
is checked at once (409 with the reason when it cannot be done now) and carried out by the
controller on its next tick (202 with the command to follow)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path

from rollout import control
from rollout.machine import RolloutRefusal
from rollout.protocol import CommandInfo, RolloutInfo, RolloutStartRequest
from serving.protocol import ROW_ID_MAX, OpenAIError
from store import Store

RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX)]  # beyond: a 400, not the database's refusal


def rollout_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/admin/rollouts")

    def queue(command: str, adapter: str | None = None) -> CommandInfo:
        try:
            view = control.request(store, command, adapter=adapter, by="admin api")
        except RolloutRefusal as exc:
            raise OpenAIError(409, str(exc), code="rollout_conflict") from None
        return CommandInfo.of(view)

    @router.get("")
    def list_rollouts() -> list[RolloutInfo]:
        return [RolloutInfo.of(view) for view in control.rollouts(store)]

    @router.get("/current")
    def current() -> RolloutInfo:
        view = control.active_rollout(store)
        if view is None:
            raise OpenAIError(404, "No rollout is in progress.", code="no_rollout")
        return RolloutInfo.of(view)

    @router.get("/{rollout_id}")
    def one(rollout_id: RowId) -> RolloutInfo:
        view = control.get_rollout(store, rollout_id)
        if view is None:
            raise OpenAIError(404, f"No rollout {rollout_id}.", code="rollout_not_found")
        return RolloutInfo.of(view)

    @router.post("", status_code=202)
    def start(body: RolloutStartRequest) -> CommandInfo:
        return queue("start", body.adapter)

    @router.post("/current/{command}", status_code=202)
    def act(command: Literal["pause", "resume", "promote", "rollback"]) -> CommandInfo:
        return queue(command)

    @router.get("/commands/{command_id}")
    def follow(command_id: RowId) -> CommandInfo:
        view = control.get_command(store, command_id)
        if view is None:
            raise OpenAIError(404, f"No rollout command {command_id}.", code="command_not_found")
        return CommandInfo.of(view)

    return router
