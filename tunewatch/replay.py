"""`tunewatch replay`: a traffic file (tunewatch/traffic.py) sent to a running gateway.

Requests go through the official `openai` client, as a user's application sends them, so
what the gateway records is what it would record in production. A reference is posted as
feedback for a share of the answers, after a delay, as a person would. A gateway that
cannot be reached stops the replay.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from monitor.quality import answer_score
from tunewatch.traffic import GatewayUnreachableError, NumberedLine, TrafficLine


@dataclass(frozen=True)
class ReplayOptions:
    """How the traffic is sent.

    Timing: at `rate` requests a second when given; else at each line's `at` (divided by
    `speed`) when the file has times; else as fast as `concurrency` allows. `concurrency`
    always caps the requests in flight.
    """

    model: str
    concurrency: int = 4
    rate: float | None = None
    speed: float = 1.0
    feedback_share: float = 0.0  # of answers with a reference
    feedback_delay_s: float = 0.0
    time_limit_s: float | None = None
    max_tokens: int = 64  # where a line gives none
    seed: int = 0


@dataclass(frozen=True)
class Outcome:
    """What came back for one line."""

    number: int
    ok: bool
    latency_s: float
    exchange_id: str | None = None
    adapter: str | None = None
    route: str | None = None
    answer: str | None = None
    exact_match: bool | None = None  # None: no reference
    feedback: bool = False  # a reference will be posted for it
    error: str | None = None


@dataclass(frozen=True)
class ReplaySummary:
    sent: int
    answered: int
    failed: int
    feedback_posted: int
    feedback_failed: int
    stopped_by_time_limit: bool


def send_times(lines: Sequence[NumberedLine], options: ReplayOptions) -> list[float | None]:
    """When each line is due, in seconds from the start; None: as soon as a slot is free."""
    if options.rate is not None:
        return [i / options.rate for i in range(len(lines))]
    if any(n.line.at is not None for n in lines):
        # A line without a time keeps the previous line's: a file in order stays in order.
        times, last = [], 0.0
        for n in lines:
            last = n.line.at if n.line.at is not None else last
            times.append(last / options.speed)
        return times
    return [None] * len(lines)


class Replayer:
    """Sends the lines through the official client and posts the feedback they earn."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        feedback: httpx.AsyncClient,
        options: ReplayOptions,
        on_outcome: Callable[[Outcome], None] = lambda _: None,
    ) -> None:
        self.client, self.feedback, self.options = client, feedback, options
        self.on_outcome = on_outcome
        self._random = random.Random(options.seed)
        self._tasks: set[asyncio.Task[None]] = set()  # sends and feedback posts in flight
        self._feedback = {"posted": 0, "failed": 0}

    async def run(self, lines: Sequence[NumberedLine]) -> ReplaySummary:
        slots = asyncio.Semaphore(self.options.concurrency)
        start = time.monotonic()
        limit = self.options.time_limit_s
        deadline = None if limit is None else start + limit
        answered = failed = 0
        unreachable: list[GatewayUnreachableError] = []

        async def one(numbered: NumberedLine) -> None:
            nonlocal answered, failed
            try:
                outcome = await self._send(numbered)
            except GatewayUnreachableError as exc:
                unreachable.append(exc)
                return
            finally:
                slots.release()
            answered, failed = answered + outcome.ok, failed + (not outcome.ok)
            self.on_outcome(outcome)

        try:
            for numbered, due in zip(lines, send_times(lines, self.options), strict=True):
                if due is not None:
                    await _sleep_until(start + due, deadline)
                if unreachable or not await _acquire_before(slots, deadline):
                    break
                self._spawn(one(numbered))
            while self._tasks and not unreachable:
                await asyncio.wait(
                    self._tasks, timeout=_left(deadline), return_when=asyncio.FIRST_COMPLETED
                )
                if deadline is not None and time.monotonic() >= deadline:
                    break
            if unreachable:
                raise unreachable[0]
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return ReplaySummary(
            sent=answered + failed,
            answered=answered,
            failed=failed,
            feedback_posted=self._feedback["posted"],
            feedback_failed=self._feedback["failed"],
            stopped_by_time_limit=answered + failed < len(lines),
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task that forgets itself when done (a long replay keeps none)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, numbered: NumberedLine) -> Outcome:
        line, started = numbered.line, time.monotonic()
        try:
            raw = await self._create(line)
        except openai.APIConnectionError as exc:
            raise GatewayUnreachableError(
                f"the gateway at {self.client.base_url} did not answer ({exc.__cause__ or exc})"
            ) from None
        except openai.APIStatusError as exc:
            return Outcome(
                numbered.number,
                ok=False,
                latency_s=time.monotonic() - started,
                exchange_id=exc.response.headers.get("x-tunewatch-exchange-id"),
                error=f"{exc.status_code}: {_error_message(exc)}",
            )
        response = raw.parse()
        choice = response.choices[0]
        answer = choice.message.content if line.endpoint == "chat" else choice.text
        answer = answer or ""
        exchange_id = raw.headers.get("x-tunewatch-exchange-id")
        exact = None
        if line.reference is not None:
            exact = answer_score(answer, line.reference, "exact_match") == 1.0
        wants_feedback = (
            line.reference is not None
            and exchange_id is not None
            and self._random.random() < self.options.feedback_share
        )
        if wants_feedback:
            assert line.reference is not None and exchange_id is not None
            self._spawn(self._post_feedback(exchange_id, line.reference))
        return Outcome(
            numbered.number,
            ok=True,
            latency_s=time.monotonic() - started,
            exchange_id=exchange_id,
            adapter=raw.headers.get("x-tunewatch-adapter"),
            route=raw.headers.get("x-tunewatch-route"),
            answer=answer,
            exact_match=exact,
            feedback=wants_feedback,
        )

    async def _create(self, line: TrafficLine) -> Any:
        sampling: dict[str, Any] = {"max_tokens": line.max_tokens or self.options.max_tokens}
        if line.temperature is not None:
            sampling["temperature"] = line.temperature
        if line.user is not None:
            sampling["user"] = line.user
        if line.endpoint == "completions":
            return await self.client.completions.with_raw_response.create(
                model=self.options.model, prompt=line.prompt, **sampling
            )
        messages = (
            [m.model_dump(exclude_unset=True) for m in line.messages]
            if line.messages is not None
            else [{"role": "user", "content": line.prompt}]
        )
        return await self.client.chat.completions.with_raw_response.create(
            model=self.options.model, messages=messages, **sampling
        )

    async def _post_feedback(self, exchange_id: str, reference: str) -> None:
        """Post a reference after the configured delay, as a person would later."""
        await asyncio.sleep(self.options.feedback_delay_s)
        try:
            response = await self.feedback.post(
                "feedback", json={"exchange_id": exchange_id, "reference": reference}
            )
            taken = response.status_code == 200
        except httpx.HTTPError:
            taken = False
        self._feedback["posted" if taken else "failed"] += 1


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def _sleep_until(moment: float, deadline: float | None) -> None:
    """Sleep until `moment`, or until the deadline if that comes first."""
    wake = moment if deadline is None else min(moment, deadline)
    await asyncio.sleep(max(0.0, wake - time.monotonic()))


async def _acquire_before(slots: asyncio.Semaphore, deadline: float | None) -> bool:
    """Take a slot for one request; False when the deadline comes (or has come) first."""
    left = _left(deadline)
    if left == 0.0:
        return False
    try:
        await asyncio.wait_for(slots.acquire(), timeout=left)
    except TimeoutError:
        return False
    return True


def _error_message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message")
    return str(message or error.message)
