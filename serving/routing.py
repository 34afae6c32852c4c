"""The routing table: which adapter answers a request, and which one listens in the shadow.

Canary assignment is sticky: a user's key hashes to a fixed point in [0, 1), and the user
is in the canary while that point is below the canary weight. Raising the weight only
adds users, so nobody flips back and forth during a ramp. The hash is salted with the
canary's name, so each rollout samples a fresh set of users.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Route = Literal["primary", "canary", "shadow", "pinned"]


def unit_hash(*parts: str) -> float:
    """A stable point in [0, 1) for the given strings (same on every host and restart)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class RoutingTable(BaseModel):
    """Primary (None: the base model), an optional weighted canary and an optional shadow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    primary: str | None = None
    canary: str | None = None
    canary_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    shadow: str | None = None
    shadow_fraction: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.canary_weight > 0 and self.canary is None:
            raise ValueError("canary_weight > 0 needs a canary adapter")
        if self.shadow_fraction > 0 and self.shadow is None:
            raise ValueError("shadow_fraction > 0 needs a shadow adapter")
        if self.canary is not None and self.canary == self.primary:
            raise ValueError("the canary must differ from the primary")
        if self.shadow is not None and self.shadow == self.primary:
            raise ValueError("the shadow must differ from the primary")
        return self

    def adapters(self) -> set[str]:
        return {name for name in (self.primary, self.canary, self.shadow) if name}

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class Decision:
    """Where one request goes: the answering route and adapter, and whether to mirror it."""

    route: Route
    adapter: str | None  # None: the base model
    mirror_to: str | None


def decide(table: RoutingTable, user: str | None, rng: random.Random | None = None) -> Decision:
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
    return Decision(
        "canary" if in_canary else "primary", answering, table.shadow if mirror else None
    )
