"""How much the gateway takes on at once: a slot per engine call, taken without waiting or
refused, so that overload is a fast 503 rather than a queue that grows until every client
times out. Shadow replays are shed first: no client waits for them.

- A primary (every call a client waits for: primary, canary, pinned) is refused while
  `max_concurrency` primaries are in flight; shadows never crowd one out.
- A shadow is skipped while `shadow_limit` shadows are in flight, or when it would take the
  gateway's last free slot (primaries and shadows together), so that under load the
  replays stop before any client is refused.
"""

from __future__ import annotations

from typing import Literal

from serving import metrics

Kind = Literal["primary", "shadow"]


class Admission:
    """The calls in flight, by id and kind."""

    def __init__(self, max_concurrency: int, shadow_limit: int) -> None:
        self.max_concurrency, self.shadow_limit = max_concurrency, shadow_limit
        self._in_flight: dict[str, Kind] = {}
        self._count: dict[Kind, int] = {"primary": 0, "shadow": 0}

    def enter(self, call_id: str, kind: Kind) -> bool:
        """Take a slot for `call_id`, or count it as shed (`tunewatch_requests_shed_total`)."""
        primaries, shadows = self._count["primary"], self._count["shadow"]
        if kind == "primary":
            reason = "concurrency" if primaries >= self.max_concurrency else None
        elif shadows >= self.shadow_limit:
            reason = "shadow_concurrency"
        else:
            reason = "concurrency" if primaries + shadows + 1 >= self.max_concurrency else None
        if reason is not None:
            metrics.REQUESTS_SHED.labels(kind, reason).inc()
            return False
        self._in_flight[call_id] = kind
        self._count[kind] += 1
        return True

    def leave(self, call_id: str) -> None:
        """Give the slot back; again, or for a call never admitted, does nothing."""
        kind = self._in_flight.pop(call_id, None)
        if kind is not None:
            self._count[kind] -= 1
