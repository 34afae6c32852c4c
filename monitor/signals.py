"""Label-free signals of a window: what the monitor can say about every exchange.

References arrive late or never, so quality and calibration see a fraction of the traffic.
These need none: how sure the model is (mean token logprob), how much it says, how often
it answers nothing or refuses, how often the request fails, and how long it takes. A
change in any of them is often the first sign of a bad adapter or drifting traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor.window import Window

# Openings of a refusal, matched case-insensitively at the start of the response. Short
# on purpose: a refusal rate is only useful as a trend, and a longer list would start to
# catch answers that merely begin politely.
REFUSAL_OPENINGS = (
    "i'm sorry",
    "i am sorry",
    "sorry, i",
    "i apologize",
    "i cannot",
    "i can't",
    "i can not",
    "i'm unable",
    "i am unable",
    "i'm not able to",
    "i am not able to",
    "as an ai",
)


@dataclass(frozen=True)
class Signals:
    """Label-free signals; None where the window holds nothing to measure."""

    n: int  # exchanges in the window, errors included
    answered: int  # exchanges with an answer: the base of the rates and means below
    error_rate: float | None  # status error, over the exchanges not interrupted
    mean_logprob: float | None  # over answered exchanges that carry one
    mean_response_tokens: float | None  # completion_tokens, where recorded
    mean_response_chars: float | None
    empty_rate: float | None  # blank answers
    refusal_rate: float | None
    latency_p50_seconds: float | None  # answered exchanges: errors are in error_rate
    latency_p95_seconds: float | None


def is_refusal(response: str) -> bool:
    """The response opens with one of REFUSAL_OPENINGS (typographic apostrophes allowed)."""
    return response.lstrip().casefold().replace("\u2019", "'").startswith(REFUSAL_OPENINGS)


def mean(values: Sequence[float]) -> float | None:
    """The mean; None for no values (a gap in a plot, "no data" in a table), never 0."""
    return float(np.mean(values)) if values else None


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """The `qs` percentiles (numpy's linear interpolation); Nones for no values."""
    return [float(v) for v in np.percentile(values, qs)] if values else [None] * len(qs)


def signals(window: Window) -> Signals:
    """Logprob, length, empty, refusal and error rates and latency percentiles of a window."""
    answered = window.answered()
    responses = [e.response or "" for e in answered]  # answered: never None
    latencies = [e.latency_seconds for e in answered]
    p50, p95 = percentiles(latencies, (50, 95))
    judged = [e for e in window.exchanges if not e.interrupted]
    return Signals(
        n=len(window),
        answered=len(answered),
        error_rate=sum(not e.ok for e in judged) / len(judged) if judged else None,
        mean_logprob=mean([e.mean_logprob for e in answered if e.mean_logprob is not None]),
        mean_response_tokens=mean(
            [e.completion_tokens for e in answered if e.completion_tokens is not None]
        ),
        mean_response_chars=mean([len(r) for r in responses]),
        empty_rate=mean([not r.strip() for r in responses]),
        refusal_rate=mean([is_refusal(r) for r in responses]),
        latency_p50_seconds=p50,
        latency_p95_seconds=p95,
    )
