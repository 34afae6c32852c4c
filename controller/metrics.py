"""The scheduler's Prometheus metrics, declared once; exported on the monitor sidecar's /metrics
(the process that runs the scheduler). `scheduler_job` names one of the scheduler's fixed jobs
(not `job`, which Prometheus gives every scraped series); `table` one the retention job
deletes from."""

from prometheus_client import Counter, Gauge

LEADER = Gauge(
    "tunewatch_scheduler_leader",
    "1 while this daemon holds the scheduler lease and runs the scheduled jobs, else 0.",
)
JOB_RUNS = Counter(
    "tunewatch_scheduler_job_runs_total",
    "Scheduled job runs, by job and outcome.",
    ["scheduler_job", "outcome"],
)
JOB_DURATION = Gauge(
    "tunewatch_scheduler_job_duration_seconds",
    "How long the job's last run took.",
    ["scheduler_job"],
)
PRUNED_ROWS = Counter(
    "tunewatch_retention_pruned_rows_total",
    "Rows the retention job deleted, by table (exchanges, feedback).",
    ["table"],
)

# Each known label value starts at 0: the first prune is then an increase Prometheus sees.
for _table in ("exchanges", "feedback"):
    PRUNED_ROWS.labels(_table)
