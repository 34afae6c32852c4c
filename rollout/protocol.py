"""What crosses the admin API's wire for rollouts: request bodies and answers (pydantic)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rollout.control import CommandView, RolloutView


class RolloutStartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1, description="The registered candidate to roll out.")


class RolloutInfo(BaseModel):
    id: int
    candidate: str
    baseline: str | None  # the primary it is compared with; None: the base model
    stage: str
    step: int
    weight: float
    steps: list[float]
    created_at: datetime
    stage_started_at: datetime
    finished_at: datetime | None
    reason: str
    look: dict[str, Any]

    @classmethod
    def of(cls, view: RolloutView) -> RolloutInfo:
        return cls(**{**view.__dict__, "steps": list(view.steps)})


class CommandInfo(BaseModel):
    id: int
    command: str
    adapter: str | None
    by: str
    status: str  # pending: the controller carries it out on its next tick
    result: str | None
    rollout_id: int | None

    @classmethod
    def of(cls, view: CommandView) -> CommandInfo:
        return cls(**view.__dict__)
