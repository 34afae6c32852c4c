"""The trigger job: each new drift check of the serving adapter, judged by the retrain policy.

`retrain.policy.decide_retrain` is pure; this module gives it its inputs and carries out its
decision. Each drift check the monitor recorded for the serving adapter (the primary, or
the base model) is evaluated once, in order, whatever the two jobs' intervals: the id of
the last one judged is kept with the policy's state, in the store, so a restart neither
skips a check nor counts one twice, and keeps the cooldown and the daily budget. Every
evaluation is an event (`retrain.trigger`) with its reason and figures, fired or not; a
decision to retrain queues a training job, and `cancel_pending` cancels the queued one.
With `quality_drop` configured, each evaluation also measures the serving adapter's quality
on its newest labelled exchanges against its first ones (QualitySignal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy import select

from monitor.quality import quality
from monitor.traffic import count_labelled, labelled_exchanges
from monitor.window import ExchangeView, Window
from retrain import jobs, metrics
from retrain.policy import Observation, PendingJob, TriggerConfig, TriggerState, decide_retrain
from serving.exchange import BASE_LABEL
from store import Store
from store.adapters import Adapter, RoutingTable
from store.drift import DriftCheck

log = logging.getLogger(__name__)

STATE = "retrain.trigger"
ROLLOUT_STATUSES = ("candidate", "shadow", "canary")  # an adapter on its way to primary


@dataclass(frozen=True)
class TriggerMemory:
    """The policy's state, and which drift check of which adapter it last judged."""

    policy: TriggerState
    adapter: str | None = None
    last_check_id: int = 0
    job_id: int | None = None  # the job this trigger queued last

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "adapter": self.adapter,
            "last_check_id": self.last_check_id,
            "job_id": self.job_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TriggerMemory:
        if not data:
            return cls(TriggerState())
        return cls(
            TriggerState.from_dict(data.get("policy") or {}),
            data.get("adapter"),
            int(data.get("last_check_id", 0)),
            data.get("job_id"),
        )


@dataclass(frozen=True)
class QualitySignal:
    """The optional second signal: the serving adapter's quality on its newest labelled window
    against its first one (its baseline, as the first exchanges are its drift reference)."""

    metric: Literal["chrf", "exact_match", "rouge_l"] = "chrf"
    window: int = 200
    min_labelled: int = 30  # in each window; fewer: not judged

    def measure(self, store: Store, adapter: str) -> tuple[float | None, float | None]:
        current = labelled_exchanges(store, self.window, adapter=adapter)
        seen = {e.id for e in current}
        oldest = labelled_exchanges(store, self.window, adapter=adapter, newest=False)
        baseline = [e for e in oldest if e.id not in seen]
        if min(len(current), len(baseline)) < self.min_labelled:
            return None, None
        return self._score(adapter, current), self._score(adapter, baseline)

    def _score(self, adapter: str, exchanges: list[ExchangeView]) -> float | None:
        scores = quality(Window(adapter, tuple(exchanges)))
        return {
            "chrf": scores.chrf,
            "exact_match": scores.exact_match_ratio,
            "rouge_l": scores.rouge.get("rougeL"),
        }[self.metric]


class Trigger:
    def __init__(
        self, store: Store, config: TriggerConfig, quality: QualitySignal | None = None
    ) -> None:
        self.store, self.config = store, config
        self.quality = quality if config.quality_drop is not None else None

    def evaluate(self) -> None:
        """Judge every drift check of the serving adapter recorded since the last evaluation."""
        memory = TriggerMemory.from_dict(self.store.load_state(STATE))
        routing = self.store.routing_table() or RoutingTable()
        serving = routing.primary or BASE_LABEL
        if memory.adapter != serving:
            # A new primary has a new reference window: its drift starts from nothing, while
            # the cooldown and the budget (about retrains, not adapters) carry over.
            fresh = replace(
                memory.policy,
                drift_entered=False,
                drift_streak=0,
                quality_dropped=False,
                quality_streak=0,
            )
            memory = replace(memory, policy=fresh, adapter=serving)
        for check in self.store.drift_checks(serving, after_id=memory.last_check_id):
            memory = self._judge(memory, check, routing.primary)
            self.store.save_state(STATE, memory.to_dict())

    def _judge(
        self, memory: TriggerMemory, check: DriftCheck, primary: str | None
    ) -> TriggerMemory:
        policy = memory.policy
        measured = self.quality.measure(self.store, check.adapter) if self.quality else None
        current, baseline = measured or (None, None)
        observation = Observation(
            now=check.created_at,
            drift_share=check.share,
            drift_detected=check.detected,
            refusal=check.reason if check.share is None else None,
            quality=current,
            quality_baseline=baseline,
            new_labelled=count_labelled(
                self.store, since=policy.last_retrain_at, at_most=self.config.min_new_labelled
            ),
            rollout_in_progress=self._rollout_in_progress(),
            retrain_job=self._job_status(),
        )
        decision = decide_retrain(self.config, policy, observation)
        metrics.TRIGGER_DECISIONS.labels(decision.action).inc()
        subject = memory.adapter
        self.store.record_event(
            "retrain.trigger", decision.reason, subject, check_id=check.id, **decision.figures
        )
        job_id = memory.job_id
        if decision.action == "retrain":
            job_id = jobs.queue_job(self.store, decision.reason, primary)
            log.info("retrain decided: %s", decision.reason, extra={"job": job_id})
        elif decision.action == "cancel_pending" and job_id is not None:
            jobs.cancel(self.store, job_id, decision.reason)
        return replace(memory, policy=decision.state, last_check_id=check.id, job_id=job_id)

    def _rollout_in_progress(self) -> bool:
        with self.store.session() as session:
            query = select(Adapter.name).where(Adapter.status.in_(ROLLOUT_STATUSES)).limit(1)
            return session.scalar(query) is not None

    def _job_status(self) -> PendingJob:
        job = jobs.active_job(self.store)
        if job is None:
            return "none"
        return "running" if job.status == "running" else "queued"
