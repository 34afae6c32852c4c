"""The controller's Prometheus metrics (scheduler, trigger, training jobs), declared once.

They are exported on the monitor sidecar's /metrics, the process that runs the scheduler.
Labels stay bounded: `job` names one of the scheduler's fixed jobs, `action` one of the
trigger's three actions, `outcome` a job's end state.
"""

from prometheus_client import Counter, Gauge

LEADER = Gauge(
    "tunewatch_scheduler_leader",
    "1 while this daemon holds the scheduler lease and runs the scheduled jobs, else 0.",
)
JOB_RUNS = Counter(
    "tunewatch_scheduler_job_runs_total", "Scheduled job runs, by job and outcome.",
    ["job", "outcome"],
)  # fmt: skip
JOB_DURATION = Gauge(
    "tunewatch_scheduler_job_duration_seconds", "How long the job's last run took.", ["job"]
)
TRIGGER_DECISIONS = Counter(
    "tunewatch_retrain_trigger_decisions_total",
    "Evaluations of the retrain trigger, by the action decided (none, retrain, cancel_pending).",
    ["action"],
)
TRAINING_JOBS = Counter(
    "tunewatch_training_jobs_total",
    "Training jobs that ended, by outcome (succeeded, failed, cancelled).",
    ["outcome"],
)
TRAINING_RUNNING = Gauge("tunewatch_training_job_running", "1 while a training job runs, else 0.")
TRAINING_PROGRESS = Gauge(
    "tunewatch_training_job_progress_ratio", "Steps done / total steps of the running job."
)
