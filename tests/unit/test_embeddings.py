"""The prompt embedder: each exchange embedded once, a bounded cache, torch threads within cores.

A counting fake stands for the encoder; the real all-MiniLM-L6-v2 runs in one slow test
in test_drift.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from monitor.embeddings import PromptEmbedder, available_cores
from monitor.window import ExchangeView
from tests.unit.views import exchange_view


class CountingEncoder:
    """Sentence vectors from character codes; remembers every text it was asked to encode."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def get_embedding_dimension(self) -> int:
        return 4

    def encode(self, sentences: list[str], **options: Any) -> np.ndarray:
        self.encoded.extend(sentences)
        rows = [[len(s), sum(map(ord, s)) % 97, s.count(" "), 1.0] for s in sentences]
        vectors = np.asarray(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exchange(exchange_id: str, prompt: str) -> ExchangeView:
    return exchange_view(id=exchange_id, prompt=prompt)


@pytest.fixture
def encoder() -> CountingEncoder:
    return CountingEncoder()


def test_each_exchange_is_embedded_once_across_windows(encoder: CountingEncoder) -> None:
    embedder = PromptEmbedder(threads=1, model=encoder)
    first = [exchange(str(i), f"prompt number {i}") for i in range(5)]
    slid = first[2:] + [exchange("5", "prompt number 5")]

    a = embedder.embed_exchanges(first)
    b = embedder.embed_exchanges(slid)

    assert encoder.encoded == [e.prompt for e in first] + ["prompt number 5"]
    np.testing.assert_array_equal(a[2:], b[:3])
    assert embedder.embedded == 6


def test_vectors_come_back_in_the_windows_order_with_unit_length(encoder: CountingEncoder) -> None:
    embedder = PromptEmbedder(threads=1, model=encoder)
    window = [exchange("x", "short"), exchange("y", "a much longer prompt"), exchange("x", "short")]

    vectors = embedder.embed_exchanges(window)

    assert vectors.shape == (3, 4)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert encoder.encoded == ["short", "a much longer prompt"]


def test_the_cache_forgets_the_least_recently_read_vectors(encoder: CountingEncoder) -> None:
    embedder = PromptEmbedder(threads=1, model=encoder, cache_size=2)
    a, b, c = exchange("a", "alpha"), exchange("b", "beta"), exchange("c", "gamma")
    embedder.embed_exchanges([a, b])
    embedder.embed_exchanges([a])  # a is now the most recently read
    embedder.embed_exchanges([c])  # evicts b

    embedder.embed_exchanges([a, b])

    assert embedder.cached() == 2
    assert encoder.encoded == ["alpha", "beta", "gamma", "beta"]


def test_a_window_larger_than_the_cache_still_gets_every_vector(encoder: CountingEncoder) -> None:
    embedder = PromptEmbedder(threads=1, model=encoder, cache_size=2)
    window = [exchange(str(i), f"prompt {i}") for i in range(5)]

    vectors = embedder.embed_exchanges(window)

    assert vectors.shape == (5, 4)
    assert embedder.cached() == 2


def test_an_empty_window_has_no_vectors(encoder: CountingEncoder) -> None:
    embedder = PromptEmbedder(threads=1, model=encoder)

    assert embedder.embed_exchanges([]).shape == (0, 4)
    assert encoder.encoded == []


def test_torch_threads_never_exceed_the_cores(encoder: CountingEncoder) -> None:
    embedder = PromptEmbedder(threads=available_cores() + 8, model=encoder)
    torch.set_num_threads(1)

    embedder.embed_texts(["anything"])

    assert embedder.threads == available_cores()
    assert torch.get_num_threads() == available_cores()


def test_threads_must_be_positive(encoder: CountingEncoder) -> None:
    with pytest.raises(ValueError, match="threads"):
        PromptEmbedder(threads=0, model=encoder)
