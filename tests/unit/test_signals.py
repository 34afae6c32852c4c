"""Label-free signals: logprob, length, empty, refusal and error rates, latency percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.signals import is_refusal, signals
from monitor.window import ExchangeView, Window
from tests.unit.views import exchange_view


def exchange(
    response: str | None = "An answer.",
    *,
    tokens: int | None = 3,
    logprob: float | None = -0.5,
    latency: float = 0.1,
    status: str = "ok",
) -> ExchangeView:
    return exchange_view(
        response=response,
        completion_tokens=tokens,
        mean_logprob=logprob,
        latency_seconds=latency,
        status=status,
    )


def error() -> ExchangeView:
    return exchange(None, tokens=None, logprob=None, latency=30.0, status="error")


def window(*exchanges: ExchangeView) -> Window:
    return Window("a", exchanges)


def test_error_rate_counts_every_exchange_and_errors_are_left_out_of_the_rest():
    s = signals(window(exchange(latency=0.2), exchange(latency=0.2), error(), error()))
    assert (s.n, s.answered, s.error_rate) == (4, 2, 0.5)
    assert s.latency_p95_seconds == pytest.approx(0.2)
    assert s.mean_response_tokens == 3


def test_an_interrupted_exchange_is_neither_an_answer_nor_an_error():
    s = signals(window(exchange(), error(), exchange(None, status="interrupted")))
    assert (s.n, s.answered, s.error_rate) == (3, 1, 0.5)


def test_mean_logprob_is_over_exchanges_that_carry_one():
    s = signals(window(exchange(logprob=-1.0), exchange(logprob=-0.5), exchange(logprob=None)))
    assert s.mean_logprob == pytest.approx(-0.75)


def test_response_length_in_tokens_and_characters():
    s = signals(window(exchange("abcd", tokens=2), exchange("ab", tokens=None)))
    assert s.mean_response_tokens == 2
    assert s.mean_response_chars == 3


def test_blank_answers_are_empty():
    s = signals(window(exchange(""), exchange("  \n"), exchange("Paris"), exchange("Lyon")))
    assert s.empty_rate == 0.5


@pytest.mark.parametrize(
    "response",
    [
        "I'm sorry, but I can't help with that.",
        "  i cannot do that",
        "As an AI, I have no views.",
        "I\u2019m unable to answer.",
        "Sorry, I don't know.",
    ],
)
def test_refusal_openings_match_case_insensitively(response):
    assert is_refusal(response)


@pytest.mark.parametrize(
    "response", ["Paris is the capital.", "Well, I cannot say for sure, but it is Paris.", ""]
)
def test_answers_that_do_not_open_with_a_refusal_are_not_refusals(response):
    assert not is_refusal(response)


def test_refusal_rate_over_answered_exchanges():
    s = signals(window(exchange("I cannot help."), exchange("Paris"), exchange("Lyon"), error()))
    assert s.refusal_rate == pytest.approx(1 / 3)


def test_latency_percentiles_are_numpys():
    latencies = [0.05, 0.1, 0.2, 0.3, 0.4, 0.8, 1.6, 3.2]
    s = signals(window(*(exchange(latency=x) for x in latencies)))
    assert s.latency_p50_seconds == pytest.approx(np.percentile(latencies, 50))
    assert s.latency_p95_seconds == pytest.approx(np.percentile(latencies, 95))


def test_an_empty_window_has_no_signals():
    s = signals(window())
    assert (s.n, s.answered) == (0, 0)
    assert all(
        v is None
        for v in (
            s.error_rate,
            s.mean_logprob,
            s.mean_response_tokens,
            s.mean_response_chars,
            s.empty_rate,
            s.refusal_rate,
            s.latency_p50_seconds,
            s.latency_p95_seconds,
        )
    )


def test_a_window_of_errors_has_an_error_rate_and_nothing_else():
    s = signals(window(error(), error()))
    assert (s.n, s.answered, s.error_rate) == (2, 0, 1.0)
    assert s.mean_logprob is None and s.empty_rate is None and s.latency_p50_seconds is None
