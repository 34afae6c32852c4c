"""The retention job: exchanges (and their request JSON, feedback and shadow replays) older than
`store.retention_days`, or beyond the newest `store.retention_max_exchanges`, are deleted on a
schedule, never what a reader still needs:

- a rollout in progress reads every exchange since it started (rollout.evidence);
- a queued training job will read the newest labelled exchanges (retrain.jobs.prepare), a
  running one was built from its window (kept from the window's first exchange, so what its
  candidate is traced to outlives the run);
- the monitor holds each adapter's later windows against its first ones: its drift reference
  (the first `reference_size` live exchanges) and its quality baseline (the first labelled
  and golden windows). Deleting them would move the reference under the drift checks, so each
  adapter keeps its exchanges up to the last of those; one whose reference is still filling
  keeps them all.

What is protected is read through the same readers that read it, so the two cannot disagree.
Each prune that deletes anything is an event (`store.pruned`) with its counts, the rule that
asked and what held it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from controller import metrics
from monitor.traffic import adapter_labels, baseline_window, labelled_exchanges, read_window
from retrain.jobs import UNFINISHED
from rollout.repository import load_active
from store import Store
from store.base import utcnow
from store.jobs import TrainingJob

log = logging.getLogger(__name__)

FOREVER = datetime.max.replace(tzinfo=utcnow().tzinfo)  # an adapter whose reference still fills


@dataclass(frozen=True)
class RetentionConfig:
    max_age: timedelta | None  # None: no limit by age
    max_exchanges: int | None  # None: no limit by count
    batch: int  # exchanges deleted per transaction
    base_adapter: str | None  # the identity adapter's name (the base model's under another label)
    reference_size: int  # the monitor's: an adapter's drift reference
    window_size: int  # the monitor's: an adapter's quality baseline window
    max_examples: int  # a training job's set: the newest labelled exchanges


class Retention:
    """One prune per run (`run`), on the controller's scheduler."""

    def __init__(
        self, store: Store, config: RetentionConfig, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.store, self.config, self.clock = store, config, clock

    def run(self) -> None:
        asked = self._asked()
        if asked is None:
            return
        before, why = asked
        held = self._held_since()
        if held:
            before = min(before, *held.values())
        kept = self._references()
        pruned = self.store.prune_exchanges(before, kept, batch=self.config.batch)
        for table, rows in (("exchanges", pruned.exchanges), ("feedback", pruned.feedback)):
            metrics.PRUNED_ROWS.labels(table).inc(rows)
        if pruned.exchanges:
            log.info("exchanges pruned", extra={"exchanges": pruned.exchanges, "before": before})
            self.store.record_event(
                "store.pruned",
                f"{pruned.exchanges} exchanges and {pruned.feedback} feedback rows deleted: {why}",
                exchanges=pruned.exchanges,
                feedback=pruned.feedback,
                before=before.isoformat(),
                held_since={name: at.isoformat() for name, at in held.items()},
                adapters_kept_until={
                    a: None if at == FOREVER else at.isoformat() for a, at in kept.items()
                },
            )

    def _asked(self) -> tuple[datetime, str] | None:
        """The instant the settings delete before (the later of the two rules), and why."""
        asked: list[tuple[datetime, str]] = []
        if self.config.max_age is not None:
            asked.append((self.clock() - self.config.max_age, f"older than {self.config.max_age}"))
        if self.config.max_exchanges is not None:
            last = self.store.nth_newest_arrival(self.config.max_exchanges)
            if last is not None:
                asked.append((last, f"beyond the newest {self.config.max_exchanges} exchanges"))
        return max(asked) if asked else None

    def _held_since(self) -> dict[str, datetime]:
        """What reads every exchange from an instant on: a rollout in progress, training jobs."""
        held: dict[str, datetime] = {}
        with self.store.session() as session:
            rollout = load_active(session)
            if rollout is not None:
                held[f"rollout {rollout.row.id}"] = rollout.row.created_at
            unfinished = select(TrainingJob).where(TrainingJob.status.in_(UNFINISHED))
            jobs = list(session.scalars(unfinished))
        for job in jobs:
            window = (job.progress or {}).get("window")
            if window:  # its set is built
                held[f"training job {job.id}"] = datetime.fromisoformat(window[0])
            else:  # it will read the newest labelled exchanges
                labelled = labelled_exchanges(self.store, self.config.max_examples)
                if labelled:
                    held[f"training job {job.id}"] = labelled[-1].created_at
        return held

    def _references(self) -> dict[str, datetime]:
        """Per adapter the monitor judges: its exchanges up to the last of its first windows."""
        kept: dict[str, datetime] = {}
        for adapter in adapter_labels(self.store, self.config.base_adapter):
            reference = read_window(self.store, adapter, self.config.reference_size, newest=False)
            if len(reference) < self.config.reference_size:
                kept[adapter] = FOREVER
                continue
            baseline = baseline_window(self.store, adapter, self.config.window_size)
            kept[adapter] = max(e.created_at for e in reference.exchanges + baseline.exchanges)
        return kept
