"""The schema, one layer below everything that reads or writes it.

Each module holds one concern's tables and the writes (and plain reads) that every process
shares; the analysis of those rows belongs to the layer that does it (monitor.traffic reads
windows of exchanges, rollout.repository reads a rollout, registry reads adapter versions).
`Store` puts the concerns together: one instance per process, every table made, or the
database's revision checked (store.schema), at once (a foreign key crosses concerns:
adapters.job_id -> training_jobs.id).
"""

from store import jobs, rollouts  # noqa: F401  (their tables must exist before create_all)
from store.adapters import AdapterRecords
from store.drift import DriftRecords
from store.events import EventRecords
from store.exchanges import ExchangeRecords
from store.retention import RetentionRecords
from store.schema import ensure_current

__all__ = ["Store"]


class Store(ExchangeRecords, AdapterRecords, DriftRecords, EventRecords, RetentionRecords):
    """All the schema's shared reads and writes; one instance per process."""

    def __init__(self, url: str, wait_s: float | None = None) -> None:
        super().__init__(url, wait_s)
        ensure_current(self.engine)  # made at the newest revision, or refused if older
