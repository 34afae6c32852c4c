"""The closed loop's time on this machine: `tunewatch demo`'s run, timed from the drift's
onset (the switch to task B) to each of its steps. Prints figures only.

    .venv/bin/python -m bench.loop [--state-dir /tmp/tunewatch-loop] [--rate 1.0]

Printed: seconds from the onset to drift flagged (the first drift verdict after it), retrain
decided (the job queued), training started and ended, candidate registered, rollout started,
and promoted or rolled back; the held-out task-B exact match and chrF before and after; and
how many replayed requests failed. The target: onset to promoted within 15 minutes on 2
CPU cores, with no request failing.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunewatch.demo.run import DemoPlan, DemoResult, run_demo, write

STEPS = (
    ("drift flagged", "drift.verdict", "drift:"),
    ("retrain decided", "retrain.queued", ""),
    ("training started", "retrain.started", ""),
    ("training ended", "retrain.succeeded", ""),
    ("candidate registered", "adapter.registered", ""),
    ("rollout started", "rollout.started", ""),
    ("promoted", "rollout.promoted", ""),
    ("rolled back", "rollout.rolled_back", ""),
)


def timeline(result: DemoResult) -> list[tuple[str, float | None]]:
    """Each step's first time after the onset, in seconds from it (None: it never came)."""
    after = [m for m in result.milestones if m.since_shift_s is not None]
    found = []
    for label, kind, starts in STEPS:
        hit = next((m for m in after if m.kind == kind and m.reason.startswith(starts)), None)
        found.append((label, None if hit is None else hit.since_shift_s))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/tunewatch-loop"))
    parser.add_argument("--rate", type=float, default=1.0, help="requests a second")
    parser.add_argument("--time-limit", type=float, default=2700.0)
    args = parser.parse_args()
    console = Console(stderr=True)
    plan = DemoPlan(rate=args.rate, time_limit_s=args.time_limit)
    result = asyncio.run(run_demo(args.state_dir.resolve(), plan, console))
    write(result, args.state_dir)
    table = Table(title=f"the loop from the onset of drift ({result.outcome})")
    table.add_column("step")
    table.add_column("seconds after the onset", justify="right")
    for label, seconds in timeline(result):
        table.add_row(label, "-" if seconds is None else f"{seconds:.0f}")
    Console().print(table)
    failed = sum(not a["ok"] for a in result.answers)
    after = result.after
    Console().print(
        f"held-out task B: exact match {result.before.exact_match:.0%} -> "
        + (
            f"{after.exact_match:.0%}, chrF {result.before.chrf:.2f} -> {after.chrf:.2f}"
            if after
            else "-"
        )
        + f"; {failed} of {len(result.answers)} replayed requests failed"
    )


if __name__ == "__main__":
    main()
