"""The cost of one rollout look: the evidence read whole against kept up to date. Prints
figures only.

A rollout in shadow on SQLite with 1k, 10k and 100k exchanges in the store: the primary's
requests, half of them mirrored to the candidate (the default shadow fraction), a tenth
labelled by their users. Between looks comes what a GPU engine answers in one 5 s interval at
20 requests/s: 100 primary answers, 50 shadow replays, 10 references. Timed for each size:

full         `gather`: the whole rollout read and scored, what each look did before (and
             what the report and a restarted daemon do once), then judged by the guards;
full, warm   the same with every score of the earlier looks remembered (the runner kept
             such a cache): reading the rows and scoring the new pairs and every agreement;
incremental  `RolloutEvidence.update` and `gathered` after one interval's new rows, then
             judged: what the runner does now (the median of five looks).
The guards still take every value (numpy, in memory): what is left that grows with the
rollout.

    .venv/bin/python -m bench.rollout_look [--sizes 1000 10000 100000]

About 2 minutes on 2 cores, most of it the full reading of 100k exchanges.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from monitor.quality import answer_score
from rollout.evidence import Gathered, RolloutEvidence, gather
from rollout.guards.sequences import judge
from rollout.repository import RolloutRecord, record_of
from store import Store
from store.exchanges import Feedback
from store.rollouts import Rollout

CANDIDATE = "cand-1"
CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Oslo", "Lisbon", "Vienna", "Prague"]
PER_LOOK = 100  # primary answers in one 5 s interval at 20 requests/s
LOOKS = 5
CHUNK = 5000  # rows per bulk insert


class Traffic:
    """Numbered primary requests, every other one mirrored, every tenth labelled."""

    def __init__(self, start: datetime) -> None:
        self.start, self.sent = start, 0

    def rows(
        self, primaries: int, *, past: bool = False
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The next requests' rows; `past`: written as they came (the store's stamps), not now."""
        exchanges, feedback = [], []
        for n in range(self.sent, self.sent + primaries):
            at = self.start + timedelta(milliseconds=50 * n)
            city = CITIES[n % len(CITIES)]
            latency = 0.2 + (n % 97) / 200
            exchanges.append(_exchange(f"p{n}", at, "base", "primary", latency))
            exchanges[-1]["response"] = f"It is {city}, {n}."
            if n % 2 == 0:
                shadow = _exchange(f"s{n}", at, CANDIDATE, "shadow", latency * 1.1)
                answer = f"The capital is {city} ({n})."
                exchanges.append(shadow | {"parent_id": f"p{n}", "response": answer})
            if n % 10 == 0:
                feedback.append({"exchange_id": f"p{n}", "reference": city, "rating": None})
        self.sent += primaries
        if past:
            for row in exchanges:
                row["recorded_at"] = row["created_at"] + timedelta(seconds=1)
            for row in feedback:
                row["created_at"] = self.start + timedelta(milliseconds=50 * self.sent)
        return exchanges, feedback


def _exchange(
    exchange_id: str, at: datetime, adapter: str, route: str, latency: float
) -> dict[str, Any]:
    return dict(
        id=exchange_id, created_at=at, route=route, adapter=adapter, parent_id=None,
        endpoint="chat.completions", user=None, prompt=f"Capital, question {exchange_id}?",
        request={}, response=None, prompt_tokens=9, completion_tokens=6, ttft_seconds=None,
        latency_seconds=latency, mean_logprob=-0.3, finish_reason="stop", status="ok",
        http_status=200, error=None,
    )  # fmt: skip


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for at in range(0, len(rows), CHUNK):
        yield rows[at : at + CHUNK]


def write(store: Store, exchanges: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
    """Bulk inserts: a shadow replay after its primary, references after their exchanges."""
    for chunk in _chunks(exchanges):
        store.record_exchanges(chunk)
    with store.engine.begin() as connection:
        for chunk in _chunks(feedback):
            connection.execute(insert(Feedback.__table__), chunk)


def start_rollout(store: Store, at: datetime) -> RolloutRecord:
    with store.session() as session:
        row = Rollout(
            candidate=CANDIDATE, baseline=None, stage="shadow", step=-1, created_at=at,
            stage_started_at=at, reason="bench", config={"metric": "chrf"},
        )  # fmt: skip
        session.add(row)
        session.flush()
        return record_of(row)


def cached(metric: str) -> Any:
    scores: dict[tuple[str, str], float] = {}

    def score(answer: str, reference: str) -> float:
        if (answer, reference) not in scores:
            scores[answer, reference] = answer_score(answer, reference, metric)
        return scores[answer, reference]

    return score


def timed(job: Any) -> float:
    started = time.perf_counter()
    job()
    return time.perf_counter() - started


def measure(size: int, scratch: Path) -> tuple[float, float, float, int]:
    store = Store(f"sqlite:///{scratch / f'look-{size}.db'}")
    try:
        primaries = round(size * 2 / 3)  # 2 exchanges per 3 are primaries
        start = datetime.now(UTC) - timedelta(milliseconds=50 * primaries + 60_000)
        rollout = start_rollout(store, start)
        traffic = Traffic(start)
        write(store, *traffic.rows(primaries, past=True))
        stored = store.count_exchanges()
        plain = partial(answer_score, metric="chrf")

        def judged(gathered: Gathered) -> None:
            judge(gathered.evidence, rollout.config.guards)

        full = timed(lambda: judged(gather(store, rollout, "chrf", plain)))
        warm_score = cached("chrf")
        gather(store, rollout, "chrf", warm_score)
        write(store, *traffic.rows(PER_LOOK))
        warm = timed(lambda: judged(gather(store, rollout, "chrf", warm_score)))
        kept = RolloutEvidence(rollout.row, "chrf", plain)
        kept.update(store)

        def look() -> None:
            kept.update(store)
            judged(kept.gathered(rollout.state))

        looks = []
        for _ in range(LOOKS):
            write(store, *traffic.rows(PER_LOOK))
            looks.append(timed(look))
        return full, warm, statistics.median(looks), stored
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    args = parser.parse_args()
    print(f"one look, SQLite, {PER_LOOK} primary answers + {PER_LOOK // 2} shadow replays new")
    header = f"{'exchanges':>10} {'full s':>9} {'full warm s':>12} {'incremental s':>14}"
    print(f"{header} {'full/incr':>10} {'warm/incr':>10}")
    with tempfile.TemporaryDirectory(prefix="bench-look-") as scratch:
        measure(300, Path(scratch))  # the first calls' one-time costs, not counted
        for size in args.sizes:
            full, warm, kept, stored = measure(size, Path(scratch))
            print(
                f"{stored:>10,} {full:>9.3f} {warm:>12.3f} {kept:>14.4f} "
                f"{full / kept:>9.0f}x {warm / kept:>9.0f}x"
            )


if __name__ == "__main__":
    main()
