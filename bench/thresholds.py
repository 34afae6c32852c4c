"""Thresholds fitted on the reference against the shipped ones: the false-alarm rate each
states, and the rate seen on held-out no-shift windows. Prints figures only.

For each reference size and window size, REFERENCES references are drawn from the traffic
of bench/monitor.py's corpus (real prose from installed packages' docstrings, framed as
requests; one traffic, no shift); the monitor's fit (monitor/thresholds.py: A/A splits,
a conformal bound per column at target / columns) runs on each, and CHECKS held-out
windows of the same traffic, never in the reference, are judged at the fitted and at the
shipped thresholds. Every dataset drift verdict there is a false alarm. The fit's own
cost is timed. A reference no larger than its window cannot be split, and says so.

    .venv/bin/python -m bench.thresholds [--references 3] [--checks 60] [--target 0.01]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.exceptions import ConvergenceWarning

from bench.monitor import REFERENCE_TOPICS, Traffic, build_corpus, upper_bound
from monitor.drift import DriftConfig, DriftDetector
from monitor.embeddings import PromptEmbedder
from monitor.thresholds import FittingConfig, fit_thresholds, judging_config
from monitor.window import Window

SIZES = ((200, 100), (200, 200), (1000, 100), (1000, 200))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--references", type=int, default=1, help="references per size")
    parser.add_argument("--checks", type=int, default=20, help="held-out windows per reference")
    parser.add_argument("--target", type=float, default=0.01, help="dataset false alarms")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # Evidently's max_iter=50
    warnings.filterwarnings("ignore", message="ks_2samp: Exact calculation unsuccessful")
    console = Console(width=150)
    corpus, _ = build_corpus(PromptEmbedder(threads=args.threads), seed=0)
    pool = [(p, t) for t in REFERENCE_TOPICS for p in corpus.prompts[t]]
    shipped = DriftConfig(threads=args.threads)
    fitting = FittingConfig(
        target_false_alarm=args.target, runs=math.ceil(len(shipped.tests) / args.target) - 1
    )
    table = Table(
        title=f"dataset false alarms on held-out no-shift windows (stated: {args.target:.1%}; "
        f"{fitting.runs} A/A splits; {args.references} reference(s) x {args.checks} windows)"
    )
    for column in ("reference", "window", "fitted", "(95% bound)", "shipped", "fit time"):
        table.add_column(column, justify="right")
    for reference_size, window in SIZES:
        alarms = {"fitted": 0, "shipped": 0}
        fit_s: list[float] = []
        refused = None
        for r in range(args.references):
            rng = np.random.default_rng(1000 + r)
            order = rng.permutation(len(pool))
            traffic = Traffic(corpus, seed=r)
            reference = Window(
                "bench",
                tuple(traffic.exchange(*pool[i]) for i in order[:reference_size]),
            )
            held_out = order[reference_size:]
            started = time.perf_counter()
            try:
                calibration = fit_thresholds(reference, corpus.embed, shipped, fitting, window)
            except ValueError as exc:
                refused = str(exc)
                break
            fit_s.append(time.perf_counter() - started)
            judges = {
                "fitted": DriftDetector(
                    reference, corpus.embed, judging_config(shipped, calibration)
                ),
                "shipped": DriftDetector(reference, corpus.embed, shipped),
            }
            for _ in range(args.checks):
                picked = rng.choice(held_out, window, replace=False)
                current = Window("bench", tuple(traffic.exchange(*pool[i]) for i in picked))
                for name, detector in judges.items():
                    alarms[name] += bool(detector.check(current).drifted)
        if refused is not None:
            table.add_row(str(reference_size), str(window), f"not fitted: {refused}", "", "", "")
            continue
        trials = args.references * args.checks
        table.add_row(
            str(reference_size),
            str(window),
            f"{alarms['fitted']}/{trials} ({alarms['fitted'] / trials:.1%})",
            f"{upper_bound(alarms['fitted'], trials):.1%}",
            f"{alarms['shipped']}/{trials} ({alarms['shipped'] / trials:.1%})",
            f"{np.mean(fit_s):.0f} s",
        )
        console.print(f"reference {reference_size}, window {window}: done")
    console.print(table)


if __name__ == "__main__":
    main()
