"""The training-set builder: dedup, filters, the stable split, the chat template, lineage.

Uses the real tokenizer of the prepared model (the tokenizer alone loads in a second), so
the rendering checked here is the one the trainer and vLLM use.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from monitor.goldens import GoldenExample
from monitor.window import ExchangeView
from retrain.data import (
    IGNORE_INDEX,
    LINEAGE_FILE,
    TrainingDataError,
    TrainingExample,
    build_training_set,
    in_validation,
    read_examples,
    render,
    write_training_set,
)
from tests.unit.views import exchange_view
from tunewatch import stack
from tunewatch.settings import load_settings

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    model_dir, _ = stack.prepare(load_settings())
    return AutoTokenizer.from_pretrained(model_dir)


def exchange(
    id: str, prompt: str, reference: str | None, *, minutes: int = 0, status: str = "ok"
) -> ExchangeView:
    return exchange_view(
        id=id,
        created_at=T0 + timedelta(minutes=minutes),
        prompt=prompt,
        reference=reference,
        status=status,
    )


def questions(n: int) -> list[GoldenExample]:
    return [GoldenExample(f"What is {i} plus {i}?", str(2 * i)) for i in range(n)]


def build(tokenizer, exchanges=(), goldens=()):
    """A set with 20 filler questions, so both splits are never empty."""
    return build_training_set(exchanges, [*goldens, *questions(20)], tokenizer, max_length=128)


def everything(training_set) -> list[TrainingExample]:
    return [*training_set.train, *training_set.validation]


def by_prompt(training_set, prompt: str) -> TrainingExample:
    (match,) = [e for e in everything(training_set) if e.prompt == prompt]
    return match


def test_a_prompt_asked_twice_trains_once_after_normalising(tokenizer):
    exchanges = [
        exchange("x1", "What is the capital of Peru?", "Lima"),
        exchange("x2", "  what is the CAPITAL of   Peru? ", "Lima"),
    ]
    training_set = build(tokenizer, exchanges)
    peru = [e for e in everything(training_set) if "peru" in e.prompt.casefold()]
    assert len(peru) == 1
    assert training_set.lineage.duplicates == 1


def test_the_newest_exchange_wins_over_older_ones_on_the_same_prompt(tokenizer):
    exchanges = [
        exchange("old", "Capital of Kazakhstan?", "Almaty", minutes=0),
        exchange("new", "Capital of Kazakhstan?", "Astana", minutes=5),
    ]
    training_set = build(tokenizer, exchanges)
    assert by_prompt(training_set, "Capital of Kazakhstan?").reference == "Astana"
    assert by_prompt(training_set, "Capital of Kazakhstan?").source_id == "new"


def test_a_golden_example_wins_over_feedback_on_the_same_prompt(tokenizer):
    golden = GoldenExample("Capital of Australia?", "Canberra")
    training_set = build(tokenizer, [exchange("x1", "capital of australia?", "Sydney")], [golden])
    (australia,) = [e for e in everything(training_set) if "australia" in e.prompt.casefold()]
    assert australia.reference == "Canberra"
    assert australia.source_id.startswith("golden:")


def test_unlabelled_exchanges_are_not_training_data(tokenizer):
    training_set = build(tokenizer, [exchange("x1", "Capital of Chad?", None)])
    assert "x1" not in training_set.lineage.exchange_ids
    assert training_set.lineage.empty == 0


def test_blank_references_and_prompts_are_dropped_and_counted(tokenizer):
    exchanges = [exchange("x1", "Capital of Chad?", "   "), exchange("x2", " ", "N'Djamena")]
    training_set = build(tokenizer, exchanges)
    assert not {"x1", "x2"} & set(training_set.lineage.exchange_ids)
    assert training_set.lineage.empty == 2


def test_an_errored_exchange_with_a_reference_still_teaches_its_answer(tokenizer):
    errored = exchange("x1", "Capital of Mali?", "Bamako", status="error")
    training_set = build(tokenizer, [errored])
    assert "x1" in training_set.lineage.exchange_ids


def test_examples_over_max_length_are_dropped_not_truncated(tokenizer):
    long_answer = "word " * 200
    training_set = build(tokenizer, [exchange("x1", "Write a lot.", long_answer)])
    assert "x1" not in training_set.lineage.exchange_ids
    assert training_set.lineage.too_long == 1
    assert all(len(render(e, tokenizer).input_ids) <= 128 for e in everything(training_set))


def test_an_item_never_changes_split_when_the_data_grows(tokenizer):
    small = build_training_set([], questions(30), tokenizer, max_length=128)
    large = build_training_set([], questions(300), tokenizer, max_length=128)
    large_validation = {e.prompt for e in large.validation}
    assert all(e.prompt in large_validation for e in small.validation)
    assert not any(e.prompt in large_validation for e in small.train)


def test_the_split_follows_the_normalised_prompt_not_its_spelling():
    assert in_validation("What is 7 plus 7?", 0.5) == in_validation("  WHAT is 7 plus 7? ", 0.5)


def test_the_validation_share_is_close_to_the_fraction_asked_for(tokenizer):
    training_set = build_training_set(
        [], questions(400), tokenizer, max_length=128, validation_fraction=0.25
    )
    assert 0.20 <= len(training_set.validation) / 400 <= 0.30


def test_too_little_data_for_both_splits_is_an_error_with_the_counts(tokenizer):
    with pytest.raises(TrainingDataError, match=r"0 validation examples left of 1"):
        build_training_set(
            [exchange("x1", "What is 1 plus 1?", "2")], [], tokenizer, max_length=128,
            validation_fraction=0.0,
        )  # fmt: skip


def test_the_loss_is_on_the_answer_and_its_end_of_turn_only(tokenizer):
    rendered = render(TrainingExample("What is the capital of France?", "Paris", "x1"), tokenizer)
    trained = [token for token in rendered.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Paris<|im_end|>\n"
    masked = len(rendered.labels) - len(trained)
    assert rendered.labels[:masked] == (IGNORE_INDEX,) * masked


def test_the_masked_part_is_exactly_the_prompt_the_model_is_served(tokenizer):
    example = TrainingExample("What is the capital of France?", "Paris", "x1")
    rendered = render(example, tokenizer)
    served = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
    )
    masked = rendered.labels.count(IGNORE_INDEX)
    assert tokenizer.decode(rendered.input_ids[:masked]) == served


def test_features_are_what_a_causal_lm_and_its_collator_take(tokenizer):
    features = render(TrainingExample("Hi?", "Hello.", "x1"), tokenizer).features()
    assert set(features) == {"input_ids", "attention_mask", "labels"}
    assert len(features["input_ids"]) == len(features["labels"]) == len(features["attention_mask"])


def test_lineage_names_the_exchanges_and_golden_prompts_that_went_in(tokenizer):
    golden = GoldenExample("Capital of Japan?", "Tokyo")
    training_set = build(tokenizer, [exchange("x9", "Capital of Chile?", "Santiago")], [golden])
    assert training_set.lineage.exchange_ids == ("x9",)
    assert "Capital of Japan?" in training_set.lineage.golden_prompts
    assert len(training_set.lineage.golden_prompts) == 21  # and the 20 arithmetic questions


def test_a_written_training_set_reads_back_with_its_lineage(tokenizer, tmp_path: Path):
    training_set = build(tokenizer, [exchange("x1", "Capital of Fiji?", "Suva")])
    train_file, validation_file = write_training_set(training_set, tmp_path)
    assert tuple(read_examples(train_file)) == training_set.train
    assert tuple(read_examples(validation_file)) == training_set.validation
    lineage = json.loads((tmp_path / LINEAGE_FILE).read_text())
    assert lineage["exchange_ids"] == ["x1"]


def test_a_bad_line_is_reported_with_its_file_and_line(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "reference": "b", "source_id": "x1"}\n{"prompt": "a"}\n')
    with pytest.raises(TrainingDataError, match=r"train.jsonl:2: not a training example"):
        read_examples(path)
