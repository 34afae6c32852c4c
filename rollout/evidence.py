"""A rollout's evidence from the store: what its guards judge at each look, and what its
report shows of the quality pairs. One reading for both, so the report shows what was judged.

All of it since the rollout started (the guards' confidence sequences are valid over every
look only on the whole stream), up to `until` (the report of a finished rollout):
- quality, paired on the same prompts: a shadow replay against the primary answer it
  mirrored, where that exchange got a reference (feedback); and golden runs, the candidate's
  answer against the primary's to the same golden prompt (a golden run of both is started
  when the rollout starts). Scores per answer from monitor.quality (the rollout's metric, in
  [0, 1]). The primary's requests stay mirrored to the candidate through the canary steps,
  so this evidence keeps growing until promotion. Unpaired live canary answers are not
  compared: different users ask different questions.
- latency and errors: the candidate's shadow and canary answers against the primary's.
- agreement: chrF between the candidate's shadow answer and the primary's, reported (and
  exported) as a figure, never judged: a better adapter disagrees too; likewise scipy's
  one-shot paired test of the quality pairs (Wilcoxon signed-rank, or exact McNemar for
  exact match), whose p-value holds at one planned look, not at every look.

The runner looks every few seconds, and a rollout on a GPU gathers tens of thousands of
exchanges: `RolloutEvidence` reads the whole rollout once and then, at each `update`, only
what the store wrote since (exchanges by `recorded_at`, feedback by its `created_at`), and
scores each pair once (again only when its reference changes). What it keeps is what the
guards take (each answer's latency and error, each pair's scores), in the order a full
reading returns them, so that it hands the guards the very lists `gather` (one full
reading, for the report and after a restart) would. What arrives late is taken when it
arrives: a shadow replay read after its primary is paired with it, a reference posted after
the exchange rescores its pairs, and a row written by a slower writer is still read, since each
reading starts `SETTLE_S` before the previous one began (rows it already holds are skipped).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from monitor.quality import AnswerMetric, answer_score, normalise
from monitor.signals import mean, percentiles
from monitor.traffic import exchanges_by_id, exchanges_since, feedback_since, recorded_since
from monitor.window import ExchangeView
from rollout.guards.paired import paired_test
from rollout.guards.types import Evidence
from rollout.machine import RolloutState
from rollout.repository import RolloutRecord
from serving.exchange import BASE_LABEL
from store import Store
from store.rollouts import Rollout

Score = Callable[[str, str], float]  # (answer, reference) -> [0, 1]

CANDIDATE_ROUTES = ("shadow", "canary", "golden")
PRIMARY_ROUTES = ("primary", "golden")
# How far a row's write stamp may lag behind the moment it became visible: a SQLite writer
# stamps its rows before it waits for the lock (busy_timeout 5 s, three attempts), a
# PostgreSQL transaction commits after it stamped, and several gateways' clocks differ.
SETTLE_S = 30.0

Key = tuple[datetime, str]  # (created_at, id): the order a full reading returns exchanges in
T = TypeVar("T")


@dataclass(frozen=True)
class Gathered:
    evidence: Evidence
    stage_samples: int  # candidate answers in the present stage: shadow replays or canary
    live_rate: float  # live answers (primary and canary) a second since the rollout started
    figures: dict[str, Any]  # JSON-ready, for the look's record


def gather(
    store: Store,
    rollout: RolloutRecord,
    metric: AnswerMetric,
    score: Score,
    until: datetime | None = None,
) -> Gathered:
    """The rollout's evidence from the store, read whole (see the module doc)."""
    evidence = RolloutEvidence(rollout.row, metric, score, until=until)
    evidence.update(store)
    return evidence.gathered(rollout.state)


class _Ordered(Generic[T]):
    """Values in the order of their keys, whatever order they come in (nearly always last)."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.values: list[T] = []

    def put(self, key: Key, value: T) -> None:
        """Add the value, or replace the one the key has."""
        if not self.keys or key > self.keys[-1]:
            self.keys.append(key)
            self.values.append(value)
            return
        at = bisect_left(self.keys, key)
        if at < len(self.keys) and self.keys[at] == key:
            self.values[at] = value
        else:
            self.keys.insert(at, key)
            self.values.insert(at, value)

    def __contains__(self, key: Key) -> bool:
        at = bisect_left(self.keys, key)
        return at < len(self.keys) and self.keys[at] == key

    def count_from(self, start: datetime) -> int:
        """How many keys are at or after `start`."""
        return len(self.keys) - bisect_left(self.keys, (start,))


class _Answers:
    """One side's live answers: every one's error, the answered ones' latencies."""

    def __init__(self) -> None:
        self.errors = _Ordered[float]()
        self.latency = _Ordered[float]()

    def take(self, e: ExchangeView) -> None:
        key = _key(e)
        self.errors.put(key, float(not e.ok))
        if e.ok:
            self.latency.put(key, e.latency_seconds)


@dataclass(frozen=True)
class _Shadow:
    """A shadow replay paired with its primary."""

    key: Key
    id: str
    ok: bool


@dataclass
class _Parent:
    """A primary exchange that was mirrored: its reference scores its shadows' pairs."""

    ok: bool
    reference: str | None
    shadows: list[_Shadow]


class RolloutEvidence:
    """One rollout's evidence, read whole once and then kept up to date look by look."""

    def __init__(
        self,
        row: Rollout,
        metric: AnswerMetric,
        score: Score,
        *,
        until: datetime | None = None,
    ) -> None:
        self.rollout_id = row.id
        self.candidate, self.primary = row.candidate, row.baseline or BASE_LABEL
        self.since, self.until = row.created_at, until
        self.metric, self.score = metric, score
        self._read_from: datetime | None = None  # None: nothing read yet
        self._feedback_seen: dict[int, datetime] = {}  # within the settle margin
        self._served = _Answers()  # the candidate's shadow and canary answers
        self._answered = _Answers()  # the primary's
        self._stage = {"shadow": _Ordered[None](), "canary": _Ordered[None]()}
        self._goldens: dict[str, ExchangeView] = {}  # both adapters' golden runs
        self._golden_scores: dict[tuple[str, str], float] = {}  # matched again at each look
        self._parents: dict[str, _Parent] = {}
        self._pairs = _Ordered[tuple[float, float]]()  # by shadow: (candidate, primary)
        self._agreement = _Ordered[float]()  # by shadow
        self._mirrored = 0

    def update(self, store: Store) -> None:
        """Read and score what the store wrote since the last update (all of it, the first)."""
        started = datetime.now(UTC)
        if self._read_from is None:
            posted: set[str] = set()
            primary = exchanges_since(
                store, self.primary, self.since, PRIMARY_ROUTES, until=self.until
            )
            candidate = exchanges_since(
                store, self.candidate, self.since, CANDIDATE_ROUTES, until=self.until
            )
        else:  # feedback first: an exchange read after it holds every reference it has
            posted = self._new_feedback(store, self._read_from)
            primary = self._new_exchanges(store, self.primary, PRIMARY_ROUTES, self._answered)
            candidate = self._new_exchanges(store, self.candidate, CANDIDATE_ROUTES, self._served)
        self._read_from = started - timedelta(seconds=SETTLE_S)
        # Only what was held before: what is read now is read with its references.
        relabelled = {i for i in posted if i in self._parents or i in self._goldens}
        # A shutdown's interruptions say nothing about either adapter.
        for e in primary:
            if e.route == "golden":
                self._goldens[e.id] = e
            elif not e.interrupted:
                self._answered.take(e)
        shadows = []
        for e in candidate:
            if e.route == "golden":
                self._goldens[e.id] = e
                continue
            if e.interrupted:
                continue
            self._served.take(e)
            self._stage[e.route].put(_key(e), None)
            if e.route == "shadow" and e.parent_id is not None:
                shadows.append(e)
        self._pair(store, shadows, {e.id: e for e in primary})
        self._relabel(store, relabelled)

    def gathered(self, state: RolloutState) -> Gathered:
        """The evidence so far, for a look at the rollout in this state."""
        goldens = sorted(self._goldens.values(), key=_key)
        pairs = self._pairs.values + _golden_pairs(
            [e for e in goldens if e.adapter == self.candidate],
            [e for e in goldens if e.adapter == self.primary],
            self._golden_score,
        )
        quality_candidate, quality_primary = [c for c, _ in pairs], [p for _, p in pairs]
        latency_candidate = list(self._served.latency.values)
        latency_primary = list(self._answered.latency.values)
        evidence = Evidence(
            quality_candidate=quality_candidate,
            quality_primary=quality_primary,
            paired_quality=True,
            quality_metric=self.metric,
            latency_candidate=latency_candidate,
            latency_primary=latency_primary,
            errors_candidate=list(self._served.errors.values),
            errors_primary=list(self._answered.errors.values),
        )
        route = "shadow" if state.stage == "shadow" else "canary"
        stage_samples = self._stage[route].count_from(state.stage_started_at)
        live_rate = self._live_rate()
        binary = self.metric == "exact_match"
        paired = paired_test(quality_candidate, quality_primary, binary=binary)
        figures = {
            "metric": self.metric,
            "paired_test": {
                "test": paired.test,
                "p_value": paired.p_value,
                "reason": paired.reason,
            },
            "quality_pairs": len(pairs),
            "quality_candidate": mean(quality_candidate),
            "quality_primary": mean(quality_primary),
            "shadow_pairs": self._mirrored,
            "agreement": mean(self._agreement.values),
            "latency_p95_candidate": percentiles(latency_candidate, (95,))[0],
            "latency_p95_primary": percentiles(latency_primary, (95,))[0],
            "candidate_answers": len(self._served.errors.values),
            "primary_answers": len(self._answered.errors.values),
            "live_rate": live_rate,
        }
        return Gathered(evidence, stage_samples, live_rate, figures)

    def _live_rate(self) -> float:
        """Live answers (primary and canary) a second, from the rollout's start to the newest
        one: what the store holds, so a look read whole and one kept up to date agree."""
        keys = [k for k in (self._answered.errors.keys, self._stage["canary"].keys) if k]
        if not keys:
            return 0.0
        elapsed = (max(k[-1][0] for k in keys) - self.since).total_seconds()
        live = len(self._answered.errors.keys) + len(self._stage["canary"].keys)
        return live / elapsed if elapsed > 0 else 0.0

    # reading what is new

    def _new_feedback(self, store: Store, posted_from: datetime) -> set[str]:
        """The exchanges that got feedback not taken yet."""
        self._feedback_seen = {i: at for i, at in self._feedback_seen.items() if at >= posted_from}
        exchanges = set()
        for feedback_id, exchange_id, at in feedback_since(store, posted_from):
            if feedback_id not in self._feedback_seen:
                self._feedback_seen[feedback_id] = at
                exchanges.add(exchange_id)
        return exchanges

    def _new_exchanges(
        self, store: Store, adapter: str, routes: Collection[str], answers: _Answers
    ) -> list[ExchangeView]:
        assert self._read_from is not None
        rows = recorded_since(
            store, adapter, routes, self._read_from, since=self.since, until=self.until
        )
        held = self._goldens.keys()
        new = [
            i
            for i, created_at, route in rows
            if not (i in held if route == "golden" else (created_at, i) in answers.errors)
        ]
        return exchanges_by_id(store, new) if new else []

    def _fetch(self, store: Store, ids: Collection[str]) -> dict[str, ExchangeView]:
        return {e.id: e for e in exchanges_by_id(store, ids)} if ids else {}

    # pairing

    def _pair(
        self, store: Store, shadows: list[ExchangeView], arrived: dict[str, ExchangeView]
    ) -> None:
        """Pair new shadow replays with their primaries: read now, or before (fetched again;
        the store's foreign key writes a shadow replay after its primary)."""
        wanted = {s.parent_id for s in shadows if s.parent_id not in arrived}
        views = {**arrived, **self._fetch(store, wanted)}
        for s in shadows:
            parent = views.get(s.parent_id or "")
            if parent is not None and self._in_primary(parent):
                self._attach(_Shadow(_key(s), s.id, s.ok), s, parent)

    def _in_primary(self, e: ExchangeView) -> bool:
        """Whether the exchange is among the primary's that this rollout reads."""
        return (
            e.adapter == self.primary
            and e.route in PRIMARY_ROUTES
            and e.created_at >= self.since
            and (self.until is None or e.created_at <= self.until)
        )

    def _attach(self, shadow: _Shadow, s: ExchangeView, p: ExchangeView) -> None:
        parent = self._parents.get(p.id)
        if parent is None:
            parent = self._parents[p.id] = _Parent(p.ok, p.reference, [])
        parent.shadows.append(shadow)
        self._mirrored += 1
        if shadow.ok and parent.ok:
            agreement = answer_score(s.response or "", p.response or "", "chrf")
            self._agreement.put(shadow.key, agreement)
            if parent.reference is not None:
                self._pairs.put(shadow.key, self._pair_scores(s, p, parent.reference))

    def _pair_scores(self, s: ExchangeView, p: ExchangeView, reference: str) -> tuple[float, float]:
        return self.score(s.response or "", reference), self.score(p.response or "", reference)

    def _relabel(self, store: Store, ids: set[str]) -> None:
        """Take the newest references of exchanges held, and rescore the pairs they change."""
        views = self._fetch(store, ids)
        changed = []
        for e in views.values():
            if e.id in self._goldens:
                self._goldens[e.id] = e
            parent = self._parents.get(e.id)
            if parent is not None and e.reference != parent.reference:
                parent.reference = e.reference
                changed.append((e, parent))
        answers = self._fetch(store, {s.id for _, p in changed for s in p.shadows if s.ok})
        for e, parent in changed:
            if not parent.ok or parent.reference is None:
                continue
            for shadow in parent.shadows:
                if shadow.ok:
                    scores = self._pair_scores(answers[shadow.id], e, parent.reference)
                    self._pairs.put(shadow.key, scores)

    def _golden_score(self, answer: str, reference: str) -> float:
        key = (answer, reference)
        if key not in self._golden_scores:
            self._golden_scores[key] = self.score(answer, reference)
        return self._golden_scores[key]


def _key(e: ExchangeView) -> Key:
    return (e.created_at, e.id)


def _golden_pairs(
    candidate: list[ExchangeView], primary: list[ExchangeView], score: Score
) -> list[tuple[float, float]]:
    """The two adapters' golden answers to the same prompt, matched in the order asked."""
    asked: dict[str, list[ExchangeView]] = {}
    for e in primary:
        if e.route == "golden" and e.ok and e.reference is not None:
            asked.setdefault(normalise(e.prompt), []).append(e)
    pairs = []
    for e in candidate:
        if e.route == "golden" and e.ok and e.reference is not None:
            waiting = asked.get(normalise(e.prompt))
            if waiting:
                p = waiting.pop(0)
                candidate_score = score(e.response or "", e.reference)
                pairs.append((candidate_score, score(p.response or "", p.reference or "")))
    return pairs
