"""Overview: is tunewatch serving, what is it serving, and is anything wrong, on one screen."""

from dashboards.common import (
    ADAPTER,
    AFTER_ROLLOUT,
    Query,
    Row,
    board,
    error_ratio,
    quantile,
    ratio,
    requests,
    selector,
    stat_panel,
    timeseries_panel,
)

UP = {0: ("down", "red"), 1: ("up", "green")}
# The routing gauges as the gateways see them: every process that imports serving/ declares
# them, and the monitor's would read 0. Several gateways agree on one table.
GATEWAY = 'max({}{{job="tunewatch-gateway"}})'

BOARD = board(
    "overview",
    "tunewatch / Overview",
    "What is serving, whether every part is up and fresh, and the traffic's rate, errors and "
    "latency. Start here; the other tunewatch boards are in the links menu.",
    "tunewatch_requests_total",
    [
        Row(
            "Now",
            [
                stat_panel(
                    "Serving",
                    "Which adapter answers each route of the routing table: primary for most "
                    "users, canary for the share of users below, shadow for mirrored requests.",
                    Query("tunewatch_routing_adapter == 1", "{{route}}: {{adapter}}"),
                    names=True,
                ),
                stat_panel(
                    "Canary weight",
                    "Share of users the canary answers. 0 while no rollout is in its canary steps.",
                    Query(GATEWAY.format("tunewatch_routing_canary_weight_ratio"), "canary"),
                    unit="percentunit",
                ),
                stat_panel(
                    "Shadow fraction",
                    "Share of primary and canary requests replayed on the shadow adapter.",
                    Query(GATEWAY.format("tunewatch_routing_shadow_fraction_ratio"), "shadow"),
                    unit="percentunit",
                ),
                stat_panel(
                    "Rollout stage",
                    "The stage of each candidate's rollout. A candidate stays at promoted or "
                    "rolled_back after its rollout ends.",
                    Query(
                        f"{selector('tunewatch_rollout_stage', ADAPTER)} == 1",
                        "{{adapter}}: {{stage}}",
                    ),
                    names=True,
                    only_after=AFTER_ROLLOUT,
                ),
                stat_panel(
                    "Up",
                    "Whether Prometheus reaches the gateway, the monitor and vLLM, and whether the "
                    "gateway's supervisor finds its children (engine, monitor) healthy. Red: down.",
                    Query('up{job=~"tunewatch-gateway|tunewatch-monitor|vllm"}', "{{job}}"),
                    Query("tunewatch_process_up", "{{process}} (supervised)"),
                    values=UP,
                ),
                stat_panel(
                    "Monitor freshness",
                    "How long ago each monitor check last succeeded, in multiples of its own "
                    "interval. About 1 is on schedule; above 2 the figures on the quality and "
                    "drift boards are stale.",
                    Query(
                        ratio(
                            "(time() - tunewatch_monitor_last_success_timestamp_seconds)",
                            "tunewatch_monitor_check_interval_seconds",
                        ),
                        "{{check}}",
                    ),
                    unit="suffix: intervals",
                    steps=((None, "green"), (2, "orange"), (3, "red")),
                ),
                stat_panel(
                    "Last drift verdict",
                    "The dataset drift verdict of the last drift check, per adapter.",
                    Query(selector("tunewatch_drift_dataset_detected", ADAPTER), "{{adapter}}"),
                    values={0: ("no drift", "green"), 1: ("drift", "red")},
                ),
            ],
        ),
        Row(
            "Traffic",
            [
                timeseries_panel(
                    "Requests",
                    "Requests per second the gateway answered, by route.",
                    Query(requests("route"), "{{route}}"),
                    unit="reqps",
                ),
                timeseries_panel(
                    "Error ratio",
                    "Share of requests answered with a 5xx (engine down, upstream failure), by "
                    "route. A gap means no traffic.",
                    Query(error_ratio("route"), "{{route}}"),
                    unit="percentunit",
                ),
                timeseries_panel(
                    "Latency p95",
                    "95th percentile of the time from request to last byte, by route.",
                    Query(
                        quantile(
                            0.95,
                            selector("tunewatch_request_duration_seconds_bucket", ADAPTER),
                            "route",
                        ),
                        "{{route}}",
                    ),
                    unit="s",
                ),
            ],
        ),
    ],
)
