"""The live view of a replay: progress, the latest answers, and a tally per adapter and route."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunewatch.replay import Outcome

LATEST = 10


@dataclass
class Tally:
    """One adapter's and route's answers."""

    answered: int = 0
    failed: int = 0
    judged: int = 0  # answers with a reference
    exact: int = 0

    def add(self, outcome: Outcome) -> None:
        self.answered += outcome.ok
        self.failed += not outcome.ok
        if outcome.exact_match is not None:
            self.judged += 1
            self.exact += outcome.exact_match


@dataclass
class ReplayView:
    """What `tunewatch replay` shows while it runs; `add` takes each outcome as it comes."""

    total: int
    latest: deque[Outcome] = field(default_factory=lambda: deque(maxlen=LATEST))
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    progress: Progress = field(
        default_factory=lambda: Progress(
            TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
    )

    def __post_init__(self) -> None:
        self._task = self.progress.add_task("replay", total=self.total)

    def add(self, outcome: Outcome) -> None:
        self.latest.append(outcome)
        key = (outcome.adapter or "-", outcome.route or "-")
        self.tallies.setdefault(key, Tally()).add(outcome)
        if outcome.error is not None:
            self.errors[outcome.error.split(":", 1)[0]] += 1
        self.progress.advance(self._task)

    def __rich__(self) -> RenderableType:
        return Group(self.progress, self.latest_table(), self.tally_table())

    def latest_table(self) -> Table:
        table = Table(title="latest answers", expand=True)
        for column in ("line", "adapter", "route", "latency", "exact", "answer"):
            table.add_column(column, no_wrap=column != "answer", overflow="ellipsis")
        for o in self.latest:
            exact = "-" if o.exact_match is None else ("yes" if o.exact_match else "no")
            text = o.answer if o.ok else f"[red]{o.error}[/red]"
            table.add_row(
                str(o.number),
                o.adapter or "-",
                o.route or "-",
                f"{o.latency_s:.2f} s",
                exact + (" +fb" if o.feedback else ""),
                (text or "").replace("\n", " ")[:120],
            )
        return table

    def tally_table(self) -> Table:
        table = Table(title="by adapter and route")
        for column in ("adapter", "route", "answered", "failed", "exact match"):
            table.add_column(column)
        for (adapter, route), tally in sorted(self.tallies.items()):
            share = f"{tally.exact / tally.judged:.0%} of {tally.judged}" if tally.judged else "-"
            table.add_row(adapter, route, str(tally.answered), str(tally.failed), share)
        return table
