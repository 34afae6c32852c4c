"""Drift: the monitor's verdicts, and each column's score against the threshold that judged it.

The current window (the last exchanges) is compared with the reference (the adapter's
training data or first exchanges), column by column; the dataset drifts when enough columns do.
"""

from grafana_foundation_sdk.models.dashboard import DynamicConfigValue

from dashboards.common import ADAPTER, Query, Row, board, selector, state_panel, timeseries_panel

DRIFT = {0: ("no drift", "green"), 1: ("drift", "red")}

_scores = timeseries_panel(
    "Column scores against thresholds",
    "Each column's drift score (solid) and the threshold it is judged against (dashed), on its "
    "method's own scale. For p-value methods a column drifts when its score falls to the "
    "threshold; for distances, AUCs and MMD when it rises over it.",
    Query(selector("tunewatch_drift_score", ADAPTER), "{{adapter}} {{column}} ({{method}})"),
    Query(selector("tunewatch_drift_threshold", ADAPTER), "{{adapter}} {{column}} threshold"),
)
_scores.builder.override_by_query(
    "B", [DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})]
)

BOARD = board(
    "drift",
    "tunewatch / Drift",
    "Whether the traffic each adapter sees still looks like its reference data: the dataset "
    "verdict that feeds the retrain trigger, and the columns behind it.",
    "tunewatch_window_exchanges",
    [
        Row(
            "Verdicts",
            [
                state_panel(
                    "Dataset drift",
                    "The dataset verdict of each drift check. The retrain trigger acts on "
                    "drift that holds for several consecutive checks.",
                    Query(selector("tunewatch_drift_dataset_detected", ADAPTER), "{{adapter}}"),
                    values=DRIFT,
                ),
                state_panel(
                    "Columns drifted",
                    "Which columns drifted at each check: prompt text, prompt descriptors, "
                    "prompt embeddings, output descriptors. Prompt columns alone: the users ask "
                    "other things; output columns alone: the adapter answers differently.",
                    Query(selector("tunewatch_drift_detected", ADAPTER), "{{adapter}} {{column}}"),
                    values=DRIFT,
                ),
                timeseries_panel(
                    "Drift share",
                    "Share of the judged columns that drifted.",
                    Query(selector("tunewatch_drift_share_ratio", ADAPTER), "{{adapter}}"),
                    unit="percentunit",
                ),
                timeseries_panel(
                    "Window sizes",
                    "Exchanges in each window the monitor judged: current (the last "
                    "exchanges), reference, and labelled (with a reference answer). A window "
                    "below the configured minimum is not judged.",
                    Query(
                        selector("tunewatch_window_exchanges", ADAPTER), "{{adapter}} {{window}}"
                    ),
                ),
            ],
        ),
        Row("Columns", [_scores]),
    ],
)
