"""The schema, one layer below everything that reads or writes it.

Each module holds one concern's tables and the writes (and plain reads) that every process
shares; the analysis of those rows belongs to the layer that does it (monitor.traffic reads
windows of exchanges, rollout.repository reads a rollout, registry reads adapter versions).
`Store` puts the concerns together: one instance per process, every table created and
checked at once (a foreign key crosses concerns: adapters.job_id -> training_jobs.id).
"""

from store import jobs, rollouts  # noqa: F401  (their tables must exist before create_all)
from store.adapters import AdapterRecords
from store.drift import DriftRecords
from store.events import EventRecords
from store.exchanges import ExchangeRecords

__all__ = ["Store"]


class Store(ExchangeRecords, AdapterRecords, DriftRecords, EventRecords):
    """All the schema's shared reads and writes; one instance per process."""
