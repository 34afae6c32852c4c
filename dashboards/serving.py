"""Serving per adapter: the gateway's RED figures per route and adapter, then vLLM's engine.

The gateway's histograms are the only per-adapter latency there is: vLLM labels its metrics
with the served model, not the LoRA adapter a request used.
"""

from dashboards.common import (
    ADAPTER,
    Query,
    Row,
    board,
    error_ratio,
    increase,
    quantile,
    rate,
    ratio,
    requests,
    selector,
    table_panel,
    timeseries_panel,
)

# The latency objective (the alert rules' SLO): 99% of requests answered within 30 s. It must be
# one of the gateway's bucket boundaries. prometheus_client writes them as floats ("30.0"),
# which Prometheus 2 keeps and Prometheus 3 normalises ("30"): the matcher takes both.
SLO_LATENCY_SECONDS = 30.0
SLO_OBJECTIVE = 0.99

BY = "route, adapter"
LEGEND = "{{route}} {{adapter}}"


def _per_route(metric: str, *matchers: str) -> str:
    return f"sum by ({BY}) ({rate(selector(metric, ADAPTER, *matchers))})"


def _quantiles(histogram: str) -> list[Query]:
    bucket = selector(f"{histogram}_bucket", ADAPTER)
    return [Query(quantile(q, bucket, BY), f"{LEGEND} p{q * 100:g}") for q in (0.5, 0.95)]


def _engine_p95(histogram: str, legend: str) -> Query:
    return Query(quantile(0.95, f"{histogram}_bucket"), legend)


BOARD = board(
    "serving",
    "tunewatch / Serving per adapter",
    "Rate, errors and duration per route and adapter as the gateway measured them, the latency "
    "objective, and the state of the vLLM engine that every adapter shares.",
    "tunewatch_requests_total",
    [
        Row(
            "Gateway: per route and adapter",
            [
                timeseries_panel(
                    "Requests",
                    "Requests per second answered, by route, adapter and HTTP status code.",
                    Query(requests(f"{BY}, code"), f"{LEGEND} {{{{code}}}}"),
                    unit="reqps",
                ),
                timeseries_panel(
                    "Error ratio",
                    "Share of each route and adapter's requests answered with a 5xx. A gap "
                    "means no traffic.",
                    Query(error_ratio(BY), LEGEND),
                    unit="percentunit",
                ),
                timeseries_panel(
                    "Duration",
                    "Time from request to last byte, median and 95th percentile. Compare the "
                    "canary's and shadow's lines with the primary's.",
                    *_quantiles("tunewatch_request_duration_seconds"),
                    unit="s",
                ),
                timeseries_panel(
                    "Time to first token",
                    "Time from request to the first generated token, median and 95th "
                    "percentile: what a streaming user waits before text appears.",
                    *_quantiles("tunewatch_time_to_first_token_seconds"),
                    unit="s",
                ),
                timeseries_panel(
                    "Tokens",
                    "Tokens per second generated and read from prompts.",
                    Query(_per_route("tunewatch_output_tokens_total"), f"{LEGEND} output"),
                    Query(_per_route("tunewatch_prompt_tokens_total"), f"{LEGEND} prompt"),
                ),
                timeseries_panel(
                    "In flight",
                    "Requests being answered now. Rising while throughput stays flat: the "
                    "engine is saturated.",
                    Query(
                        f"sum by ({BY}) ({selector('tunewatch_requests_in_flight', ADAPTER)})",
                        LEGEND,
                    ),
                ),
                timeseries_panel(
                    "Latency objective",
                    f"Share of requests answered within {SLO_LATENCY_SECONDS:g} s; the "
                    f"objective is {SLO_OBJECTIVE:.0%}. Below the objective line the error "
                    "budget burns.",
                    Query(
                        ratio(
                            _per_route(
                                "tunewatch_request_duration_seconds_bucket",
                                f'le=~"{SLO_LATENCY_SECONDS:g}|{SLO_LATENCY_SECONDS:g}\\\\.0"',
                            ),
                            _per_route("tunewatch_request_duration_seconds_count"),
                        ),
                        LEGEND,
                    ),
                    Query(f"vector({SLO_OBJECTIVE})", "objective"),
                    unit="percentunit",
                ),
            ],
        ),
        Row(
            "Gateway: admission and recording",
            [
                timeseries_panel(
                    "Shed",
                    "Calls the gateway did not make for want of room, per second: primary "
                    "requests refused with a 503 and Retry-After once gateway.max_concurrency are "
                    "in flight (concurrency), shadow replays skipped (shadow_concurrency: their "
                    "own limit; concurrency: they would take the last free slot). Shadows are "
                    "shed first.",
                    Query(
                        f"sum by (kind, reason) ({rate('tunewatch_requests_shed_total')})",
                        "{{kind}} {{reason}}",
                    ),
                    unit="reqps",
                ),
                timeseries_panel(
                    "Recorder queue",
                    "Exchanges answered and waiting to be written to the store, per gateway. It "
                    "holds gateway.recorder_queue_max (10 000); what finds it full is spilled.",
                    Query("sum by (instance) (tunewatch_recorder_queue_depth)", "{{instance}}"),
                ),
                timeseries_panel(
                    "Spilled and replayed",
                    "Exchanges written to the gateway's local spill file instead of the store, by "
                    "reason (queue_full, store_unreachable, behind_spill, shutdown), and those "
                    "replayed from it into the store, per interval. Spilled and not yet replayed: "
                    "waiting on the gateway's disk for the database.",
                    Query(
                        f"sum by (reason) ({increase('tunewatch_recorder_spilled_total')})",
                        "spilled {{reason}}",
                    ),
                    Query(f"sum({increase('tunewatch_recorder_replayed_total')})", "replayed"),
                    bars=True,
                ),
                timeseries_panel(
                    "Exchanges lost",
                    "Exchanges the store refused for their own rows (written alone after their "
                    "batch failed) and that are lost, per interval. Each is logged with its id.",
                    Query(f"sum({increase('tunewatch_store_write_failures_total')})", "lost"),
                    bars=True,
                ),
            ],
        ),
        Row(
            "vLLM engine: shared by every adapter",
            [
                timeseries_panel(
                    "Engine requests",
                    "Requests in the engine's running batch and waiting for a slot. Waiting "
                    "above zero for long: the engine is the bottleneck.",
                    Query("sum(vllm:num_requests_running)", "running"),
                    Query("sum(vllm:num_requests_waiting)", "waiting"),
                ),
                timeseries_panel(
                    "KV cache usage",
                    "Share of the KV cache in use. Near 100% the engine preempts requests.",
                    Query("max(vllm:kv_cache_usage_perc)", "KV cache"),
                    unit="percentunit",
                ),
                timeseries_panel(
                    "Preemptions",
                    "Requests the engine preempted per interval (to free KV cache); each one "
                    "is recomputed and answers late.",
                    Query(f"sum({increase('vllm:num_preemptions_total')})", "preemptions"),
                    bars=True,
                ),
                timeseries_panel(
                    "Queue time p95",
                    "95th percentile of the time requests wait in the engine before running.",
                    _engine_p95("vllm:request_queue_time_seconds", "queue"),
                    unit="s",
                ),
                timeseries_panel(
                    "Engine latency p95",
                    "The engine's own time to first token and end-to-end latency, 95th "
                    "percentile. The gateway's figures above add the hop and the recording.",
                    _engine_p95("vllm:time_to_first_token_seconds", "time to first token"),
                    _engine_p95("vllm:e2e_request_latency_seconds", "end to end"),
                    unit="s",
                ),
                timeseries_panel(
                    "Inter-token latency",
                    "Time between two generated tokens, median and 95th percentile: the "
                    "streaming speed a user sees.",
                    Query(quantile(0.5, "vllm:inter_token_latency_seconds_bucket"), "p50"),
                    _engine_p95("vllm:inter_token_latency_seconds", "p95"),
                    unit="s",
                ),
                timeseries_panel(
                    "Finished requests",
                    "Requests the engine finished per second, by reason: stop (a stop string), "
                    "length (max_tokens or the context reached), abort (the client went away), "
                    "error (an internal error, answered 500), repetition (a repeating pattern).",
                    Query(
                        f"sum by (finished_reason) ({rate('vllm:request_success_total')})",
                        "{{finished_reason}}",
                    ),
                    unit="reqps",
                ),
                timeseries_panel(
                    "Engine tokens",
                    "Prompt tokens prefilled and tokens generated per second by the engine.",
                    Query(f"sum({rate('vllm:prompt_tokens_total')})", "prompt"),
                    Query(f"sum({rate('vllm:generation_tokens_total')})", "generation"),
                ),
                table_panel(
                    "LoRA adapters in the engine",
                    "The adapters running and waiting in the engine now, and how many it can "
                    "hold at once (max_lora). The value is when vLLM last updated it.",
                    Query("topk(1, vllm:lora_requests_info)"),
                ),
            ],
        ),
    ],
)
