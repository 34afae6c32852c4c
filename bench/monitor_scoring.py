"""What scoring a window costs: tunewatch's quality + calibration path against the raw library
loops over the same exchanges. Prints figures; asserts nothing.

tunewatch   `quality(window)` (corpus BLEU and chrF, per-exchange ROUGE-1/2/L, exact match,
            the non-Latin check) then `calibration(window, pairs=quality.pairs)` (ECE,
            Brier, reliability table, reusing the ROUGE scores).
raw         sacrebleu's corpus_bleu and corpus_chrf, rouge_score's RougeScorer over every
            pair, and a numpy ECE from exp(mean logprob) and ROUGE-L >= 0.5: the least any
            monitor computing these numbers has to do.

Both run in this one process, on one core, rounds alternating (ABBA) so a machine that
drifts favours neither. Wall time follows whoever else wants the cores; process CPU time
is the steadier figure on a shared machine. Target (issue 3): keep up with 200 exchanges/s
of traffic on one core, i.e. score a window faster than it fills.

    .venv/bin/python -m bench.monitor_scoring [--exchanges N] [--rounds R]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from monitor.calibration import calibration
from monitor.quality import quality
from monitor.window import ExchangeView, Window

TARGET_PER_SECOND = 200

WORDS = (
    "the model answer question user adapter request service data city river country "
    "capital people system time year week day number value result report team customer "
    "order account payment product price market growth energy water light heat power "
    "school student teacher doctor patient hospital museum library book page chapter "
    "train station airport flight ticket hotel room street bridge mountain forest "
    "is was are were has had will can should may must does did makes takes gives shows "
    "finds keeps turns moves runs builds reads writes sends opens closes starts stops "
    "large small new old first last long short high low early late main local public "
    "in on at of for with from by to into over under between after before during "
    "and or but because while although if when where which that this these those"
).split()


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(10, 40))
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def synthetic_window(n: int, seed: int = 0) -> Window:
    """Labelled exchanges: each answer its reference with a random share of words replaced."""
    rng = random.Random(seed)
    exchanges = []
    for i in range(n):
        reference = sentence(rng)
        words = reference.split()
        share = 0.0 if rng.random() < 0.1 else rng.uniform(0.0, 0.7)
        response = " ".join(rng.choice(WORDS) if rng.random() < share else w for w in words)
        conf = min(0.99, max(0.01, 1.0 - share + rng.gauss(0.0, 0.15)))
        exchanges.append(
            ExchangeView(
                id=str(i),
                created_at=datetime(2026, 11, 1, tzinfo=UTC),
                adapter="bench",
                route="primary",
                prompt="q",
                response=response,
                completion_tokens=len(words),
                mean_logprob=math.log(conf),
                latency_seconds=0.5,
                status="ok",
                reference=reference,
            )
        )
    return Window("bench", tuple(exchanges))


def tunewatch_path(window: Window) -> None:
    q = quality(window)
    calibration(window, pairs=q.pairs)


def raw_path(window: Window) -> None:
    hyps = [e.response for e in window.exchanges]
    refs = [e.reference for e in window.exchanges]
    sacrebleu.corpus_bleu(hyps, [refs])
    sacrebleu.corpus_chrf(hyps, [refs])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge_l = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps, strict=True)]
    conf = np.exp([e.mean_logprob for e in window.exchanges])
    correct = np.array([h == r or f >= 0.5 for h, r, f in zip(hyps, refs, rouge_l, strict=True)])
    index = np.minimum((conf * 10).astype(int), 9)
    gaps = np.bincount(index, conf, 10) - np.bincount(index, correct.astype(float), 10)
    np.abs(gaps).sum() / len(conf)


def timed(path: Callable[[Window], None], window: Window) -> tuple[float, float]:
    """Wall and process CPU seconds of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    path(window)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1, help="ABBA blocks (2 runs each)")
    args = parser.parse_args()

    window = synthetic_window(args.exchanges)
    paths = {"tunewatch": tunewatch_path, "raw": raw_path}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    tunewatch_path(synthetic_window(50, seed=1))  # warm-up: imports, tokenizer caches
    for _ in range(args.rounds):
        for name in ("tunewatch", "raw", "raw", "tunewatch"):
            runs[name].append(timed(paths[name], window))

    n = args.exchanges
    print(f"{n} synthetic labelled exchanges (10-40 words), {args.rounds} ABBA block(s)")
    print(f"{'path':<10} {'wall ex/s':>10} {'cpu ex/s':>10}   (median of {len(runs['raw'])} runs)")
    rate = {}
    for name, samples in runs.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        rate[name] = (n / wall, n / cpu)
        print(f"{name:<10} {n / wall:>10.0f} {n / cpu:>10.0f}")
    wall_ratio = rate["tunewatch"][0] / rate["raw"][0]
    cpu_ratio = rate["tunewatch"][1] / rate["raw"][1]
    print(f"tunewatch / raw throughput: wall {wall_ratio:.2f}, cpu {cpu_ratio:.2f}")
    print(
        f"headroom over {TARGET_PER_SECOND} exchanges/s on one core (cpu): "
        f"{rate['tunewatch'][1] / TARGET_PER_SECOND:.1f}x"
    )


if __name__ == "__main__":
    main()
