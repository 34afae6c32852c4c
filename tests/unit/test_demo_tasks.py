"""The demo's tasks: product attribute extraction, generated from templates, reproducible,
answerable from the title, and held-out sets that share no title with the traffic."""

from __future__ import annotations

import json

import pytest

from monitor.quality import answer_score
from tunewatch.demo.tasks import INSTRUCTION, examples, traffic
from tunewatch.traffic import TrafficLine


@pytest.mark.parametrize("task", ["a", "b"])
def test_a_seed_gives_the_same_distinct_examples(task: str) -> None:
    first = examples(task, 300, seed=7)
    assert first == examples(task, 300, seed=7)
    assert len({e.prompt for e in first}) == 300
    assert first != examples(task, 300, seed=8)


def test_task_a_asks_for_the_brand_which_starts_the_marketplace_title() -> None:
    for example in examples("a", 50, seed=0):
        title = example.prompt.split("\nTitle: ", 1)[1]
        assert example.prompt.startswith(INSTRUCTION["a"])
        assert title.startswith(example.reference + " ")


def test_task_b_asks_for_colour_and_size_as_json_from_the_feed_format() -> None:
    for example in examples("b", 50, seed=0):
        title = example.prompt.split("\nTitle: ", 1)[1]
        answer = json.loads(example.reference)
        assert set(answer) == {"colour", "size"}
        assert f"| {answer['colour']} |" in title and f"| Size {answer['size']} |" in title
        assert " | by " in title  # the other format: the brand comes last


def test_a_held_out_set_shares_no_title_with_the_traffic() -> None:
    seen = examples("b", 400, seed=0)
    held = examples("b", 100, seed=1, excluding=seen)
    assert len(held) == 100 and not {e.prompt for e in held} & {e.prompt for e in seen}


def test_the_references_score_as_exact_matches_and_other_answers_do_not() -> None:
    [a, b] = examples("a", 2, seed=3)
    assert answer_score(a.reference, a.reference, "exact_match") == 1.0
    assert (
        answer_score(b.reference, a.reference, "exact_match") == 0.0 or a.reference == b.reference
    )
    assert 0 < answer_score(a.reference + " Inc", a.reference, "chrf") < 1


def test_traffic_lines_are_valid_and_timed_at_the_rate() -> None:
    lines = list(traffic(examples("a", 5, seed=0), start_s=10.0, rate=2.0))
    parsed = [TrafficLine.model_validate(line) for line in lines]
    assert [p.at for p in parsed] == [10.0, 10.5, 11.0, 11.5, 12.0]
    assert all(p.reference and p.user and p.temperature == 0.0 for p in parsed)


def test_more_examples_than_the_templates_hold_is_a_clear_error(monkeypatch) -> None:
    from tunewatch.demo import tasks

    monkeypatch.setattr(tasks, "BRANDS", ("Acme",))
    monkeypatch.setattr(tasks, "COLOURS", ("Red",))
    monkeypatch.setattr(tasks, "PRODUCTS", (("Mug", ("300ml",), ("Ceramic",)),))
    assert len(examples("a", 1, seed=0)) == 1  # the one title these templates can make
    with pytest.raises(ValueError, match="fewer than 2 distinct task-a titles"):
        examples("a", 2, seed=0)
