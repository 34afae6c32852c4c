"""What crosses the gateway's wire: OpenAI request shapes, the error shape, feedback, admin bodies.

Only the fields the gateway acts on are declared; every other field passes through to
vLLM untouched (`extra="allow"`), so vLLM stays the judge of sampling parameters and
the client sees vLLM's own 400s for them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type = status_code, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


USER_MAX_CHARS = 256  # the store's column: a longer one is the client's error, a 400
# The largest id a row can have (an Integer column on PostgreSQL is 32-bit): a larger one asked
# for is a 400, where the database would refuse the query (a 500).
ROW_ID_MAX = 2**31 - 1


class _PassThrough(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    user: str | None = Field(default=None, max_length=USER_MAX_CHARS)
    stream_options: dict[str, Any] | None = None
    # Declared to be compared with the gateway's caps (serving/limits.py) as vLLM will read
    # them ("5" and 5.0 are 5); unset, they stay out of what vLLM receives.
    n: int | None = None
    max_tokens: int | None = None

    def upstream_body(self, **overrides: Any) -> dict[str, Any]:
        body = self.model_dump(exclude_unset=True)
        body.update(overrides)
        return body


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_PassThrough):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def prompt_text(self) -> str:
        """The last user turn: what drift and quality are judged on."""
        users = [m for m in self.messages if m.role == "user"]
        return (users[-1] if users else self.messages[-1]).text()

    def wants_logprobs(self) -> bool:
        return self.logprobs

    def with_logprobs(self) -> dict[str, Any]:
        return {"logprobs": True}


class CompletionRequest(_PassThrough):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            if len(self.prompt) != 1:
                raise ValueError("prompt: batched prompts are not supported; send one per request")
        return self

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) == 1 and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return json.dumps(self.prompt)

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def with_logprobs(self) -> dict[str, Any]:
        return {"logprobs": 0}


InferenceRequest = ChatCompletionRequest | CompletionRequest


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exchange_id: str = Field(min_length=1, max_length=64)
    reference: str | None = None  # its length is bounded by gateway.feedback_reference_max_chars
    rating: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.reference is None and self.rating is None:
            raise ValueError("give a reference, a rating, or both")
        return self


class FeedbackResponse(BaseModel):
    id: int
    exchange_id: str
    object: Literal["feedback"] = "feedback"


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1)


class AdapterInfo(BaseModel):
    name: str
    path: str
    fingerprint: str
    loaded: bool
    routes: list[str]


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself (bounded as it arrives,
    serving.errors.read_json) and parses it with `model`: for the schema's readers and fuzzers,
    since FastAPI documents only the bodies it parses. Nested models are written out in place."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
