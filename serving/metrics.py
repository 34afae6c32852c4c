"""The gateway's Prometheus metrics: per-route, per-adapter latency that vLLM itself cannot give.

Labels stay bounded: `route` is one of four words, `adapter` only ever names a
registered adapter (the gateway refuses the rest before it measures anything), `code`
is an HTTP status code.
"""

from prometheus_client import Counter, Gauge, Histogram

from serving.exchange import BASE_LABEL
from store.adapters import RoutingTable

# Seconds: a 135M model on CPU answers in 0.1-30 s, a large one on a GPU in 0.05-120 s.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15)

REQUEST_DURATION = Histogram(
    "tunewatch_request_duration_seconds",
    "Time from request received to last byte answered, by route and adapter.",
    ["route", "adapter"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "tunewatch_time_to_first_token_seconds",
    "Time from request received to the first generated token, by route and adapter.",
    ["route", "adapter"],
    buckets=_TTFT_BUCKETS,
)
OUTPUT_TOKENS = Counter(
    "tunewatch_output_tokens_total",
    "Tokens generated, by route and adapter.",
    ["route", "adapter"],
)
PROMPT_TOKENS = Counter(
    "tunewatch_prompt_tokens_total",
    "Prompt tokens processed, by route and adapter.",
    ["route", "adapter"],
)
REQUESTS = Counter(
    "tunewatch_requests_total",
    "Inference requests answered, by route, adapter and HTTP status code.",
    ["route", "adapter", "code"],
)
REQUESTS_IN_FLIGHT = Gauge(
    "tunewatch_requests_in_flight",
    "Engine calls in flight now (client requests and shadow replays), by route and adapter.",
    ["route", "adapter"],
)
REQUESTS_SHED = Counter(
    "tunewatch_requests_shed_total",
    "Calls the gateway did not make for want of room: primaries refused with a 503, shadow "
    "replays skipped; by kind (primary, shadow) and reason.",
    ["kind", "reason"],
)
for _kind, _reason in (
    ("primary", "concurrency"),
    ("shadow", "concurrency"),
    ("shadow", "shadow_concurrency"),
):
    REQUESTS_SHED.labels(_kind, _reason)
STORE_WRITE_FAILURES = Counter(
    "tunewatch_store_write_failures_total",
    "Exchanges that could not be written to the store.",
)
RECORDER_QUEUE_DEPTH = Gauge(
    "tunewatch_recorder_queue_depth",
    "Exchanges answered and waiting in the recorder's queue to be written to the store.",
)
RECORDER_SPILLED = Counter(
    "tunewatch_recorder_spilled_total",
    "Exchanges written to the local spill file instead of the store, by reason.",
    ["reason"],
)
RECORDER_REPLAYED = Counter(
    "tunewatch_recorder_replayed_total",
    "Exchanges written to the store from the spill file.",
)
# A series born at 1 hides its first spill from increase(): every reason starts at 0.
for _reason in ("queue_full", "store_unreachable", "behind_spill", "shutdown"):
    RECORDER_SPILLED.labels(_reason)
PROCESS_UP = Gauge(
    "tunewatch_process_up",
    "1 while a supervised child process (engine, monitor) is up and healthy, else 0.",
    ["process"],
)
PROCESS_RESTARTS = Counter(
    "tunewatch_process_restarts_total",
    "Times a supervised child process was restarted after dying.",
    ["process"],
)
BASE_SERVED_DIRECTLY = Gauge(
    "tunewatch_base_served_directly",
    "1 while base-model requests go to the engine's base model itself, 0 while they go through "
    "the identity adapter (the engine's LoRA fix not confirmed).",
)
ROUTING_ADAPTER = Gauge(
    "tunewatch_routing_adapter",
    "1 for the adapter in each role (primary, canary, shadow) of the routing table in force.",
    ["route", "adapter"],
)
ROUTING_CANARY_WEIGHT = Gauge(
    "tunewatch_routing_canary_weight_ratio", "Share of users the routing table sends to the canary."
)
ROUTING_SHADOW_FRACTION = Gauge(
    "tunewatch_routing_shadow_fraction_ratio", "Share of requests the routing table mirrors."
)


def publish_routing(table: RoutingTable) -> None:
    """The table in force, whole: a role nobody holds has no series."""
    ROUTING_ADAPTER.clear()
    ROUTING_ADAPTER.labels("primary", table.primary or BASE_LABEL).set(1)
    for route, adapter in (("canary", table.canary), ("shadow", table.shadow)):
        if adapter is not None:
            ROUTING_ADAPTER.labels(route, adapter).set(1)
    ROUTING_CANARY_WEIGHT.set(table.canary_weight)
    ROUTING_SHADOW_FRACTION.set(table.shadow_fraction)
