"""Drift verdicts: a known shift is caught, no shift is not, tiny windows are not judged,
and calibration states a false-alarm rate that holds on A/A splits it has not seen.

Traffic is generated from topic vocabularies with fixed seeds; a hashing vectoriser
stands for the embedding model (prompts of different topics get different vectors, at no
cost). The MMD's threshold, which has no fixed scale, comes from calibrating on this
traffic as a user would; the p-value tests keep their defaults. One slow test runs the
real all-MiniLM-L6-v2.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pytest
from sklearn.feature_extraction.text import HashingVectorizer

from monitor.drift import (
    Column,
    ColumnTest,
    DriftConfig,
    DriftDetector,
    calibrate,
)
from monitor.window import ExchangeView, Window

# Evidently's classifiers (text, embeddings) stop at its max_iter=50 and say so every time.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

TOPICS = {
    "cooking": (
        "simmer braise whisk dough oven garlic onion sauce pasta recipe flour butter roast "
        "knead yeast broth saucepan skillet marinade caramelise vinegar basil oregano "
        "dumpling risotto batter bake grill stew spice pepper"
    ).split(),
    "databases": (
        "index query table join schema transaction replica shard partition column row "
        "primary foreign constraint vacuum snapshot isolation commit rollback cursor "
        "deadlock lock migration backup planner cache tuple relation"
    ).split(),
    "astronomy": (
        "galaxy nebula orbit telescope comet planet star redshift quasar pulsar eclipse "
        "asteroid meteor supernova cluster spectrum parallax luminosity dwarf giant moon "
        "crater aurora solstice equinox cosmic radiation"
    ).split(),
}
FRAMES = ("How do I {}?", "Explain {} to me.", "What is the difference: {}", "{}", "Help with {}")
REFUSAL = "I'm sorry, but I cannot help with that."


def traffic(
    n: int,
    seed: int,
    mix: dict[str, float] | None = None,
    *,
    prefix: str = "",
    refusal_rate: float = 0.02,
    blank_rate: float = 0.0,
    logprob_mean: float = -0.8,
    error_rate: float = 0.0,
    with_logprobs: bool = True,
) -> list[ExchangeView]:
    """`n` exchanges whose prompts are drawn from the topics in `mix` (weights)."""
    mix = mix or {"cooking": 0.5, "databases": 0.5}
    rng = np.random.default_rng(seed)
    names = list(mix)
    weights = np.array([mix[t] for t in names]) / sum(mix.values())
    exchanges = []
    for i in range(n):
        words = TOPICS[names[rng.choice(len(names), p=weights)]]
        prompt = prefix + rng.choice(FRAMES).format(
            " ".join(rng.choice(words, size=rng.integers(3, 12)))
        )
        error = rng.random() < error_rate
        draw = rng.random()
        refused, blank = draw < refusal_rate, refusal_rate <= draw < refusal_rate + blank_rate
        answer = REFUSAL if refused else " ".join(rng.choice(words, size=rng.integers(5, 30)))
        answer = " \n" if blank else answer
        exchanges.append(
            ExchangeView(
                id=f"{seed}-{i}",
                created_at=datetime(2026, 11, 1, tzinfo=UTC),
                adapter="support-v1",
                route="primary",
                prompt=prompt,
                response=None if error else answer,
                completion_tokens=None if error else len(answer.split()),
                mean_logprob=float(rng.normal(logprob_mean, 0.2)) if with_logprobs else None,
                latency_seconds=0.2,
                status="error" if error else "ok",
            )
        )
    return exchanges


_HASHER = HashingVectorizer(n_features=256, alternate_sign=False, norm="l2")


def fake_embed(exchanges: Sequence[ExchangeView]) -> np.ndarray:
    """Hashed bag-of-words prompt vectors of unit length: cheap, and topics land apart."""
    return _HASHER.transform([e.prompt for e in exchanges]).toarray()


def window(exchanges: list[ExchangeView]) -> Window:
    return Window("support-v1", tuple(exchanges))


REFERENCE = window(traffic(300, seed=1))
CURRENT_SIZE = 100


@pytest.fixture(scope="module")
def config() -> DriftConfig:
    """Default tests, the embedding's threshold calibrated to 1% on the reference.

    The text classifier's AUC gets 0.65 by hand (over three standard errors above 0.5 at
    these sizes): calibrating it too would cost this file most of its run time.
    """
    only_embedding = DriftConfig(tests={Column.PROMPT_EMBEDDING: ColumnTest("mmd", 0.0)})
    calibration = calibrate(
        REFERENCE, fake_embed, only_embedding, current_size=CURRENT_SIZE,
        target_false_alarm=0.01, runs=199,
    )  # fmt: skip
    return calibration.proposed_config(DriftConfig()).with_thresholds({Column.PROMPT_TEXT: 0.65})


def test_windows_of_the_same_traffic_do_not_drift(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)

    result = detector.check(window(traffic(CURRENT_SIZE, seed=2)))

    assert result.drifted is False
    assert result.drift_share == 0.0
    assert all(c.judged for c in result.columns)


def test_a_new_topic_drifts_the_prompt_embedding_and_the_dataset(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)
    # Half the window on a new topic: the hashed vectors see it at 3-6x the threshold
    # whatever the seeds (a 30% mix sits at about 1x; MiniLM, in the slow test, sees 25%).
    shifted = traffic(
        CURRENT_SIZE, seed=3, mix={"cooking": 0.25, "databases": 0.25, "astronomy": 0.5}
    )

    result = detector.check(window(shifted))

    embedding = result.column(Column.PROMPT_EMBEDDING)
    assert embedding.drifted is True
    assert embedding.method == "mmd"
    assert embedding.score is not None and embedding.score > embedding.threshold
    assert result.drifted is True
    assert Column.PROMPT_EMBEDDING in result.drifted_columns


def test_a_longer_prompt_format_drifts_the_prompt_length(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)
    shifted = traffic(CURRENT_SIZE, seed=4, prefix="Context: answer as a numbered list. ")

    result = detector.check(window(shifted))

    length = result.column(Column.PROMPT_LENGTH)
    assert (length.method, length.threshold) == ("ks", 0.001)
    assert length.drifted is True and length.score is not None and length.score <= 0.001
    assert result.drifted is True


def test_more_refusals_and_lower_logprobs_drift_the_output_columns(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)
    shifted = traffic(CURRENT_SIZE, seed=5, refusal_rate=0.3, logprob_mean=-1.2)

    result = detector.check(window(shifted))

    assert result.column(Column.RESPONSE_REFUSAL).drifted is True
    assert result.column(Column.RESPONSE_MEAN_LOGPROB).drifted is True
    assert result.column(Column.PROMPT_EMBEDDING).drifted is False


def test_blank_answers_count_as_empty_as_in_the_exported_rates(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)

    result = detector.check(window(traffic(CURRENT_SIZE, seed=13, blank_rate=0.3)))

    assert result.column(Column.RESPONSE_EMPTY).drifted is True
    assert result.column(Column.RESPONSE_REFUSAL).drifted is False


def test_a_tiny_current_window_gets_no_verdict_and_says_why(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)

    result = detector.check(window(traffic(30, seed=6)))

    assert result.drifted is None and result.drift_share is None
    assert not any(c.judged for c in result.columns)
    assert result.reason is not None and "at least 100" in result.reason
    assert "30 exchanges" in result.column(Column.PROMPT_EMBEDDING).reason


def test_a_tiny_reference_gets_no_verdict(config: DriftConfig) -> None:
    detector = DriftDetector(window(traffic(50, seed=7)), fake_embed, config)

    result = detector.check(window(traffic(CURRENT_SIZE, seed=8, mix={"astronomy": 1.0})))

    assert result.drifted is None
    assert "reference has 50 exchanges; at least 200 are needed" in result.reason


def test_an_empty_current_window_gets_no_verdict(config: DriftConfig) -> None:
    result = DriftDetector(REFERENCE, fake_embed, config).check(window([]))

    assert result.drifted is None
    assert "current window has 0 exchanges" in result.reason


def test_output_columns_count_only_answers_and_are_skipped_when_too_few(
    config: DriftConfig,
) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)
    mostly_errors = traffic(CURRENT_SIZE, seed=9, error_rate=0.6)

    result = detector.check(window(mostly_errors))

    response = result.column(Column.RESPONSE_LENGTH)
    assert response.judged is False
    assert response.current_rows == sum(e.ok for e in mostly_errors)
    assert "answers" in response.reason
    assert result.column(Column.PROMPT_LENGTH).judged is True
    assert result.drifted is False  # judged on the columns that had enough rows


def test_answers_without_logprobs_leave_only_that_column_unjudged(config: DriftConfig) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)

    result = detector.check(window(traffic(CURRENT_SIZE, seed=10, with_logprobs=False)))

    logprob = result.column(Column.RESPONSE_MEAN_LOGPROB)
    assert logprob.judged is False and "answers with logprobs" in logprob.reason
    assert result.column(Column.RESPONSE_LENGTH).judged is True


def test_exchanges_of_the_reference_are_left_out_of_the_current_window(
    config: DriftConfig,
) -> None:
    detector = DriftDetector(REFERENCE, fake_embed, config)
    overlapping = list(REFERENCE.exchanges[:60]) + traffic(CURRENT_SIZE, seed=11)

    result = detector.check(window(overlapping))

    assert result.current_size == CURRENT_SIZE
    assert "60 exchanges of the current window are in the reference" in result.reason
    assert result.drifted is False


def test_calibrated_thresholds_hold_their_false_alarm_rate_on_unseen_splits() -> None:
    reference = window(traffic(300, seed=12))
    cheap = DriftConfig(
        tests={
            Column.PROMPT_EMBEDDING: ColumnTest("mmd", 0.0),
            Column.PROMPT_LENGTH: ColumnTest("ks", 0.5),
        }
    )
    target = 0.1

    calibration = calibrate(
        reference, fake_embed, cheap, current_size=100, target_false_alarm=target, runs=79,
        seed=0,
    )  # fmt: skip
    held_out = calibrate(
        reference, fake_embed, calibration.proposed_config(cheap), current_size=100,
        target_false_alarm=target, runs=150, seed=1,
    )  # fmt: skip

    at_configured = {c.column: c.false_alarm_rate for c in calibration.columns}
    assert at_configured[Column.PROMPT_EMBEDDING] > 0.3  # MMD² > 0: about half the splits
    assert at_configured[Column.PROMPT_LENGTH] > 0.3  # p <= 0.5: about half
    for column in held_out.columns:
        assert 0.02 <= column.false_alarm_rate <= 0.2, column  # 0.1 expected
    assert held_out.dataset_false_alarm_rate <= 2 * target + 0.05


def test_calibration_refuses_too_few_runs_for_the_target() -> None:
    with pytest.raises(ValueError, match="at least 99 are needed"):
        calibrate(REFERENCE, fake_embed, current_size=CURRENT_SIZE, target_false_alarm=0.01,
                  runs=50)  # fmt: skip


def test_calibration_refuses_a_reference_too_small_to_split() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        calibrate(REFERENCE, fake_embed, current_size=150, target_false_alarm=0.1, runs=20)


def test_a_method_that_does_not_fit_the_column_is_refused() -> None:
    with pytest.raises(ValueError, match="does not apply"):
        DriftConfig(tests={Column.PROMPT_EMBEDDING: ColumnTest("ks", 0.01)})
    with pytest.raises(ValueError, match="does not apply"):
        DriftConfig(tests={Column.PROMPT_LENGTH: ColumnTest("mmd", 0.01)})


@pytest.mark.slow
def test_real_minilm_embeddings_catch_a_new_topic_offline() -> None:
    """The packaged model loads from its own files (no hub); MMD on it sees a third of the
    window turn to a new topic at over 3x its threshold, where no shift stays under 0.3x."""
    from monitor.embeddings import PromptEmbedder

    embedder = PromptEmbedder(threads=2)  # lowered to the cores there are
    reference = window(traffic(300, seed=20))
    only_embedding = DriftConfig(tests={Column.PROMPT_EMBEDDING: ColumnTest("mmd", 0.0)})
    calibration = calibrate(
        reference, embedder.embed_exchanges, only_embedding, current_size=100,
        target_false_alarm=0.01, runs=199,
    )  # fmt: skip
    detector = DriftDetector(
        reference, embedder.embed_exchanges, calibration.proposed_config(only_embedding)
    )
    same = detector.check(window(traffic(100, seed=21)))
    mixed = detector.check(
        window(traffic(100, seed=22, mix={"cooking": 1, "databases": 1, "astronomy": 1}))
    )

    assert same.drifted is False
    assert mixed.drifted is True
    assert embedder.embedded == 500  # the reference once, each current window once
