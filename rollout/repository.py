"""The rollout row as the rollout's parts read and write it: one `load()` of the row with its
state and config, one `write_state()` of a new state.

The row's columns hold the stage, the step and when the stage began (they are queried and
shown); its `state` JSON holds the rest of what the machine remembers (where a pause came
from) beside the latest look; its `config` JSON the settings it runs under and the metric
its quality is scored with. A row written before the columns were the only copy keeps the
whole machine in its JSON: the columns, equal to it, are read instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from monitor.window import AnswerMetric
from rollout.guards.types import GuardConfig
from rollout.machine import ACTIVE_STAGES, RolloutConfig, RolloutState
from store.rollouts import Rollout


class UnknownRolloutError(LookupError):
    """No rollout has this id."""

    def __init__(self, rollout_id: int) -> None:
        super().__init__(f"no rollout with id {rollout_id} in the store")
        self.rollout_id = rollout_id


@dataclass(frozen=True)
class RolloutRecord:
    row: Rollout  # read through, written through only inside the session that loaded it
    state: RolloutState
    config: RolloutConfig

    @property
    def metric(self) -> AnswerMetric | None:
        """The score its quality is judged on: recorded at its start (before that was, with
        each look); None for a rollout that has neither."""
        return self.row.config.get("metric") or (self.row.state.get("look") or {}).get("metric")


def load(session: Session, rollout_id: int) -> RolloutRecord | None:
    row = session.get(Rollout, rollout_id)
    return None if row is None else record_of(row)


def load_active(session: Session) -> RolloutRecord | None:
    """The rollout in progress (one at a time), if any."""
    row = session.scalars(
        select(Rollout).where(Rollout.stage.in_(ACTIVE_STAGES)).order_by(Rollout.id).limit(1)
    ).first()
    return None if row is None else record_of(row)


def load_newest(session: Session, limit: int) -> list[RolloutRecord]:
    rows = session.scalars(select(Rollout).order_by(Rollout.id.desc()).limit(limit))
    return [record_of(row) for row in rows]


def record_of(row: Rollout) -> RolloutRecord:
    machine = dict((row.state or {}).get("machine") or {})
    state = RolloutState.from_dict(
        {
            **machine,
            "stage": row.stage,
            "step": row.step,
            "stage_started_at": row.stage_started_at.isoformat(),
        }
    )
    return RolloutRecord(row, state, config_from_dict(row.config or {}))


def write_state(row: Rollout, state: RolloutState, **kept: Any) -> None:
    """The machine's state into the row, each part once; `kept`: the rest of its JSON."""
    machine = state.to_dict()
    row.stage, row.step = machine.pop("stage"), machine.pop("step")
    row.stage_started_at = state.stage_started_at
    del machine["stage_started_at"]
    row.state = {"machine": machine, **kept}


def config_to_dict(config: RolloutConfig, metric: AnswerMetric) -> dict[str, Any]:
    return {**dataclasses.asdict(config), "metric": metric}


def config_from_dict(data: dict[str, Any]) -> RolloutConfig:
    """The stored settings; keys this version does not know (a former one's) are left out."""
    guards = _known(GuardConfig, data.get("guards") or {})
    if "guards" in guards:
        guards["guards"] = tuple(guards["guards"])
    return RolloutConfig(
        **{
            **_known(RolloutConfig, data),
            "steps": tuple(data.get("steps", RolloutConfig().steps)),
            "guards": GuardConfig(**guards),
        },
    )


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}
