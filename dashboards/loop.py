"""Loop: the retrain trigger, training jobs, the registry, rollouts and their guards, the scheduler.

Every part of the loop runs on the one scheduler of the monitor's process; its leader is the
only writer of rollouts, so the rollout panels come from one daemon at a time.
"""

from dashboards.common import (
    ADAPTER,
    AFTER_ROLLOUT,
    Query,
    Row,
    board,
    increase,
    selector,
    stat_panel,
    state_panel,
    timeseries_panel,
)


def _per_rollout(metric: str, legend: str = "{{adapter}}") -> Query:
    return Query(selector(metric, ADAPTER), legend)


def _events(metric: str, by: str, legend: str) -> Query:
    return Query(f"sum by ({by}) ({increase(metric)})", legend)


BOARD = board(
    "loop",
    "tunewatch / Loop",
    "The closed loop: what the retrain trigger decided, the training jobs it started, the "
    "adapter versions in the registry, each rollout's stage and guards, and the scheduler "
    "that runs it all.",
    "tunewatch_requests_total",
    [
        Row(
            "Retraining",
            [
                timeseries_panel(
                    "Trigger decisions",
                    "The retrain trigger's decisions per interval, by action: none (drift did "
                    "not hold, too few labels, cooldown or a rollout under way), retrain, "
                    "cancel_pending.",
                    _events("tunewatch_retrain_trigger_decisions_total", "action", "{{action}}"),
                    bars=True,
                ),
                timeseries_panel(
                    "Training jobs",
                    "Training jobs that ended per interval, by outcome. A failed job's reason "
                    "is in `tunewatch events --kind retrain.` and the controller's log.",
                    _events("tunewatch_training_jobs_total", "outcome", "{{outcome}}"),
                    bars=True,
                    only_after="a training job has ended",
                ),
                timeseries_panel(
                    "Running training job",
                    "Whether a training job runs (100% while one does) and its progress: steps "
                    "done / total steps.",
                    Query("max(tunewatch_training_job_running)", "running"),
                    Query("max(tunewatch_training_job_progress_ratio)", "progress"),
                    unit="percentunit",
                ),
                stat_panel(
                    "Registry",
                    "Adapter versions in the registry, by status.",
                    Query("sum by (status) (tunewatch_registry_adapters)", "{{status}}"),
                ),
            ],
        ),
        Row(
            "Rollout",
            [
                state_panel(
                    "Rollout stage",
                    "Each candidate's stage over time: shadow (mirrored traffic only), canary "
                    "(answering a share of users), paused, then promoted or rolled_back.",
                    Query(
                        f"{selector('tunewatch_rollout_stage', ADAPTER)} == 1",
                        "{{adapter}} {{stage}}",
                    ),
                    values={1: ("in stage", "blue")},
                    only_after=AFTER_ROLLOUT,
                ),
                timeseries_panel(
                    "Canary weight",
                    "Share of users each candidate answers, step by step.",
                    _per_rollout("tunewatch_canary_weight_ratio"),
                    unit="percentunit",
                    only_after=AFTER_ROLLOUT,
                ),
                state_panel(
                    "Guards",
                    "Each guard's verdict at the last look: pass or fail. A gap is "
                    "inconclusive: not enough evidence yet either way. One failed guard rolls "
                    "the candidate back.",
                    _per_rollout("tunewatch_rollout_guard_passed", "{{adapter}} {{guard}}"),
                    values={0: ("fail", "red"), 1: ("pass", "green")},
                    only_after="a guard has reached a verdict (absent while inconclusive)",
                ),
                timeseries_panel(
                    "Shadow agreement",
                    "Mean chrF/100 between the candidate's shadow answers and the primary's "
                    "to the same requests: 1 answers alike, near 0 answers otherwise.",
                    _per_rollout("tunewatch_shadow_agreement_ratio"),
                    unit="percentunit",
                    only_after=AFTER_ROLLOUT,
                ),
                timeseries_panel(
                    "Paired quality",
                    "Mean quality score (0-1) of candidate and primary on the same prompts "
                    "(shadow replays of labelled requests, golden runs) over the rollout.",
                    _per_rollout("tunewatch_rollout_quality_ratio", "{{adapter}} {{side}}"),
                    unit="percentunit",
                    only_after=AFTER_ROLLOUT,
                ),
                timeseries_panel(
                    "Latency p95: candidate vs primary",
                    "95th-percentile latency of candidate and primary over the rollout.",
                    _per_rollout("tunewatch_rollout_latency_p95_seconds", "{{adapter}} {{side}}"),
                    unit="s",
                    only_after=AFTER_ROLLOUT,
                ),
            ],
        ),
        Row(
            "Scheduler",
            [
                state_panel(
                    "Scheduler leader",
                    "Which daemon holds the scheduler lease and runs the loop's jobs. Exactly "
                    "one should be leader; none for longer than the lease means no checks run.",
                    Query("tunewatch_scheduler_leader", "{{instance}}"),
                    values={0: ("standby", "text"), 1: ("leader", "green")},
                ),
                timeseries_panel(
                    "Job runs",
                    "Scheduled job runs per interval, by job and outcome.",
                    _events(
                        "tunewatch_scheduler_job_runs_total",
                        "scheduler_job, outcome",
                        "{{scheduler_job}} {{outcome}}",
                    ),
                    bars=True,
                ),
                timeseries_panel(
                    "Job durations",
                    "How long each scheduled job's last run took. A job near its own interval "
                    "delays the ones after it (the scheduler runs one at a time).",
                    Query("tunewatch_scheduler_job_duration_seconds", "{{scheduler_job}}"),
                    unit="s",
                ),
            ],
        ),
    ],
)
