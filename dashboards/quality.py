"""Quality and calibration: each adapter's scores on labelled traffic against its own baseline.

The baseline is an adapter's first labelled window, the same figure the retrain trigger's
quality drop is measured from. Label-free signals cover the traffic no one labelled.
"""

from dashboards.common import ADAPTER, Query, Row, board, selector, state_panel, timeseries_panel


def _series(metric: str, legend: str = "{{adapter}}") -> Query:
    return Query(selector(metric, ADAPTER), legend)


def _against_baseline(title: str, description: str, metric: str, unit: str = "short"):
    """A quality score per adapter, with its baseline in the same panel."""
    baseline = metric.replace("tunewatch_quality_", "tunewatch_quality_baseline_")
    return timeseries_panel(
        title,
        f"{description} Each adapter's baseline (its first labelled window) is drawn beside "
        "it: a line falling away from its baseline is a quality drop.",
        _series(metric),
        _series(baseline, "{{adapter}} baseline"),
        unit=unit,
    )


BOARD = board(
    "quality",
    "tunewatch / Quality and calibration",
    "Quality scores of each adapter's labelled window (goldens and feedback references) against "
    "its baseline, the calibration of its confidence, and the label-free signals of all traffic.",
    "tunewatch_window_exchanges",
    [
        Row(
            "Against references",
            [
                _against_baseline(
                    "BLEU", "Corpus BLEU (sacrebleu, 0-100).", "tunewatch_quality_bleu"
                ),
                _against_baseline(
                    "chrF", "Corpus chrF (sacrebleu, 0-100).", "tunewatch_quality_chrf"
                ),
                _against_baseline(
                    "Exact match",
                    "Share of answers equal to their reference.",
                    "tunewatch_quality_exact_match_ratio",
                    unit="percentunit",
                ),
                timeseries_panel(
                    "ROUGE",
                    "Mean ROUGE F-measure (0-1) by variant: rouge1 and rouge2 count shared "
                    "words and word pairs, rougeL the longest shared sequence.",
                    _series("tunewatch_quality_rouge", "{{adapter}} {{variant}}"),
                ),
                timeseries_panel(
                    "Calibration",
                    "Expected calibration error and Brier score of the answers' confidence "
                    "(from token logprobs) against correctness. Lower is better; ECE rising "
                    "means the confidence no longer says how often the adapter is right.",
                    _series("tunewatch_calibration_ece", "{{adapter}} ECE"),
                    _series("tunewatch_calibration_brier", "{{adapter}} Brier"),
                ),
                state_panel(
                    "Fresh figures",
                    "Whether each check produced figures at its last run. Stale: too few "
                    "exchanges or references in the window, so the last figures stand.",
                    _series("tunewatch_monitor_check_ok", "{{adapter}} {{check}}"),
                    values={0: ("stale", "orange"), 1: ("fresh", "green")},
                ),
            ],
        ),
        Row(
            "Label-free signals: every exchange in the window",
            [
                timeseries_panel(
                    "Mean token logprob",
                    "Mean log-probability of the answers' tokens. A drop means the adapter is "
                    "less sure of what it says, often before the quality scores show it.",
                    _series("tunewatch_response_mean_logprob"),
                ),
                timeseries_panel(
                    "Answer length",
                    "Mean answer length in tokens. A sudden change in length is a change in "
                    "behaviour even without references.",
                    _series("tunewatch_response_length_tokens"),
                ),
                timeseries_panel(
                    "Empty answers and refusals",
                    "Share of answers that are empty, and share that refuse.",
                    _series("tunewatch_response_empty_ratio", "{{adapter}} empty"),
                    _series("tunewatch_response_refusal_ratio", "{{adapter}} refusal"),
                    unit="percentunit",
                ),
                timeseries_panel(
                    "Failed exchanges",
                    "Share of the window's exchanges that failed (errors recorded by the gateway).",
                    _series("tunewatch_error_ratio"),
                    unit="percentunit",
                ),
                timeseries_panel(
                    "Window latency",
                    "Median and 95th-percentile latency of the exchanges in the window, as "
                    "recorded in the store.",
                    _series("tunewatch_window_latency_p50_seconds", "{{adapter}} p50"),
                    _series("tunewatch_window_latency_p95_seconds", "{{adapter}} p95"),
                    unit="s",
                ),
            ],
        ),
    ],
)
