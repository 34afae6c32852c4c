"""The rollout job: each tick, carries out what people asked, starts the next candidate, and
looks once at the rollout in progress: gathers its evidence from the store, asks
`rollout.machine.decide_rollout`, and applies the transition.

The evidence and what it is: rollout/evidence.py.

Applying a transition is one transaction: the rollout row, the routing table, the adapters'
statuses and its event, so no reader ever sees half of it. The engine is told afterwards:
the candidate is loaded before the rollout starts (an adapter vLLM refuses fails the start,
and is marked failed, before any routing changes); an adapter leaving the routing table (a
rolled-back candidate, a retired primary) is marked unloaded at once, so no gateway reloads
it, and unloaded from vLLM only `drain_s` later, once every gateway has re-read the routing
table and its in-flight requests are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from monitor.quality import answer_score
from monitor.window import AnswerMetric
from registry.versions import change_status, status_counts
from rollout import control, metrics
from rollout.control import CommandView
from rollout.evidence import RolloutEvidence
from rollout.guards.sequences import judge
from rollout.machine import (
    FINISHED,
    Observation,
    RolloutConfig,
    RolloutRefusal,
    RolloutState,
    Transition,
    command,
    decide_rollout,
    start,
)
from rollout.repository import RolloutRecord, config_to_dict, load, load_active, write_state
from serving.engine import EngineClient, EngineUnavailableError, InvalidAdapterError
from store import Store
from store.adapters import Adapter, RoutingTable, add_routing_change
from store.base import json_safe
from store.events import ControllerState, Event
from store.rollouts import ONE_ACTIVE, Rollout

log = logging.getLogger(__name__)

UNLOADS = "rollout.unloads"  # controller_state: adapters to unload from vLLM, and when


@dataclass(frozen=True)
class RunnerConfig:
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    metric: AnswerMetric = "chrf"
    auto_start: bool = True  # roll out every new candidate, oldest first
    drain_s: float = 15.0  # between leaving the routing table and leaving vLLM


def routing_for(state: RolloutState, row: Rollout, config: RolloutConfig) -> RoutingTable:
    """The routing table a rollout in this state stands for."""
    stage = state.paused_from[0] if state.stage == "paused" and state.paused_from else state.stage
    if stage == "shadow":
        return RoutingTable(
            primary=row.baseline, shadow=row.candidate, shadow_fraction=config.shadow_fraction
        )
    if stage == "canary":  # still mirrored: the paired quality evidence keeps growing
        return RoutingTable(
            primary=row.baseline,
            canary=row.candidate,
            canary_weight=state.weight(config),
            shadow=row.candidate,
            shadow_fraction=config.shadow_fraction,
        )
    if stage == "promoted":
        return RoutingTable(primary=row.candidate)
    return RoutingTable(primary=row.baseline)


class RolloutRunner:
    """The scheduler's rollout job, with the engine it loads and unloads adapters on."""

    def __init__(
        self,
        store: Store,
        engine: EngineClient,
        config: RunnerConfig,
        *,
        golden: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store, self.engine, self.config = store, engine, config
        self.golden = golden  # a golden run of every routed adapter (the monitor's)
        self._evidence: RolloutEvidence | None = None  # the rollout in progress's, so far
        self._tasks: set[asyncio.Task[None]] = set()

    async def tick(self) -> None:
        metrics.publish_registry(await asyncio.to_thread(status_counts, self.store))
        await self._unload_drained()
        for request in await asyncio.to_thread(control.pending, self.store):
            await self._carry_out(request)
        active = await asyncio.to_thread(control.active_rollout, self.store)
        if active is None:
            if self.config.auto_start:
                candidate = await asyncio.to_thread(self._next_candidate)
                if candidate is not None:
                    try:
                        await self.start(candidate, by="auto", reason="a new candidate")
                    except RolloutRefusal as exc:  # recorded where it matters; retried next tick
                        log.warning("rollout not started: %s", exc, extra={"adapter": candidate})
            return
        await asyncio.to_thread(self.look, active.id)

    def _next_candidate(self) -> str | None:
        with self.store.session() as session:
            query = (
                select(Adapter.name)
                .where(Adapter.status == "candidate")
                .order_by(Adapter.created_at)
                .limit(1)
            )
            name = session.scalar(query)
        if name is None or control.start_refusal(self.store, name):
            return None
        return name

    # starting

    async def start(self, adapter: str, *, by: str, reason: str) -> int:
        """Load the candidate and start its rollout in shadow; RolloutRefusal says why not."""
        refusal = await asyncio.to_thread(control.start_refusal, self.store, adapter)
        if refusal:
            raise RolloutRefusal(refusal)
        with self.store.session() as session:
            path = session.get(Adapter, adapter).path  # type: ignore[union-attr]
        try:
            await self.engine.load_adapter(adapter, path)
        except InvalidAdapterError as exc:
            why = f"the engine refused to load it: {exc}"
            await asyncio.to_thread(self._refuse_start, adapter, why)
            raise RolloutRefusal(why) from None
        except EngineUnavailableError as exc:
            raise RolloutRefusal(f"the engine is unavailable, try again: {exc}") from None
        rollout_id = await asyncio.to_thread(self._begin, adapter, by, reason)
        if self.golden is not None:
            task = asyncio.create_task(self._golden_run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return rollout_id

    def _refuse_start(self, adapter: str, why: str) -> None:
        with self.store.session() as session:
            change_status(session, adapter, "failed", why)
            session.add(Event(kind="rollout.refused", subject=adapter, reason=why))

    def _begin(self, adapter: str, by: str, reason: str) -> int:
        """The rollout's row, routing, status and event in one transaction; RolloutRefusal when
        another started since the check (the database holds one in progress at most)."""
        try:
            return self._insert(adapter, by, reason)
        except IntegrityError as exc:
            active = control.active_rollout(self.store)
            if ONE_ACTIVE not in str(exc.orig) or active is None:
                raise
            raise RolloutRefusal(control.one_at_a_time(active)) from None

    def _insert(self, adapter: str, by: str, reason: str) -> int:
        now = datetime.now(UTC)
        config = self.config.rollout
        state = start(now)
        primary = (self.store.routing_table() or RoutingTable()).primary
        with self.store.session() as session:
            row = Rollout(
                candidate=adapter,
                baseline=primary,
                created_at=now,
                config=config_to_dict(config, self.config.metric),
                reason=f"started ({by}): {reason}; shadow at {config.shadow_fraction:.0%}",
            )
            write_state(row, state)
            session.add(row)
            session.flush()
            table = routing_for(state, row, config)
            add_routing_change(session, table, f"rollout {row.id}: {adapter} in shadow")
            candidate = change_status(session, adapter, "shadow", f"rollout {row.id} started")
            candidate.loaded = True
            session.add(
                Event(
                    kind="rollout.started",
                    subject=f"rollout-{row.id}",
                    reason=row.reason,
                    data={
                        "candidate": adapter,
                        "baseline": primary,
                        "by": by,
                        "stage": "shadow",
                        "step": -1,
                        "weight": 0.0,
                        "config": row.config,
                    },
                )
            )
            rollout_id = row.id
        metrics.publish_rollout(adapter, state.stage, 0.0)
        log.info("rollout started", extra={"rollout": rollout_id, "candidate": adapter})
        return rollout_id

    async def _golden_run(self) -> None:
        try:
            assert self.golden is not None
            await self.golden()
        except Exception:
            log.exception("golden run at the start of a rollout failed")

    # looking and moving

    def _evidence_of(self, rollout: RolloutRecord) -> RolloutEvidence:
        """The rollout's evidence, read whole at its first look in this process (and after a
        restart), then only what is new: kept in memory, since a full reading gives the same."""
        if self._evidence is None or self._evidence.rollout_id != rollout.row.id:
            metric = rollout.metric or self.config.metric  # the one it started with
            score = partial(answer_score, metric=metric)
            self._evidence = RolloutEvidence(rollout.row, metric, score)
        return self._evidence

    def look(self, rollout_id: int) -> Transition:
        """One look at the rollout: decide on its evidence, apply, record."""
        with self.store.session() as session:
            rollout = load(session, rollout_id)
        assert rollout is not None
        evidence = self._evidence_of(rollout)
        try:
            evidence.update(self.store)
        except Exception:
            self._evidence = None  # read in part: the next look reads it whole
            raise
        gathered = evidence.gathered(rollout.state)
        judgement = judge(gathered.evidence, rollout.config.guards)
        now = datetime.now(UTC)
        observation = Observation(now, gathered.stage_samples, judgement, gathered.live_rate)
        transition = decide_rollout(rollout.config, rollout.state, observation)
        transition = replace(transition, figures={**transition.figures, **gathered.figures})
        metrics.publish_look(rollout.row.candidate, judgement, gathered.figures)
        read = rollout.row.version
        if transition.action == "none":
            self._note(rollout_id, transition, read)
        elif not self.apply(rollout_id, transition, by="auto", read_version=read):
            return replace(transition, state=rollout.state, action="none")
        return transition

    def _note(self, rollout_id: int, transition: Transition, read_version: int) -> None:
        """A look that moved nothing: kept on the row (what `status` shows), not an event."""
        with self.store.session() as session:
            if not _still(session, rollout_id, read_version, transition):
                return
            row = session.get(Rollout, rollout_id)
            assert row is not None
            row.state = {
                **row.state,
                "look": json_safe(transition.figures),
                "waiting": transition.reason,
            }

    def apply(self, rollout_id: int, transition: Transition, *, by: str, read_version: int) -> bool:
        """The transition in one transaction: rollout row, routing, statuses, unloads, event;
        False (and dropped) when the rollout is no longer at `read_version`, the one decided on."""
        now = datetime.now(UTC)
        with self.store.session() as session:
            if not _still(session, rollout_id, read_version, transition):
                return False
            rollout = load(session, rollout_id)
            assert rollout is not None
            row, config, before = rollout.row, rollout.config, rollout.state
            after = transition.state
            write_state(row, after, look=json_safe(transition.figures))
            row.reason = transition.reason
            if after.stage in FINISHED:
                row.finished_at = now
            table, old = routing_for(after, row, config), routing_for(before, row, config)
            if table != old or after.stage in FINISHED:
                add_routing_change(session, table, f"rollout {rollout_id}: {transition.reason}")
            self._statuses(session, row, before, after, transition.reason, now)
            session.add(
                Event(
                    kind=f"rollout.{_past(transition.action)}",
                    subject=f"rollout-{rollout_id}",
                    reason=transition.reason,
                    data={
                        **json_safe(transition.figures),
                        "by": by,
                        "candidate": row.candidate,
                        "baseline": row.baseline,
                        "stage": after.stage,
                        "step": after.step,
                        "weight": after.weight(config),
                    },
                )
            )
            candidate = row.candidate
        if after.stage in FINISHED and self._evidence and self._evidence.rollout_id == rollout_id:
            self._evidence = None  # nothing looks at it again
        metrics.publish_rollout(candidate, after.stage, after.weight(config))
        if transition.action in ("promote", "rollback"):
            metrics.ROLLOUT_ENDS.labels(
                "promoted" if transition.action == "promote" else "rolled_back"
            ).inc()
        log.info(
            "rollout %s: %s",
            _past(transition.action),
            transition.reason,
            extra={"rollout": rollout_id},
        )
        return True

    def _statuses(
        self,
        session: Any,
        row: Rollout,
        before: RolloutState,
        after: RolloutState,
        reason: str,
        now: datetime,
    ) -> None:
        why = f"rollout {row.id}: {reason}"
        if after.stage == "canary" and before.stage != "canary":
            change_status(session, row.candidate, "canary", why)
        elif after.stage == "promoted":
            change_status(session, row.candidate, "primary", why)
            if row.baseline is not None:
                change_status(session, row.baseline, "retired", why)
                self._drain(session, row.baseline, now)
        elif after.stage == "rolled_back":
            change_status(session, row.candidate, "failed", why)
            self._drain(session, row.candidate, now)

    def _drain(self, session: Any, adapter: str, now: datetime) -> None:
        """Out of the store's loaded set now; out of vLLM after `drain_s`."""
        session.get(Adapter, adapter).loaded = False
        state = session.get(ControllerState, UNLOADS)
        due = (now + timedelta(seconds=self.config.drain_s)).isoformat()
        entry = {"adapter": adapter, "after": due}
        if state is None:
            session.add(ControllerState(name=UNLOADS, state={"pending": [entry]}))
        else:
            state.state = {"pending": [*state.state.get("pending", []), entry]}

    async def _unload_drained(self) -> None:
        pending = (await asyncio.to_thread(self.store.load_state, UNLOADS) or {}).get("pending", [])
        now, kept = datetime.now(UTC), []
        for entry in pending:
            if datetime.fromisoformat(entry["after"]) > now:
                kept.append(entry)
                continue
            try:
                await self.engine.unload_adapter(entry["adapter"])
            except EngineUnavailableError:
                kept.append(entry)  # the next tick tries again
                continue
            await asyncio.to_thread(
                self.store.record_event,
                "adapter.unloaded",
                "drained after its rollout",
                entry["adapter"],
            )
        if len(kept) != len(pending):
            await asyncio.to_thread(self.store.save_state, UNLOADS, {"pending": kept})

    # people

    async def _carry_out(self, request: CommandView) -> None:
        try:
            if request.command == "start":
                assert request.adapter is not None
                rollout_id = await self.start(
                    request.adapter, by=request.by, reason=f"asked by {request.by}"
                )
                result = f"rollout {rollout_id} of {request.adapter} started in shadow"
            else:
                rollout_id, result = await asyncio.to_thread(self._command, request)
        except RolloutRefusal as exc:
            await asyncio.to_thread(
                control.settle, self.store, request.id, "refused", str(exc), request.rollout_id
            )
            return
        await asyncio.to_thread(control.settle, self.store, request.id, "done", result, rollout_id)

    def _command(self, request: CommandView) -> tuple[int, str]:
        with self.store.session() as session:
            active = load_active(session)
        if active is None:
            raise RolloutRefusal(f"no rollout is in progress: nothing to {request.command}")
        name = request.command
        transition = command(active.config, active.state, name, datetime.now(UTC))  # type: ignore[arg-type]
        read = active.row.version
        if not self.apply(active.row.id, transition, by=request.by, read_version=read):
            raise RolloutRefusal("the rollout moved while this was carried out: ask again")
        return active.row.id, transition.reason


def _still(session: Session, rollout_id: int, read_version: int, transition: Transition) -> bool:
    """Take the rollout's next version if it is still the one read (an UPDATE ... WHERE
    version = read, so it holds the row until the transaction ends); if not, a newer state
    was written since (a stale leader's look, or another controller's): logged, recorded."""
    taken = session.execute(
        update(Rollout)
        .where(Rollout.id == rollout_id, Rollout.version == read_version)
        .values(version=read_version + 1)
    )
    if taken.rowcount == 1:
        return True
    reason = (
        f"dropped: decided on version {read_version}, which a newer state has replaced "
        f"({transition.reason})"
    )
    log.warning("stale rollout transition %s", reason, extra={"rollout": rollout_id})
    session.add(
        Event(
            kind="rollout.stale",
            subject=f"rollout-{rollout_id}",
            reason=reason,
            data={"read_version": read_version, "action": transition.action},
        )
    )
    return False


def _past(action: str) -> str:
    return {
        "advance": "advanced",
        "promote": "promoted",
        "rollback": "rolled_back",
        "pause": "paused",
        "resume": "resumed",
    }.get(action, action)
