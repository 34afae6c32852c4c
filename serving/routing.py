"""Routing one request by the routing table: which adapter answers, which one listens in.

Canary assignment is sticky: a user's key hashes to a fixed point in [0, 1), and the user
is in the canary while that point is below the canary weight. Raising the weight only
adds users, so nobody flips back and forth during a ramp. The hash is salted with the
canary's name, so each rollout samples a fresh set of users.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from store.adapters import RoutingTable
from store.exchanges import Route


def unit_hash(*parts: str) -> float:
    """A stable point in [0, 1) for the given strings (same on every host and restart)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class RouteChoice:
    """Where one request goes: the answering route and adapter, and whether to mirror it."""

    route: Route
    adapter: str | None  # None: the base model
    mirror_to: str | None


def choose_route(
    table: RoutingTable, user: str | None, rng: random.Random | None = None
) -> RouteChoice:
    """Pick the answering adapter for one request (sticky by user) and the shadow, if any."""
    rng = rng or random.Random()
    in_canary = (
        table.canary is not None
        and table.canary_weight > 0
        and (unit_hash(table.canary, user) if user else rng.random()) < table.canary_weight
    )
    answering = table.canary if in_canary else table.primary
    # A rollout keeps mirroring primary requests to its candidate while it is also the canary
    # (paired evidence keeps coming); the candidate's own answers are never mirrored to it.
    mirror = (
        table.shadow is not None
        and table.shadow != answering
        and rng.random() < table.shadow_fraction
    )
    return RouteChoice(
        "canary" if in_canary else "primary", answering, table.shadow if mirror else None
    )
