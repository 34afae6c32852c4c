"""An exchange being answered: what it asked, where it went, what came back, as a store record.

The gateway builds one per request (and per shadow replay), the golden-set runner one per
golden example; both learn from vLLM's OpenAI responses the same way and write the same
record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from serving.engine import EngineClient, EngineUnavailableError
from serving.protocol import InferenceRequest
from store.exchanges import Status, new_id

BASE_LABEL = "base"  # the adapter label of the base model (served through the identity adapter)


@dataclass
class ExchangeDraft:
    """One inference call on its way through: where it goes and what it has produced."""

    endpoint: str  # chat.completions | completions
    request: InferenceRequest
    route: str  # primary | canary | pinned | shadow | golden
    adapter: str | None  # None: the base model
    mirror_to: str | None = None
    parent_id: str | None = None
    user: str | None = None
    api_key_id: str | None = None  # serving.auth.key_id of the API key that asked
    exchange_id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    recorded: bool = False  # handed to the recorder (once: a stream may end in two ways)

    @property
    def adapter_label(self) -> str:
        return self.adapter or BASE_LABEL

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat.completions" else "/v1/completions"

    def upstream_body(self, engine_model: str) -> dict[str, Any]:
        """The request for vLLM: always with token logprobs (the monitor needs them) and, on
        streams, usage; the reply is stripped of what the client did not ask for."""
        overrides: dict[str, Any] = {"model": engine_model}
        if not self.request.wants_logprobs():
            overrides.update(self.request.with_logprobs())
        if self.request.stream:
            stream_options = {**(self.request.stream_options or {}), "include_usage": True}
            overrides["stream_options"] = stream_options
        return self.request.upstream_body(**overrides)

    def absorb(self, choice: dict[str, Any], streaming: bool) -> None:
        """Take text, token logprobs and finish reason from one choice (or stream delta)."""
        if streaming:
            piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        else:
            piece = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        if streaming and piece and self.first_token_at is None:  # unobservable otherwise
            self.first_token_at = time.perf_counter()
        self.text.append(piece)
        self.logprobs.extend(token_logprobs(choice.get("logprobs")))
        self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def absorb_response(self, body: dict[str, Any]) -> None:
        """Learn from a whole (non-streamed) OpenAI response."""
        for choice in body.get("choices", []):
            self.absorb(choice, streaming=False)
        self.absorb_usage(body.get("usage"))

    def absorb_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")

    def record(
        self, http_status: int, error: str | None = None, status: Status | None = None
    ) -> dict[str, Any]:
        """The store record. `status` is ok, or error when there is an error, unless the call was
        cut short (cancelled by its client, interrupted by the shutdown); a cancelled one keeps
        the text it had so far."""
        status = status or ("ok" if error is None else "error")
        text = storable("".join(self.text)) if status in ("ok", "cancelled") else None
        finite = [lp for lp in self.logprobs if math.isfinite(lp)]
        latency = time.perf_counter() - self.started
        return dict(
            id=self.exchange_id,
            created_at=self.created_at,
            route=self.route,
            adapter=self.adapter_label,
            parent_id=self.parent_id,
            endpoint=self.endpoint,
            user=self.user,
            api_key_id=self.api_key_id,
            prompt=storable(self.request.prompt_text()),
            request=self.request.model_dump(mode="json", exclude_unset=True),
            response=text,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            ttft_seconds=None
            if self.first_token_at is None
            else self.first_token_at - self.started,
            latency_seconds=latency,
            mean_logprob=sum(finite) / len(finite) if finite else None,
            finish_reason=self.finish_reason,
            status=status,
            http_status=http_status,
            error=None if error is None else storable(error),
        )


def storable(text: str) -> str:
    """Text PostgreSQL can hold: it refuses NUL in text columns (SQLite takes it), and one
    such exchange would fail its whole batch."""
    return text.replace("\x00", "\ufffd")


def token_logprobs(logprobs: dict[str, Any] | None) -> list[float]:
    """Sampled-token logprobs: chat shape (content[].logprob) or completions (token_logprobs)."""
    if not logprobs:
        return []
    if "content" in logprobs:
        return [t["logprob"] for t in logprobs["content"] or [] if t.get("logprob") is not None]
    return [lp for lp in logprobs.get("token_logprobs") or [] if lp is not None]


async def answer_whole(
    engine: EngineClient, draft: ExchangeDraft, engine_model: str
) -> tuple[int, str | None]:
    """Ask the engine without streaming and learn from its answer: (HTTP status, error)."""
    try:
        response = await engine.post(draft.path, draft.upstream_body(engine_model))
    except EngineUnavailableError as exc:
        return 503, f"engine unavailable: {exc!r}"
    if response.status_code != 200:
        return response.status_code, response.text
    draft.absorb_response(response.json())
    return 200, None
