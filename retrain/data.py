"""The training set of a retrain: labelled exchanges and golden examples, cleaned, split, traced.

What goes into an adapter decides what it does, so the set is built by one deterministic
function and every choice is recorded. Prompts are compared after the monitor's own
`normalise` (the exact-match rule), so one question asked twice trains once: a golden
example wins over feedback on the same prompt (curated beats crowd-sourced), and among
exchanges the newest wins (a later correction supersedes an earlier one). Items without a
reference, or too long to train on whole, are dropped, never truncated: a cut answer
teaches the model to stop mid-sentence.

The validation split is decided per item by a stable hash of its normalised prompt, not
by shuffling: as the data grows, an item never moves between splits, so a validation
loss stays comparable across retrains and nothing seen in training is later validated on.

Rendering uses the model's own chat template, the one vLLM applies when serving, with the
loss on the answer only: the prompt tokens are labelled -100, the index the loss ignores.
The lineage (which exchanges and golden prompts went in, what was dropped and why) is
stored with the adapter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from monitor.goldens import GoldenExample
from monitor.quality import normalise
from monitor.window import ExchangeView

IGNORE_INDEX = -100  # labels with this index carry no loss (torch's CrossEntropyLoss default)
TRAIN_FILE, VALIDATION_FILE, LINEAGE_FILE = "train.jsonl", "validation.jsonl", "lineage.json"


class TrainingDataError(ValueError):
    """The data cannot make a training set (none left, no validation, a bad file)."""


@dataclass(frozen=True)
class TrainingExample:
    prompt: str
    reference: str
    source_id: str  # the exchange id, or "golden:<digest of the prompt>"


@dataclass(frozen=True)
class Lineage:
    """Where a training set came from, and what was left out of it."""

    exchange_ids: tuple[str, ...]
    golden_prompts: tuple[str, ...]
    duplicates: int
    empty: int  # no prompt or no reference
    too_long: int  # over max_length tokens once rendered


@dataclass(frozen=True)
class TrainingSet:
    train: tuple[TrainingExample, ...]
    validation: tuple[TrainingExample, ...]
    lineage: Lineage


@dataclass(frozen=True)
class RenderedExample:
    """One example as the model trains on it: token ids, and labels masked on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def features(self) -> dict[str, list[int]]:
        """The fields a transformers model and data collator take."""
        return {
            "input_ids": list(self.input_ids),
            "attention_mask": [1] * len(self.input_ids),
            "labels": list(self.labels),
        }


def prompt_key(prompt: str) -> str:
    """A stable digest of the normalised prompt: the identity of a question."""
    return hashlib.sha256(normalise(prompt).encode("utf-8")).hexdigest()


def in_validation(prompt: str, fraction: float) -> bool:
    """Whether a prompt belongs to the validation split; depends on nothing but the prompt."""
    return int(prompt_key(prompt)[:16], 16) / 16**16 < fraction


def from_golden(example: GoldenExample) -> TrainingExample:
    source_id = f"golden:{prompt_key(example.prompt)[:12]}"
    return TrainingExample(example.prompt, example.reference, source_id)


def from_exchanges(exchanges: Iterable[ExchangeView]) -> list[TrainingExample]:
    """The labelled exchanges, newest first (the order in which duplicates are kept)."""
    labelled = [e for e in exchanges if e.reference is not None]
    labelled.sort(key=lambda e: e.created_at, reverse=True)
    return [TrainingExample(e.prompt, e.reference or "", e.id) for e in labelled]


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def render(example: TrainingExample, tokenizer: PreTrainedTokenizerBase) -> RenderedExample:
    """The prompt -> reference conversation in the model's chat template, loss on the answer."""
    messages = prompt_messages(example.prompt)
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    full_ids = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": example.reference}],
        tokenize=True,
        return_dict=False,
    )
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise TrainingDataError(
            "the chat template does not render the prompt as a prefix of the conversation; "
            "cannot tell the answer's tokens apart to train on them alone"
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return RenderedExample(tuple(full_ids), tuple(labels))


def build_training_set(
    exchanges: Iterable[ExchangeView],
    goldens: Iterable[GoldenExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    validation_fraction: float = 0.2,
) -> TrainingSet:
    """Deduplicate, filter and split golden examples and labelled exchanges (see the module doc).

    Raises TrainingDataError when either split comes out empty.
    """
    candidates = [from_golden(g) for g in goldens] + from_exchanges(exchanges)
    kept: dict[str, TrainingExample] = {}
    duplicates = empty = too_long = 0
    for example in candidates:
        key = normalise(example.prompt)
        if not key or not example.reference.strip():
            empty += 1
        elif key in kept:
            duplicates += 1
        elif len(render(example, tokenizer).input_ids) > max_length:
            too_long += 1
        else:
            kept[key] = example
    examples = list(kept.values())
    validation = tuple(e for e in examples if in_validation(e.prompt, validation_fraction))
    train = tuple(e for e in examples if not in_validation(e.prompt, validation_fraction))
    lineage = Lineage(
        exchange_ids=tuple(e.source_id for e in examples if not e.source_id.startswith("golden:")),
        golden_prompts=tuple(e.prompt for e in examples if e.source_id.startswith("golden:")),
        duplicates=duplicates,
        empty=empty,
        too_long=too_long,
    )
    if not train or not validation:
        raise TrainingDataError(
            f"{len(train)} training and {len(validation)} validation examples left of "
            f"{len(candidates)} ({duplicates} duplicates, {empty} empty, {too_long} too long): "
            "both splits need at least one"
        )
    return TrainingSet(train, validation, lineage)


def write_training_set(training_set: TrainingSet, directory: Path) -> tuple[Path, Path]:
    """Write train.jsonl, validation.jsonl and lineage.json; return the two data files."""
    directory.mkdir(parents=True, exist_ok=True)
    train, validation = directory / TRAIN_FILE, directory / VALIDATION_FILE
    write_examples(training_set.train, train)
    write_examples(training_set.validation, validation)
    lineage = json.dumps(asdict(training_set.lineage), indent=2, ensure_ascii=False)
    (directory / LINEAGE_FILE).write_text(lineage + "\n", encoding="utf-8")
    return train, validation


def write_examples(examples: Sequence[TrainingExample], path: Path) -> None:
    lines = (json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples)
    path.write_text("".join(lines), encoding="utf-8")


def read_examples(path: Path) -> list[TrainingExample]:
    """Read a JSONL file written by `write_examples`."""
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainingDataError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            examples.append(TrainingExample(item["prompt"], item["reference"], item["source_id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrainingDataError(
                f"{path}:{number}: not a training example ({exc!r}); "
                'want {"prompt", "reference", "source_id"}'
            ) from None
    return examples
