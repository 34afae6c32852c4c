"""Golden-set evaluation: prompts with known answers, sent to every adapter in the routing table.

Live feedback arrives late and unevenly; a golden set gives each adapter (primary, canary,
shadow) the same exam on a schedule. Runs are recorded as exchanges with route `golden`
(kept out of live-traffic windows) and the reference as their feedback, so the quality
and calibration checks judge them like any labelled exchange.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from serving.engine import EngineClient
from serving.exchange import ExchangeDraft, answer_whole
from serving.protocol import ChatCompletionRequest
from store import Store

DEFAULT_GOLDEN_SET = Path(__file__).parent / "goldens" / "capitals.jsonl"


class GoldenSetError(ValueError):
    """A golden-set file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class GoldenExample:
    prompt: str
    reference: str


@dataclass(frozen=True)
class GoldenRun:
    adapter: str  # the adapter label: a registered name, or "base"
    answered: int
    failed: int


def load_golden_set(path: Path) -> list[GoldenExample]:
    """Read a JSONL file of {"prompt", "reference"} objects; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise GoldenSetError(f"cannot read golden set {path}: {exc.strerror}") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GoldenSetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not all(
            isinstance(item.get(key), str) and item[key].strip() for key in ("prompt", "reference")
        ):
            raise GoldenSetError(
                f'{path}:{number}: needs non-empty string "prompt" and "reference"'
            )
        examples.append(GoldenExample(item["prompt"], item["reference"]))
    if not examples:
        raise GoldenSetError(f"{path}: no examples")
    return examples


async def run_golden_set(
    engine: EngineClient,
    store: Store,
    examples: list[GoldenExample],
    targets: dict[str | None, str],
    *,
    max_tokens: int = 32,
    concurrency: int = 4,
) -> list[GoldenRun]:
    """Ask every target adapter every example and record the answers with their references.

    `targets` maps an adapter (None: the base model) to its name on the engine.
    """
    gate = asyncio.Semaphore(concurrency)

    async def ask(adapter: str | None, engine_model: str, example: GoldenExample) -> bool:
        request = ChatCompletionRequest(
            model=engine_model,
            messages=[{"role": "user", "content": example.prompt}],
            max_tokens=max_tokens,
            temperature=0,
        )
        draft = ExchangeDraft("chat.completions", request, route="golden", adapter=adapter)
        async with gate:
            record = draft.record(*await answer_whole(engine, draft, engine_model))
        await asyncio.to_thread(store.record_exchanges, [record])
        if record["status"] == "ok":
            await asyncio.to_thread(store.add_feedback, draft.exchange_id, example.reference, None)
        return record["status"] == "ok"

    runs = []
    for adapter, engine_model in targets.items():
        outcomes = await asyncio.gather(*(ask(adapter, engine_model, e) for e in examples))
        run = GoldenRun(adapter or "base", answered=sum(outcomes), failed=outcomes.count(False))
        await asyncio.to_thread(
            store.record_event,
            "golden.run",
            f"{run.answered} of {len(examples)} golden examples answered",
            run.adapter,
            failed=run.failed,
        )
        runs.append(run)
    return runs
