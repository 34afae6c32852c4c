"""Drift of live traffic against a reference window, by Evidently, at a stated false-alarm rate.

What is compared: the reference window (the data the serving adapter was trained on, or
its first exchanges) against the current window (the last N exchanges), column by
column: the prompt text, prompt descriptors, prompt embeddings, and output descriptors.
Each column gets a score, the method and threshold that judged it, and a verdict; the
dataset verdict counts the drifted columns. Why it is built this way (the figures are in
docs/design.md, "Measured on this machine", and bench/monitor.py):

- Evidently computes every number. Its drift methods are called as objects (the
  `StatTest` objects for columns, the embedding `DriftMethod` objects), not through a
  `Report`: a report of embedding drift always runs t-SNE for a chart (25-110 s), and
  the numbers would have to be dug out of a snapshot. The text descriptors are
  Evidently's (`TextLength`, `NonLetterCharacterPercentage`) on an Evidently `Dataset`;
  an answer is empty or a refusal as monitor/signals.py says, so the drift columns and
  the exported rates agree.
- Every column names its method and threshold. Evidently's defaults change when the
  reference passes 1,000 rows (KS becomes Wasserstein, the text classifier's bootstrap
  goes), so a verdict would change meaning as the reference grows; ours never do.
- Prompt embeddings: Evidently's default, a domain classifier, flags 0-7% of no-shift
  windows and catches a 25% topic mix a third of the time at window 200. tunewatch uses
  Evidently's MMD method instead (maximum mean discrepancy, RBF kernel, bandwidth by the
  median heuristic), a two-sample test of the whole distribution, with a threshold
  calibrated on A/A splits of the reference. Evidently's own MMD threshold (0.015) sits
  an order of magnitude above the A/A spread of all-MiniLM-L6-v2 prompts (~0.001),
  which is why it fires only on a complete switch. Measured on the bench's corpus
  (reference 800, window 200, thresholds at 1% A/A false alarms), three topics each
  mixed in at 25%: MMD caught 98-100%
  of windows; the default classifier 42-82% (at 2% false alarms of its own); each
  prompt's mean cosine distance to its five nearest reference prompts, under KS, caught
  95-100% of distant topics but 2% of a topic lying next to a reference one (e-mail
  beside web), whose prompts are near old ones but in a new mix. MMD's score has no
  fixed scale, so its threshold means something only once calibrated: `calibrate`
  measures it. Both windows are sampled down to `embedding_rows` for it, since its
  kernel matrix grows with the square of the rows.
- A stated false-alarm rate: KS p-values hold theirs by construction (conservatively
  where values tie, as for the 0/1 flags); Evidently's z test on rare flags runs hot,
  and the classifier's AUC and the MMD have no fixed scale at all. The defaults give
  each column about 0.1% false alarms per check on the bench's traffic, so the dataset
  verdict (any drifted column) alarms on about 1% of no-shift checks at most.
  `calibrate` splits the reference many times (A/A) to measure each column's rate at
  the configured thresholds, and proposes thresholds for a target rate, with a
  conformal bound.
- Small windows make every test noisy: below `min_reference` / `min_current` rows a
  column is not judged, and the result says why; no verdict comes from a tiny window.
- No out-of-vocabulary share: Evidently's OOV descriptor calls `nltk.download` for the
  WordNet and `words` corpora at run time, which fails offline. Debian's `wordnet-base`
  ships the WordNet database but not the `lexnames` file NLTK's reader requires (the
  lexicographer file list is compiled into Debian's libwordnet), and NLTK reads no
  corpus through a link outside its data directory, so it cannot be served from the
  Debian packages as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset
from evidently.descriptors import NonLetterCharacterPercentage, TextLength
from evidently.legacy.calculations.stattests import get_stattest
from evidently.legacy.calculations.stattests.registry import (
    StatTestInvalidFeatureTypeError,
    get_registered_stattest,
)
from evidently.legacy.core import ColumnType
from evidently.legacy.metrics.data_drift.embedding_drift_methods import (
    DriftMethod,
    MMDDriftMethod,
    ModelDriftMethod,
)
from joblib import parallel_config
from threadpoolctl import threadpool_limits

from monitor.signals import is_refusal
from monitor.window import ExchangeView, Window

EmbedFn = Callable[[Sequence[ExchangeView]], np.ndarray]
"""Unit-length prompt vectors for exchanges, one row each (monitor.embeddings.PromptEmbedder)."""


class Column(StrEnum):
    """The columns drift is judged on; the values are the `column` label of the metrics."""

    PROMPT_TEXT = "prompt_text"
    PROMPT_LENGTH = "prompt_length"
    PROMPT_NON_LETTER = "prompt_non_letter_share"
    PROMPT_EMBEDDING = "prompt_embedding"
    RESPONSE_LENGTH = "response_length"
    RESPONSE_MEAN_LOGPROB = "response_mean_logprob"
    RESPONSE_EMPTY = "response_empty"
    RESPONSE_REFUSAL = "response_refusal"


_FLAGS = frozenset({Column.RESPONSE_EMPTY, Column.RESPONSE_REFUSAL})  # 0/1 per answer


def _feature_type(column: Column, method: str) -> ColumnType:
    """Evidently's column type for `column` under `method`; ValueError where it does not fit.

    The prompt is text and the rest are numbers, except that a flag given to a test that
    takes only categories (z, Fisher's) goes as a category.
    """
    if column is Column.PROMPT_TEXT:
        kind = ColumnType.Text
    elif column in _FLAGS:
        try:
            get_registered_stattest(method, ColumnType.Numerical)
            kind = ColumnType.Numerical
        except StatTestInvalidFeatureTypeError:
            kind = ColumnType.Categorical
    else:
        kind = ColumnType.Numerical
    get_registered_stattest(method, kind)  # Evidently's own message when it does not fit
    return kind


# Evidently's embedding drift methods, without their bootstrap so the threshold is theirs.
EMBEDDING_METHODS: Mapping[str, type[DriftMethod]] = MappingProxyType(
    {"mmd": MMDDriftMethod, "model": ModelDriftMethod}
)

# Evidently's tests whose score is a p-value: drift when the score falls to the threshold.
# Every other method scores a distance or an AUC: drift when the score rises over it.
P_VALUE_METHODS = frozenset(
    {
        "ks",
        "mannw",
        "anderson",
        "cramer_von_mises",
        "t_test",
        "es",
        "z",
        "fisher_exact",
        "chisquare",
        "g_test",
        "TVD",
        "empirical_mmd",
    }
)


@dataclass(frozen=True)
class ColumnTest:
    """How one column is judged: an Evidently method by name, and its threshold."""

    method: str
    threshold: float

    @property
    def drifts_below(self) -> bool:
        """True for p-values (drift at or under the threshold), False for distances and AUCs."""
        return self.method in P_VALUE_METHODS


DEFAULT_TESTS: Mapping[Column, ColumnTest] = MappingProxyType(
    {
        # Thresholds without a fixed scale are the 99.9th percentile of 999 A/A splits of the
        # bench's reference (bench/monitor.py) at reference 1,200 / current 200: the AUC of
        # Evidently's TF-IDF domain classifier (0.5 is no difference; 0.575 measured), and
        # the unbiased MMD² of all-MiniLM-L6-v2 prompt vectors (0.00124 measured). Calibrate
        # for other window sizes or traffic.
        Column.PROMPT_TEXT: ColumnTest("abs_text_content_drift", 0.58),
        Column.PROMPT_LENGTH: ColumnTest("ks", 0.001),
        Column.PROMPT_NON_LETTER: ColumnTest("ks", 0.001),
        Column.PROMPT_EMBEDDING: ColumnTest("mmd", 0.0013),
        Column.RESPONSE_LENGTH: ColumnTest("ks", 0.001),
        Column.RESPONSE_MEAN_LOGPROB: ColumnTest("ks", 0.001),
        # Flags as 0/1 numbers under KS, which compares the two shares conservatively: it
        # needs a jump of about 15 points at window 200. Evidently's z test runs hot on rare
        # flags (a 1% empty rate: 0.7% of A/A splits alarmed at 0.001, and a no-shift bench
        # stream alarmed at p = 5e-8); its Fisher test takes only windows of equal size.
        Column.RESPONSE_EMPTY: ColumnTest("ks", 0.001),
        Column.RESPONSE_REFUSAL: ColumnTest("ks", 0.001),
    }
)


@dataclass(frozen=True)
class DriftConfig:
    """What is judged and how; every field is explicit so a verdict never changes meaning.

    tests: the columns to judge and each one's method and threshold.
    min_reference, min_current: fewer rows than this in a column's reference or current
      window, and the column is not judged.
    min_drifted_columns: the dataset is judged drifted when at least this many columns
      drifted. With one, its false-alarm rate is at most the sum of the columns'.
    embedding_rows: at most this many rows of each window go into the embedding test
      (a seeded sample), which costs the square of its rows in time and memory.
    threads: BLAS and OpenMP threads for the tests (the cores are shared, docs/design.md).
    """

    tests: Mapping[Column, ColumnTest] = field(default_factory=lambda: dict(DEFAULT_TESTS))
    min_reference: int = 200
    min_current: int = 100
    min_drifted_columns: int = 1
    embedding_rows: int = 2000
    threads: int = 1

    def __post_init__(self) -> None:
        unknown = set(self.tests) - set(Column)
        if unknown:
            raise ValueError(f"unknown drift columns {sorted(unknown)}: known are {list(Column)}")
        for column, test in self.tests.items():
            if column is Column.PROMPT_EMBEDDING and test.method not in EMBEDDING_METHODS:
                raise ValueError(
                    f"{column}: method {test.method!r} does not apply; it takes one of "
                    f"{sorted(EMBEDDING_METHODS)}"
                )
            if column is not Column.PROMPT_EMBEDDING:
                try:
                    _feature_type(column, test.method)
                except ValueError as exc:
                    raise ValueError(
                        f"{column}: method {test.method!r} does not apply: {exc}"
                    ) from exc
        if min(self.min_reference, self.min_current, self.min_drifted_columns) < 1:
            raise ValueError("min_reference, min_current and min_drifted_columns must be >= 1")

    def with_thresholds(self, thresholds: Mapping[Column, float]) -> DriftConfig:
        """This configuration with some columns' thresholds replaced (their methods kept)."""
        tests = {
            column: replace(test, threshold=thresholds.get(column, test.threshold))
            for column, test in self.tests.items()
        }
        return replace(self, tests=tests)


@dataclass(frozen=True)
class ColumnDrift:
    """One column's verdict; `score` and `drifted` are None when it was not judged (`reason`)."""

    column: Column
    method: str
    threshold: float
    score: float | None
    drifted: bool | None
    reference_rows: int
    current_rows: int
    reason: str | None = None

    @property
    def judged(self) -> bool:
        return self.drifted is not None


@dataclass(frozen=True)
class DriftResult:
    """The drift of one current window against the reference, column by column and overall.

    `drift_share` is the share of judged columns that drifted; `drifted` is the dataset
    verdict. Both are None when no column could be judged, and `reason` says why.
    """

    adapter: str
    reference_size: int
    current_size: int
    columns: tuple[ColumnDrift, ...]
    drift_share: float | None
    drifted: bool | None
    reason: str | None = None

    def column(self, column: Column) -> ColumnDrift:
        return next(c for c in self.columns if c.column == column)

    @property
    def drifted_columns(self) -> tuple[Column, ...]:
        return tuple(c.column for c in self.columns if c.drifted)


@dataclass(frozen=True)
class ColumnCalibration:
    """A column's A/A false-alarm rate at its configured threshold, and the threshold proposed.

    `proposed_threshold` stops just short of the k-th most drift-like A/A score, k =
    ⌊target·(runs+1)⌋: a further A/A split, exchangeable with these, is more drift-like
    than that with probability at most k/(runs+1) <= target (a conformal bound).
    `runs` counts the splits in which the column was judged.
    """

    column: Column
    method: str
    configured_threshold: float
    false_alarm_rate: float
    proposed_threshold: float
    runs: int


@dataclass(frozen=True)
class Calibration:
    """What A/A splits of a reference window say about a drift configuration.

    Each split draws `current_size` exchanges of the reference as a current window and
    judges them against the rest: no drift exists, so every alarm is a false one. The
    splits' reference is `current_size` smaller than the real one, which makes the rates
    measured here slightly higher than the monitor's.
    """

    target_false_alarm: float
    runs: int
    reference_size: int
    current_size: int
    columns: tuple[ColumnCalibration, ...]
    dataset_false_alarm_rate: float  # the dataset verdict, at the configured thresholds
    proposed_dataset_false_alarm_rate: float  # the same splits judged at the proposed ones

    def proposed_config(self, config: DriftConfig) -> DriftConfig:
        """`config` with the proposed thresholds."""
        return config.with_thresholds({c.column: c.proposed_threshold for c in self.columns})


@dataclass(frozen=True)
class _WindowData:
    """One window's per-exchange values (one row each; NaN where a column has no value)."""

    rows: pd.DataFrame
    vectors: np.ndarray | None

    def take(self, positions: np.ndarray) -> _WindowData:
        vectors = None if self.vectors is None else self.vectors[positions]
        return _WindowData(self.rows.iloc[positions], vectors)

    def values(self, column: Column, kind: ColumnType) -> pd.Series:
        """The column's values over the exchanges that have one."""
        series = self.rows[column.value].dropna()
        return series.astype(bool) if kind is ColumnType.Categorical else series

    def count(self, column: Column) -> int:
        if column is Column.PROMPT_EMBEDDING:
            return len(self.rows)
        return int(self.rows[column.value].notna().sum())


def _window_data(
    exchanges: Sequence[ExchangeView], embed: EmbedFn | None, config: DriftConfig
) -> _WindowData:
    """Descriptors by Evidently, output columns only where an answer exists, and vectors."""
    answered = pd.Series([e.ok and e.response is not None for e in exchanges], dtype=bool)
    responses = [(e.response or "") if e.ok else "" for e in exchanges]
    frame = pd.DataFrame(
        {
            "prompt": [e.prompt or None for e in exchanges],  # Evidently divides by the length
            "response": responses,
        },
        dtype=object,
    )
    descriptors = Dataset.from_pandas(
        frame,
        data_definition=DataDefinition(text_columns=["prompt", "response"]),
        descriptors=[
            TextLength("prompt", alias=Column.PROMPT_LENGTH.value),
            NonLetterCharacterPercentage("prompt", alias=Column.PROMPT_NON_LETTER.value),
            TextLength("response", alias=Column.RESPONSE_LENGTH.value),
        ],
    ).as_dataframe()
    logprobs = pd.Series([e.mean_logprob for e in exchanges], dtype=float)
    empty = pd.Series([not r.strip() for r in responses], dtype=float)  # as signals.py
    refusal = pd.Series([is_refusal(r) for r in responses], dtype=float)
    rows = pd.DataFrame(
        {
            Column.PROMPT_TEXT.value: [e.prompt for e in exchanges],
            Column.PROMPT_LENGTH.value: descriptors[Column.PROMPT_LENGTH.value].astype(float),
            Column.PROMPT_NON_LETTER.value: descriptors[Column.PROMPT_NON_LETTER.value],
            Column.RESPONSE_LENGTH.value: descriptors[Column.RESPONSE_LENGTH.value]
            .astype(float)
            .where(answered),
            Column.RESPONSE_MEAN_LOGPROB.value: logprobs.where(answered),
            Column.RESPONSE_EMPTY.value: empty.where(answered),
            Column.RESPONSE_REFUSAL.value: refusal.where(answered),
        }
    )
    vectors = None
    if embed is not None and Column.PROMPT_EMBEDDING in config.tests:
        vectors = np.asarray(embed(exchanges), dtype=np.float64)
    return _WindowData(rows, vectors)


def _empty_window_data(config: DriftConfig) -> _WindowData:
    rows = pd.DataFrame({column.value: pd.Series(dtype=float) for column in Column})
    return _WindowData(rows, np.empty((0, 0)) if Column.PROMPT_EMBEDDING in config.tests else None)


def _sample(vectors: np.ndarray, rows: int) -> np.ndarray:
    if len(vectors) <= rows:
        return vectors
    return vectors[np.random.default_rng(0).choice(len(vectors), rows, replace=False)]


def _score(
    column: Column,
    test: ColumnTest,
    reference: _WindowData,
    current: _WindowData,
    config: DriftConfig,
) -> tuple[float, bool]:
    if column is Column.PROMPT_EMBEDDING:
        assert reference.vectors is not None and current.vectors is not None
        method = EMBEDDING_METHODS[test.method](threshold=test.threshold, bootstrap=False)
        score, drifted, _ = method(
            pd.DataFrame(_sample(current.vectors, config.embedding_rows)),
            pd.DataFrame(_sample(reference.vectors, config.embedding_rows)),
        )
        return float(score), bool(drifted)
    kind = _feature_type(column, test.method)
    ref, cur = reference.values(column, kind), current.values(column, kind)
    stattest = get_stattest(ref, cur, kind, test.method)
    result = stattest(ref, cur, kind, test.threshold)
    return float(result.drift_score), bool(result.drifted)


def _judge_column(
    column: Column, reference: _WindowData, current: _WindowData, config: DriftConfig
) -> ColumnDrift:
    test = config.tests[column]
    n_ref, n_cur = reference.count(column), current.count(column)
    verdict = ColumnDrift(column, test.method, test.threshold, None, None, n_ref, n_cur)
    what = "exchanges" if column.value.startswith("prompt") else "answers"
    if column is Column.RESPONSE_MEAN_LOGPROB:
        what = "answers with logprobs"
    if n_ref < config.min_reference:
        return replace(
            verdict,
            reason=f"reference has {n_ref} {what}; at least {config.min_reference} are needed",
        )
    if n_cur < config.min_current:
        return replace(
            verdict,
            reason=f"current window has {n_cur} {what}; at least {config.min_current} are needed",
        )
    score, drifted = _score(column, test, reference, current, config)
    if math.isnan(score):
        return replace(verdict, reason=f"{test.method} gave no score (every value the same?)")
    return replace(verdict, score=score, drifted=drifted)


def _judge(
    adapter: str,
    reference: _WindowData,
    current: _WindowData,
    config: DriftConfig,
    note: str | None = None,
) -> DriftResult:
    # Evidently's MMD asks joblib for a thread per core; run it in the caller's thread
    # instead, under the BLAS budget (joblib's pool also costs ~50 ms a call to start).
    with threadpool_limits(limits=config.threads), parallel_config(backend="sequential"):
        columns = tuple(
            _judge_column(column, reference, current, config)
            for column in Column
            if column in config.tests
        )
    judged = [c for c in columns if c.judged]
    if not judged:
        reasons = sorted({c.reason for c in columns if c.reason})
        reason = "; ".join(filter(None, [note, *reasons])) or "no column is configured"
        return DriftResult(
            adapter, len(reference.rows), len(current.rows), columns, None, None, reason
        )
    drifted = sum(1 for c in judged if c.drifted)
    return DriftResult(
        adapter,
        len(reference.rows),
        len(current.rows),
        columns,
        drift_share=drifted / len(judged),
        drifted=drifted >= config.min_drifted_columns,
        reason=note,
    )


class DriftDetector:
    """Judges current windows against one reference window, prepared once.

    The reference's descriptors and vectors are computed when the detector is made; each
    `check` computes only the current window's (its vectors come from `embed`, which
    should cache them by exchange id, as `PromptEmbedder.embed_exchanges` does).
    """

    def __init__(self, reference: Window, embed: EmbedFn, config: DriftConfig | None = None):
        self.config = config or DriftConfig()
        self.reference = reference
        self._embed = embed
        self._reference_ids = frozenset(e.id for e in reference.exchanges)
        self._reference = self._data(reference.exchanges)

    def check(self, current: Window) -> DriftResult:
        """The drift of `current` against the reference.

        Exchanges that are also in the reference are left out of the current window (an
        exchange is no evidence of drift from itself); the result says when that happened.
        """
        exchanges = [e for e in current.exchanges if e.id not in self._reference_ids]
        overlap = len(current.exchanges) - len(exchanges)
        note = (
            f"{overlap} exchanges of the current window are in the reference and were left out"
            if overlap
            else None
        )
        return _judge(current.adapter, self._reference, self._data(exchanges), self.config, note)

    def _data(self, exchanges: Sequence[ExchangeView]) -> _WindowData:
        if not exchanges:
            return _empty_window_data(self.config)
        return _window_data(exchanges, self._embed, self.config)


def _proposed_threshold(scores: np.ndarray, test: ColumnTest, target: float) -> float | None:
    """The most sensitive threshold whose conformal false-alarm bound meets `target`.

    None when there are too few scores to state the target at all.
    """
    k = math.floor(target * (len(scores) + 1))  # the k-th most drift-like score is the edge
    if k < 1:
        return None
    if test.drifts_below:
        return float(np.nextafter(np.sort(scores)[k - 1], -np.inf))
    return float(np.nextafter(np.sort(scores)[::-1][k - 1], np.inf))


def _crosses(score: float, test: ColumnTest, threshold: float) -> bool:
    return score <= threshold if test.drifts_below else score > threshold


def calibrate(
    reference: Window,
    embed: EmbedFn,
    config: DriftConfig | None = None,
    *,
    current_size: int,
    target_false_alarm: float = 0.01,
    runs: int = 200,
    seed: int = 0,
) -> Calibration:
    """Measure each column's false-alarm rate on A/A splits of `reference`; propose thresholds.

    `current_size` is the monitor's current window. A stated rate needs enough splits:
    at least 1/target - 1 (99 for 1%); more make the proposal steadier. For a target on
    the dataset verdict (any column), give each column target / number of columns.
    """
    config = config or DriftConfig()
    if not 0 < target_false_alarm < 1:
        raise ValueError(f"target_false_alarm must be in (0, 1), got {target_false_alarm}")
    if math.floor(target_false_alarm * (runs + 1)) < 1:
        needed = math.ceil(1 / target_false_alarm) - 1
        raise ValueError(
            f"{runs} A/A runs cannot state a {target_false_alarm:g} false-alarm rate; "
            f"at least {needed} are needed"
        )
    n = len(reference)
    if current_size < config.min_current or n - current_size < config.min_reference:
        raise ValueError(
            f"a reference of {n} exchanges cannot be split into a current window of "
            f"{current_size} (at least {config.min_current}) and a reference of at least "
            f"{config.min_reference}"
        )
    data = _window_data(reference.exchanges, embed, config)
    rng = np.random.default_rng(seed)
    results: list[DriftResult] = []
    for _ in range(runs):
        order = rng.permutation(n)
        results.append(
            _judge(
                reference.adapter,
                data.take(order[current_size:]),
                data.take(order[:current_size]),
                config,
            )
        )
    proposed: dict[Column, float] = {}
    columns = []
    for column in Column:
        if column not in config.tests:
            continue
        test = config.tests[column]
        judged = [r.column(column) for r in results if r.column(column).judged]
        scores = np.array([c.score for c in judged], dtype=float)
        threshold = _proposed_threshold(scores, test, target_false_alarm)
        if threshold is None:
            continue  # judged in too few splits to state the target
        proposed[column] = threshold
        columns.append(
            ColumnCalibration(
                column,
                test.method,
                test.threshold,
                false_alarm_rate=float(np.mean([bool(c.drifted) for c in judged])),
                proposed_threshold=proposed[column],
                runs=len(judged),
            )
        )
    alarms_at_proposed = [
        sum(
            _crosses(c.score, config.tests[c.column], proposed[c.column])
            for c in r.columns
            if c.judged and c.score is not None and c.column in proposed
        )
        >= config.min_drifted_columns
        for r in results
    ]
    return Calibration(
        target_false_alarm=target_false_alarm,
        runs=runs,
        reference_size=n,
        current_size=current_size,
        columns=tuple(columns),
        dataset_false_alarm_rate=float(np.mean([bool(r.drifted) for r in results])),
        proposed_dataset_false_alarm_rate=float(np.mean(alarms_at_proposed)),
    )
