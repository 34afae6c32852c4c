"""The monitor's Prometheus metrics, declared once, and the functions that publish into them.

A value that cannot be computed (too few exchanges, no references, a script ROUGE cannot
read) is not exported as 0 or NaN: its series is removed, so a dashboard shows a gap and
`absent()` alerts can fire, while `tunewatch_monitor_check_ok` says which check is stale.
Labels stay bounded: `adapter` names registered adapters (or `base`), `column` and
`method` come from the drift detector's fixed list, `variant` from ROUGE's three types.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Info

from monitor.calibration import Calibration
from monitor.drift import DriftResult
from monitor.quality import Quality
from monitor.signals import Signals

QUALITY_BLEU = Gauge(
    "tunewatch_quality_bleu", "Corpus BLEU (sacrebleu, 0-100) of the labelled window.", ["adapter"]
)  # noqa: E501
QUALITY_CHRF = Gauge(
    "tunewatch_quality_chrf", "Corpus chrF (sacrebleu, 0-100) of the labelled window.", ["adapter"]
)  # noqa: E501
QUALITY_ROUGE = Gauge(
    "tunewatch_quality_rouge", "Mean ROUGE F-measure (rouge-score, 0-1).", ["adapter", "variant"]
)
QUALITY_EXACT_MATCH = Gauge(
    "tunewatch_quality_exact_match_ratio", "Share of answers equal to their reference.", ["adapter"]
)
QUALITY_BASELINE_BLEU = Gauge(
    "tunewatch_quality_baseline_bleu",
    "Corpus BLEU of the adapter's first labelled window.",
    ["adapter"],
)
QUALITY_BASELINE_CHRF = Gauge(
    "tunewatch_quality_baseline_chrf",
    "Corpus chrF of the adapter's first labelled window.",
    ["adapter"],
)
QUALITY_BASELINE_EXACT_MATCH = Gauge(
    "tunewatch_quality_baseline_exact_match_ratio",
    "Exact-match share of the adapter's first labelled window.",
    ["adapter"],
)
QUALITY_SIGNATURE = Info(
    "tunewatch_quality_signature", "sacrebleu signatures of the BLEU and chrF figures."
)
CALIBRATION_ECE = Gauge(
    "tunewatch_calibration_ece", "Expected calibration error of answer confidence.", ["adapter"]
)
CALIBRATION_BRIER = Gauge(
    "tunewatch_calibration_brier", "Brier score of answer confidence vs correctness.", ["adapter"]
)
RESPONSE_MEAN_LOGPROB = Gauge(
    "tunewatch_response_mean_logprob", "Mean token logprob of answers in the window.", ["adapter"]
)
RESPONSE_LENGTH_TOKENS = Gauge(
    "tunewatch_response_length_tokens", "Mean answer length in the window.", ["adapter"]
)
RESPONSE_EMPTY = Gauge(
    "tunewatch_response_empty_ratio", "Share of empty answers in the window.", ["adapter"]
)
RESPONSE_REFUSAL = Gauge(
    "tunewatch_response_refusal_ratio", "Share of refusals in the window.", ["adapter"]
)
ERROR_RATIO = Gauge(
    "tunewatch_error_ratio", "Share of failed exchanges in the window.", ["adapter"]
)
# Two gauges, not a `quantile` label: that label belongs to summaries (promtool says so).
WINDOW_LATENCY_P50 = Gauge(
    "tunewatch_window_latency_p50_seconds", "Median latency of the window.", ["adapter"]
)
WINDOW_LATENCY_P95 = Gauge(
    "tunewatch_window_latency_p95_seconds", "95th-percentile latency of the window.", ["adapter"]
)
WINDOW_EXCHANGES = Gauge(
    "tunewatch_window_exchanges",
    "Exchanges in each window the monitor judged.",
    ["adapter", "window"],
)
DRIFT_SCORE = Gauge(
    "tunewatch_drift_score",
    "Drift score of one column (its method's own scale).",
    ["adapter", "column", "method"],
)
DRIFT_THRESHOLD = Gauge(
    "tunewatch_drift_threshold",
    "Threshold the column's drift score is judged against.",
    ["adapter", "column", "method"],
)
DRIFT_DETECTED = Gauge(
    "tunewatch_drift_detected",
    "1 if the column drifted in the last check, else 0.",
    ["adapter", "column"],
)
DRIFT_SHARE = Gauge(
    "tunewatch_drift_share_ratio", "Share of columns that drifted in the last check.", ["adapter"]
)
DRIFT_DATASET = Gauge(
    "tunewatch_drift_dataset_detected", "1 if the dataset drift verdict is positive.", ["adapter"]
)
CHECK_OK = Gauge(
    "tunewatch_monitor_check_ok",
    "1 if the check produced fresh figures, 0 if they are stale.",
    ["adapter", "check"],
)
LAST_SUCCESS = Gauge(
    "tunewatch_monitor_last_success_timestamp_seconds", "When the check last succeeded.", ["check"]
)
RUN_DURATION = Gauge(
    "tunewatch_monitor_run_duration_seconds", "How long the check's last run took.", ["check"]
)
CHECK_INTERVAL = Gauge(
    "tunewatch_monitor_check_interval_seconds",
    "How often the check is scheduled to run.",
    ["check"],
)
RUN_FAILURES = Counter(
    "tunewatch_monitor_run_failures_total", "Checks that raised an error.", ["check"]
)


def set_or_remove(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    """Set the series, or remove it when there is no honest value."""
    if value is None:
        try:
            gauge.remove(*labels)
        except KeyError:
            pass
    else:
        gauge.labels(*labels).set(value)


def publish_quality(adapter: str, result: Quality) -> None:
    set_or_remove(QUALITY_BLEU, (adapter,), result.bleu)
    set_or_remove(QUALITY_CHRF, (adapter,), result.chrf)
    for variant, value in result.rouge.items():
        set_or_remove(QUALITY_ROUGE, (adapter, variant), value)
    set_or_remove(QUALITY_EXACT_MATCH, (adapter,), result.exact_match_ratio)
    if result.bleu_signature and result.chrf_signature:
        QUALITY_SIGNATURE.info({"bleu": result.bleu_signature, "chrf": result.chrf_signature})
    WINDOW_EXCHANGES.labels(adapter, "labelled").set(result.n)
    CHECK_OK.labels(adapter, "quality").set(int(result.n > 0))


def publish_baseline(adapter: str, result: Quality) -> None:
    set_or_remove(QUALITY_BASELINE_BLEU, (adapter,), result.bleu)
    set_or_remove(QUALITY_BASELINE_CHRF, (adapter,), result.chrf)
    set_or_remove(QUALITY_BASELINE_EXACT_MATCH, (adapter,), result.exact_match_ratio)


def publish_calibration(adapter: str, result: Calibration) -> None:
    set_or_remove(CALIBRATION_ECE, (adapter,), result.ece)
    set_or_remove(CALIBRATION_BRIER, (adapter,), result.brier)
    CHECK_OK.labels(adapter, "calibration").set(int(result.ece is not None))


def publish_signals(adapter: str, result: Signals) -> None:
    WINDOW_EXCHANGES.labels(adapter, "current").set(result.n)
    set_or_remove(ERROR_RATIO, (adapter,), result.error_rate)
    set_or_remove(RESPONSE_MEAN_LOGPROB, (adapter,), result.mean_logprob)
    set_or_remove(RESPONSE_LENGTH_TOKENS, (adapter,), result.mean_response_tokens)
    set_or_remove(RESPONSE_EMPTY, (adapter,), result.empty_rate)
    set_or_remove(RESPONSE_REFUSAL, (adapter,), result.refusal_rate)
    set_or_remove(WINDOW_LATENCY_P50, (adapter,), result.latency_p50_seconds)
    set_or_remove(WINDOW_LATENCY_P95, (adapter,), result.latency_p95_seconds)
    CHECK_OK.labels(adapter, "signals").set(int(result.answered > 0))


def publish_drift(adapter: str, result: DriftResult) -> None:
    for column in result.columns:
        labels = (adapter, str(column.column), column.method)
        set_or_remove(DRIFT_SCORE, labels, column.score)
        set_or_remove(DRIFT_THRESHOLD, labels, column.threshold if column.judged else None)
        set_or_remove(
            DRIFT_DETECTED,
            (adapter, str(column.column)),
            None if column.drifted is None else float(column.drifted),
        )
    set_or_remove(DRIFT_SHARE, (adapter,), result.drift_share)
    dataset = None if result.drifted is None else float(result.drifted)
    set_or_remove(DRIFT_DATASET, (adapter,), dataset)
    WINDOW_EXCHANGES.labels(adapter, "reference").set(result.reference_size)
    CHECK_OK.labels(adapter, "drift").set(int(result.drifted is not None))


def record_run(check: str, duration_s: float, finished_at: float, ok: bool) -> None:
    RUN_DURATION.labels(check).set(duration_s)
    if ok:
        LAST_SUCCESS.labels(check).set(finished_at)
    else:
        RUN_FAILURES.labels(check).inc()
