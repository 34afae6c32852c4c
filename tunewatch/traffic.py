"""The traffic file: JSON Lines, one request a line, as `tunewatch export` writes them and
`tunewatch replay` sends (or judges offline, with --dry-run).

    {"prompt": "...", "reference": "...", "user": "u1", "at": 12.5}
    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 32}

`prompt` goes to the chat API as one user message (or to the completions API with
`"endpoint": "completions"`); `messages` go as they are. `reference` is the right answer,
posted as feedback; `at` is the line's time in seconds from the start. A bad line is named
by file and line and skipped, never the reason a whole file is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.protocol import ChatMessage  # what the gateway takes, so what it exported


class Recorded(BaseModel):
    """What the gateway answered when the line was recorded (`tunewatch export` writes it):
    replay ignores it; `replay --dry-run` judges the answers' drift columns on it."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "error"] = "ok"
    answer: str | None = None
    mean_logprob: float | None = None
    adapter: str | None = None


class TrafficLine(BaseModel):
    """One request of a traffic file."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    endpoint: Literal["chat", "completions"] = "chat"
    reference: str | None = None
    user: str | None = Field(default=None, min_length=1, max_length=256)
    at: float | None = Field(default=None, ge=0, description="Seconds from the start.")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    recorded: Recorded | None = None

    @model_validator(mode="after")
    def _one_request(self) -> TrafficLine:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if self.endpoint == "completions" and self.prompt is None:
            raise ValueError("the completions endpoint takes a `prompt`, not `messages`")
        return self


@dataclass(frozen=True)
class NumberedLine:
    number: int  # 1-based, as editors count
    line: TrafficLine


@dataclass(frozen=True)
class BadLine:
    where: str  # FILE:LINE
    problem: str


class TrafficFileError(ValueError):
    """The traffic file cannot be read at all."""


class GatewayUnreachableError(ConnectionError):
    """The gateway did not answer at all: the replay stops (the CLI says so in one line)."""


def read_traffic(path: Path) -> tuple[list[NumberedLine], list[BadLine]]:
    """The file's valid lines, and each bad one named by FILE:LINE with what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrafficFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TrafficFileError(f"{path} is not UTF-8 text: {exc.reason}") from None
    lines, bad = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(NumberedLine(number, TrafficLine.model_validate_json(raw)))
        except ValidationError as exc:
            bad.append(BadLine(f"{path}:{number}", _first_problem(exc)))
    return lines, bad


def _first_problem(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(p) for p in item["loc"])
    return f"{where}: {item['msg']}" if where else item["msg"]
