"""The retrain trigger's and the training jobs' Prometheus metrics, declared once.

They are exported on the monitor sidecar's /metrics, the process that runs the scheduler.
Labels stay bounded: `action` is one of the trigger's three actions, `outcome` a job's end
state.
"""

from typing import get_args

from prometheus_client import Counter, Gauge

from retrain.policy import Action

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

# Each known label value starts at 0: the first event is then an increase Prometheus sees.
for _action in get_args(Action):
    TRIGGER_DECISIONS.labels(_action)
for _outcome in ("succeeded", "failed", "cancelled"):
    TRAINING_JOBS.labels(_outcome)
