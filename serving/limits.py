"""What one client may ask of the gateway: how much one request may ask for (choices, tokens,
messages), and a rate per key (a token bucket, in this gateway's memory), so that a leaked
or runaway key cannot flood the store with feedback."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from serving.protocol import ChatCompletionRequest, InferenceRequest, OpenAIError


@dataclass(frozen=True)
class RequestCaps:
    """The most one request may ask for: the engine's time grows with each."""

    max_n: int = 4
    max_tokens: int = 4096
    max_messages: int = 256

    def check(self, request: InferenceRequest) -> None:
        """Refuse, naming the field, a request that asks for more than a cap."""
        asked = [
            ("n", request.n, self.max_n, "choices"),
            ("max_tokens", request.max_tokens, self.max_tokens, "tokens"),
        ]
        if isinstance(request, ChatCompletionRequest):
            asked += [
                ("max_completion_tokens", request.max_completion_tokens, self.max_tokens, "tokens"),
                ("messages", len(request.messages), self.max_messages, "messages"),
            ]
        for field, value, cap, what in asked:
            if value is not None and value > cap:
                raise OpenAIError(
                    400,
                    f"{field} is {value}; this gateway takes at most {cap} {what} a request.",
                    param=field,
                    code="invalid_value",
                )


BURST_S = 10.0  # a bucket holds this many seconds' worth of its rate
MAX_BUCKETS = 10_000  # beyond this, full buckets (idle callers) are forgotten


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """`per_minute` takes per key, in bursts of up to `BURST_S` seconds' worth.

    Each gateway keeps its own buckets: N gateways allow N times the rate, which bounds a
    flood without a shared counter on the request path."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0  # tokens a second
        self.capacity = max(1.0, self.rate * BURST_S)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float | None:
        """Spend one token of `key`'s bucket: None if it had one, else the seconds until it will."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """A bucket that has refilled is the same as a new one."""
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.at) * self.rate < self.capacity
        }


def retry_after(seconds: float) -> str:
    """A Retry-After header's whole seconds, never 0 (a client would retry at once)."""
    return str(max(1, math.ceil(seconds)))
