"""What tunewatch's drift verdicts are worth against Evidently's defaults. Prints figures only.

Two measurements in one run (benchmarks print; tests never time, see docs/design.md):

detection  A reference window of REFERENCE prompts, and streams of requests judged every
           CHECK_EVERY requests on the last WINDOW (the current window), as the monitor
           does. No-shift streams draw from the reference's traffic: every drift verdict
           there is a false alarm, counted per check. Shifted streams run WINDOW requests
           of that traffic, then shift; the delay is the number of requests after the
           shift until the first drift verdict (up to MAX_AFTER, else "missed"). Shifts:
             topic   one request in three asks about a topic the reference never saw
                     (graph algorithms);
             format  half the requests come wrapped in a JSON-reply instruction (a
                     client changed its prompt template): longer, more punctuation,
                     same topics.
           Judged by tunewatch (monitor/drift.py's defaults; and its embedding column
           alone, at the default threshold and at the one `calibrate` proposes for a 1%
           A/A rate on this reference), by Evidently's defaults (each column's test as
           Evidently picks it for a reference this size, its default embedding test, and
           DataDriftPreset's dataset rule: half the columns drifted), and by Evidently's
           default embedding test with its threshold calibrated to 1% the same way: the
           comparison at one stated false-alarm rate.
timing     One drift evaluation (reference prepared, then one current window judged) at
           1k/1k and 10k/10k exchanges, for both. Embedding is not in it (each exchange
           is embedded once, when first read); its throughput is printed apart.

The corpus is real English prose that ships inside the virtualenv: sentences from the
docstrings of installed packages, one topic per package family (statistics: statsmodels;
databases: SQLAlchemy; web: Starlette, aiohttp, FastAPI, HTTPX; deep learning: torch.nn
and torch.optim; graph algorithms: NetworkX), framed as requests by a few question
templates shared by every topic, so only the subject tells topics apart. Nothing is
downloaded. The answers are synthetic and do not shift (a sentence of the same topic, a
logprob drawn from one distribution, 2% refusals, 1% empty): the shifts are in prompts.

    .venv/bin/python -m bench.monitor [--threads 2] [--streams 10] [--quiet-checks 300]

Thread counts are explicit (torch for the embedding model, BLAS for the tests): the
cores are shared (docs/design.md). The default run takes about ten minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from evidently.legacy.calculations.stattests import get_stattest
from evidently.legacy.core import ColumnType
from rich.console import Console
from rich.table import Table
from scipy.stats import beta
from sklearn.exceptions import ConvergenceWarning

from monitor.drift import (
    Column,
    ColumnTest,
    DriftConfig,
    DriftDetector,
    DriftResult,
    calibrate,
)
from monitor.embeddings import PromptEmbedder
from monitor.window import ExchangeView, Window

REFERENCE = 1200
WINDOW = 200
CHECK_EVERY = 20
MAX_AFTER = 300
PER_TOPIC = 600  # sentences kept per topic (web has fewer)
TARGET_FALSE_ALARM = 0.01
CALIBRATION_RUNS = 199  # 1% of 200: the proposal sits at the 2nd most drift-like A/A score

SOURCES = {
    "statistics": ("statsmodels",),
    "databases": ("sqlalchemy",),
    "web": ("starlette", "aiohttp", "fastapi", "httpx"),
    "deep learning": ("torch/nn", "torch/optim"),
    "graph algorithms": ("networkx",),
}
REFERENCE_TOPICS = ("statistics", "databases", "web", "deep learning")
NEW_TOPIC = "graph algorithms"
FRAMES = (
    "{}",
    "Explain this: {}",
    "Can you explain what this means? {}",
    "Rewrite more simply: {}",
    "Is this statement accurate? {}",
    "Give me an example for this: {}",
    "Summarize in one sentence: {}",
    "What does this mean in practice? {}",
)
JSON_FORMAT = 'Reply only with JSON of the form {{"answer": "...", "confidence": 0.0}}. Input: {}'
REFUSAL = "I'm sorry, but I can't help with that."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_DOC_SECTIONS = re.compile(
    r"\n\s*(Parameters|Returns|Examples?|Notes|See Also|References|Args|Raises|Attributes)\s*\n"
)
_CODE_MARKS = (">>>", "::", "`", "http", "{", "}", "|", "=", "->", "_")


def _package_dir(spec: str) -> Path | None:
    top, _, below = spec.partition("/")
    found = importlib.util.find_spec(top)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / below


def _prose(docstring: str) -> Iterator[str]:
    """The plain-English sentences of a docstring's description (no code, no parameter lists)."""
    description = _DOC_SECTIONS.split(docstring)[0]
    for sentence in _SENTENCE_END.split(" ".join(description.split())):
        words = sentence.split()
        if not 8 <= len(words) <= 40 or not sentence[0].isupper():
            continue
        if any(mark in sentence for mark in _CODE_MARKS):
            continue
        if sum(c.isalpha() or c == " " for c in sentence) / len(sentence) >= 0.93:
            yield sentence


def topic_sentences(specs: Sequence[str]) -> list[str]:
    sentences: set[str] = set()
    for spec in specs:
        root = _package_dir(spec)
        if root is None:
            continue
        for path in sorted(root.rglob("*.py")):
            if "tests" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(errors="ignore"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        sentences.update(_prose(docstring))
    return sorted(sentences)


@dataclass(frozen=True)
class Corpus:
    """Prompts by topic, their answers' material, and every prompt's vector."""

    prompts: dict[str, list[str]]  # topic -> prompts
    sentences: dict[str, list[str]]  # topic -> sentences, for answers
    vectors: dict[str, np.ndarray]  # prompt -> unit vector

    def embed(self, exchanges: Sequence[ExchangeView]) -> np.ndarray:
        """Look-up by prompt text: the stream's exchange ids are new, its prompts are not."""
        return np.stack([self.vectors[e.prompt] for e in exchanges])


def build_corpus(embedder: PromptEmbedder, seed: int) -> tuple[Corpus, float]:
    rng = np.random.default_rng(seed)
    prompts, sentences = {}, {}
    for topic, specs in SOURCES.items():
        found = topic_sentences(specs)
        keep = PER_TOPIC if topic in REFERENCE_TOPICS else PER_TOPIC // 2  # a third of a stream
        chosen = [found[i] for i in rng.permutation(len(found))[:keep]]
        sentences[topic] = chosen
        prompts[topic] = [FRAMES[rng.integers(len(FRAMES))].format(s) for s in chosen]
    formatted = [JSON_FORMAT.format(p) for topic in REFERENCE_TOPICS for p in prompts[topic][::8]]
    prompts["json format"] = formatted
    texts = sorted({p for group in prompts.values() for p in group})
    started = time.perf_counter()
    vectors = embedder.embed_texts(texts)
    rate = len(texts) / (time.perf_counter() - started)
    return Corpus(prompts, sentences, dict(zip(texts, vectors, strict=True))), rate


class Traffic:
    """Exchanges with synthetic answers drawn around given prompts (seeded)."""

    def __init__(self, corpus: Corpus, seed: int) -> None:
        self.corpus = corpus
        self.rng = np.random.default_rng(seed)
        self.made = 0

    def exchange(self, prompt: str, topic: str) -> ExchangeView:
        rng = self.rng
        draw = rng.random()
        if draw < 0.02:
            answer = REFUSAL
        elif draw < 0.03:
            answer = ""
        else:
            answers = self.corpus.sentences[topic]
            answer = answers[rng.integers(len(answers))]
        self.made += 1
        return ExchangeView(
            id=f"x{id(self)}-{self.made}",
            created_at=datetime(2026, 11, 1, tzinfo=UTC),
            adapter="bench",
            route="primary",
            prompt=prompt,
            response=answer,
            completion_tokens=len(answer.split()),
            mean_logprob=float(rng.normal(-0.9, 0.25)),
            latency_seconds=0.3,
            status="ok",
        )


def split_reference(
    corpus: Corpus, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Reference traffic as (prompt, topic): REFERENCE for the window, the rest for streams."""
    pairs = [(p, t) for t in REFERENCE_TOPICS for p in corpus.prompts[t]]
    order = np.random.default_rng(seed).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    return shuffled[:REFERENCE], shuffled[REFERENCE:]


@dataclass(frozen=True)
class Judge:
    """One way of judging windows, and how to read its verdict off a drift result."""

    name: str
    config: DriftConfig
    verdicts: dict[str, Callable[[DriftResult], bool]]  # a row of the table, read off a result


def evidently_defaults(reference_size: int) -> DriftConfig:
    """Evidently's own choice of test and threshold per column, for a reference this size.

    Evidently picks a column's test from the reference's size and the column's distinct
    values (`get_stattest` with no method); asked here with stand-in columns of that size
    (a 0/1 column for the flags).
    Its embedding default, `model(bootstrap=rows < 1000)` in EmbeddingsDriftMetric, is
    the domain classifier with AUC > 0.55 from 1,000 rows on: that is our "model" at
    0.55, so REFERENCE must be at least 1,000. DataDriftPreset's dataset rule is a
    drifted share of at least 0.5.
    """
    assert reference_size >= 1000, "Evidently's embedding default bootstraps below 1,000 rows"
    numbers = pd.Series(np.arange(reference_size, dtype=float))
    flags = numbers % 2  # a 0/1 column, as tunewatch's flags are
    text = pd.Series(["text"] * reference_size)
    tests = {}
    for column in Column:
        if column is Column.PROMPT_EMBEDDING:
            tests[column] = ColumnTest("model", 0.55)
            continue
        kind, stand_in = ColumnType.Numerical, numbers
        if column is Column.PROMPT_TEXT:
            kind, stand_in = ColumnType.Text, text
        elif column in (Column.RESPONSE_EMPTY, Column.RESPONSE_REFUSAL):
            stand_in = flags
        stattest = get_stattest(stand_in, stand_in, kind, None)
        tests[column] = ColumnTest(stattest.name, stattest.default_threshold)
    return DriftConfig(tests=tests, min_drifted_columns=math.ceil(0.5 * len(tests)))


def embedding_row(threshold: float) -> Callable[[DriftResult], bool]:
    return lambda r: r.column(Column.PROMPT_EMBEDDING).score > threshold


def calibrated_embedding_threshold(reference: Window, corpus: Corpus, config: DriftConfig) -> float:
    """The embedding threshold `calibrate` proposes for TARGET_FALSE_ALARM on `reference`."""
    only_embedding = replace(
        config, tests={Column.PROMPT_EMBEDDING: config.tests[Column.PROMPT_EMBEDDING]}
    )
    calibration = calibrate(
        reference,
        corpus.embed,
        only_embedding,
        current_size=WINDOW,
        target_false_alarm=TARGET_FALSE_ALARM,
        runs=CALIBRATION_RUNS,
    )
    return calibration.columns[0].proposed_threshold


def judges(reference: Window, corpus: Corpus, threads: int) -> tuple[list[Judge], float]:
    """tunewatch's defaults and Evidently's, and each embedding test calibrated to 1%."""
    ours = DriftConfig(threads=threads)
    evidently = replace(evidently_defaults(len(reference)), threads=threads)
    started = time.perf_counter()
    mmd = calibrated_embedding_threshold(reference, corpus, ours)
    auc = calibrated_embedding_threshold(reference, corpus, evidently)
    calibrate_seconds = time.perf_counter() - started
    default_mmd = ours.tests[Column.PROMPT_EMBEDDING].threshold
    classifier = replace(ours, tests={Column.PROMPT_EMBEDDING: ColumnTest("model", auc)})
    return [
        Judge(
            "tunewatch",
            ours,
            {
                "tunewatch: dataset verdict (defaults)": lambda r: bool(r.drifted),
                f"tunewatch: embedding, MMD > {default_mmd:.5f} (default)": embedding_row(
                    default_mmd
                ),
                f"tunewatch: embedding, MMD > {mmd:.5f} (calibrated to 1%)": embedding_row(mmd),
            },
        ),
        Judge(
            "evidently",
            evidently,
            {
                "Evidently defaults: dataset verdict (share >= 0.5)": lambda r: bool(r.drifted),
                "Evidently defaults: embedding, classifier AUC > 0.55": lambda r: bool(
                    r.column(Column.PROMPT_EMBEDDING).drifted
                ),
            },
        ),
        Judge(
            "classifier",
            classifier,
            {
                f"Evidently's classifier, AUC > {auc:.3f} (calibrated to 1%)": lambda r: bool(
                    r.drifted
                ),
            },
        ),
    ], calibrate_seconds


def stream(
    traffic: Traffic,
    pool: list[tuple[str, str]],
    shift: str | None,
    length: int,
    rng: np.random.Generator,
) -> list[ExchangeView]:
    """WINDOW requests of reference traffic, then `length - WINDOW` under `shift`."""
    order = rng.permutation(len(pool))
    corpus = traffic.corpus
    exchanges = []
    for t in range(length):
        prompt, topic = pool[order[t % len(pool)]]
        if t >= WINDOW and shift == "topic" and rng.random() < 1 / 3:
            new = corpus.prompts[NEW_TOPIC]
            prompt, topic = new[rng.integers(len(new))], NEW_TOPIC
        elif t >= WINDOW and shift == "format" and rng.random() < 1 / 2:
            formatted = corpus.prompts["json format"]
            prompt = formatted[rng.integers(len(formatted))]
        exchanges.append(traffic.exchange(prompt, topic))
    return exchanges


def checks(exchanges: list[ExchangeView], start: int) -> Iterator[tuple[int, Window]]:
    """(requests since `start`, the current window) at every check from `start` on."""
    for end in range(start + CHECK_EVERY, len(exchanges) + 1, CHECK_EVERY):
        yield end - start, Window("bench", tuple(exchanges[end - WINDOW : end]))


def upper_bound(alarms: int, trials: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a rate seen as alarms/trials."""
    return 1.0 if alarms >= trials else float(beta.ppf(0.95, alarms + 1, trials - alarms))


def detection(args: argparse.Namespace, corpus: Corpus, console: Console) -> None:
    reference_pairs, pool = split_reference(corpus, seed=0)
    traffic = Traffic(corpus, seed=1)
    reference = Window("bench", tuple(traffic.exchange(p, t) for p, t in reference_pairs))
    all_judges, calibrate_seconds = judges(reference, corpus, args.threads)
    detectors = {j.name: DriftDetector(reference, corpus.embed, j.config) for j in all_judges}
    rows = [row for j in all_judges for row in j.verdicts]
    console.print(
        f"reference {REFERENCE} prompts ({', '.join(REFERENCE_TOPICS)}), window {WINDOW}, "
        f"a check every {CHECK_EVERY} requests; calibrate() on the reference (embedding "
        f"column, {CALIBRATION_RUNS} A/A splits, twice): {calibrate_seconds:.0f} s"
    )

    alarms = dict.fromkeys(rows, 0)
    quiet_checks = 0
    rng = np.random.default_rng(2)
    per_stream = (len(pool) - WINDOW) // CHECK_EVERY  # no prompt twice in a stream
    for _ in range(math.ceil(args.quiet_checks / per_stream)):
        exchanges = stream(traffic, pool, None, WINDOW + per_stream * CHECK_EVERY, rng)
        for _, current in checks(exchanges, WINDOW - CHECK_EVERY):
            quiet_checks += 1
            for judge in all_judges:
                result = detectors[judge.name].check(current)
                for row, verdict in judge.verdicts.items():
                    alarms[row] += verdict(result)

    delays: dict[tuple[str, str], list[int | None]] = {}
    for shift in ("topic", "format"):
        for s in range(args.streams):
            exchanges = stream(
                traffic, pool, shift, WINDOW + MAX_AFTER, np.random.default_rng(100 + s)
            )
            first: dict[str, int | None] = dict.fromkeys(rows)
            for after, current in checks(exchanges, WINDOW):
                for judge in all_judges:
                    pending = [row for row in judge.verdicts if first[row] is None]
                    if not pending:
                        continue
                    result = detectors[judge.name].check(current)
                    for row in pending:
                        if judge.verdicts[row](result):
                            first[row] = after
                if all(v is not None for v in first.values()):
                    break
            for row in rows:
                delays.setdefault((row, shift), []).append(first[row])

    table = Table(
        title=f"Drift detection: {args.streams} shifted streams per kind, "
        f"{quiet_checks} no-shift checks"
    )
    table.add_column("judge")
    table.add_column("false alarms / check\n(95% upper bound)", justify="right")
    for shift in ("topic", "format"):
        table.add_column(f"{shift}: caught\n<=200 / <={MAX_AFTER}", justify="right")
        table.add_column(f"{shift}: delay\nmedian (max)", justify="right")
    for row in rows:
        cells = [
            row,
            f"{alarms[row] / quiet_checks:.1%} ({upper_bound(alarms[row], quiet_checks):.1%})",
        ]
        for shift in ("topic", "format"):
            found = [d for d in delays[(row, shift)] if d is not None]
            within = sum(d <= 200 for d in found)
            cells.append(f"{within}/{args.streams} / {len(found)}/{args.streams}")
            cells.append(f"{np.median(found):.0f} ({max(found)})" if found else "missed")
        table.add_row(*cells)
    console.print(table)


def timing(args: argparse.Namespace, corpus: Corpus, console: Console) -> None:
    reference_pairs, pool = split_reference(corpus, seed=0)
    everything = reference_pairs + pool
    table = Table(title="Drift evaluation time (s): reference prepared, then one window judged")
    table.add_column("reference / current")
    for name in ("tunewatch", "Evidently defaults"):
        table.add_column(f"{name}: prepare", justify="right")
        table.add_column(f"{name}: check", justify="right")
    for size in (1_000, 10_000):
        traffic = Traffic(corpus, seed=size)
        rng = np.random.default_rng(size)
        draw = rng.integers(len(everything), size=2 * size)  # repeats prompts past the corpus
        exchanges = [traffic.exchange(*everything[i]) for i in draw]
        reference = Window("bench", tuple(exchanges[:size]))
        current = Window("bench", tuple(exchanges[size:]))
        evidently = evidently_defaults(size)
        cells = [f"{size:,} / {size:,}"]
        for config in (DriftConfig(threads=args.threads), replace(evidently, threads=args.threads)):
            started = time.perf_counter()
            detector = DriftDetector(reference, corpus.embed, config)
            prepared = time.perf_counter()
            detector.check(current)
            cells += [f"{prepared - started:.2f}", f"{time.perf_counter() - prepared:.2f}"]
        table.add_row(*cells)
    console.print(table)
    console.print(
        "tunewatch's MMD samples each window down to "
        f"{DriftConfig().embedding_rows:,} rows; Evidently's defaults at 10k are Wasserstein, "
        "the unbootstrapped text classifier and Jensen-Shannon, at 1k KS, the bootstrapped "
        "text classifier and the z test."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads")
    parser.add_argument("--streams", type=int, default=10, help="shifted streams per kind")
    parser.add_argument("--quiet-checks", type=int, default=300, help="no-shift checks")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # Evidently's max_iter=50
    warnings.filterwarnings("ignore", message="ks_2samp: Exact calculation unsuccessful")
    console = Console(width=150)

    started = time.perf_counter()
    embedder = PromptEmbedder(threads=args.threads)
    corpus, rate = build_corpus(embedder, seed=0)
    sizes = ", ".join(f"{topic} {len(p)}" for topic, p in corpus.prompts.items())
    console.print(
        f"corpus: {sizes} prompts; all-MiniLM-L6-v2 on {embedder.threads} threads: "
        f"{rate:.0f} prompts/s; ready in {time.perf_counter() - started:.0f} s"
    )
    detection(args, corpus, console)
    if not args.skip_timing:
        timing(args, corpus, console)
    console.print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
