"""Writes exchanges to the store off the request path, in batches, and loses none to an outage.

A request hands its exchange to `submit` (no I/O) and answers at once; one background
task waits `linger_s` after the first arrival, then commits whatever has queued up in a
single transaction, on a worker thread. Under load that turns hundreds of commits a second
into a few, and a slow disk delays the record, never the client. `flush` waits until
everything submitted so far is handled.

The queue holds at most `queue_max` exchanges. One that finds it full is appended to the
spill file (serving/spill.py) instead, and so is a batch the store still refuses after
three tries because it cannot be reached. While the spill holds rows, new batches join it
behind them (the store then gets every exchange in order), and it is replayed into the
store at start and every `replay_interval_s` until it is empty. `stop` writes what is
queued until its deadline and spills the rest. A batch the store refuses for its rows, not
its connection, is written row by row, so that one bad row loses only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

from sqlalchemy import exc

from serving import metrics
from serving.spill import SpillFile
from store import Store

log = logging.getLogger(__name__)

# The store cannot be reached (refused or lost connection, a locked database, no pooled
# connection free): nothing is wrong with the rows, so they are kept for later.
UNREACHABLE = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


class ExchangeRecorder:
    def __init__(
        self,
        store: Store,
        spill: SpillFile,
        queue_max: int = 10_000,
        max_batch: int = 256,
        linger_s: float = 0.02,
        backoff_s: float = 0.5,  # before the second try; twice that before the third
        replay_interval_s: float = 5.0,
    ) -> None:
        self.store, self.spill, self.max_batch = store, spill, max_batch
        self.linger_s, self.backoff_s, self.replay_interval_s = (
            linger_s,
            backoff_s,
            replay_interval_s,
        )
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self._batch: list[dict[str, Any]] = []  # taken from the queue, not yet handled
        self._replay_due = 0.0  # the loop time of the next replay attempt
        self._overflowing = False
        self._unsynced = False  # spilled on the event loop, without its fsync yet
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="exchange-recorder")

    def submit(self, exchange: dict[str, Any]) -> None:
        """Queue it; a full queue or a stopped recorder spills it instead, here and now."""
        if self._stopped:
            self._spill([exchange], "shutdown")
            return
        try:
            self._queue.put_nowait(exchange)
        except asyncio.QueueFull:
            if not self._overflowing:
                log.warning(
                    "the recorder's queue is full (%d exchanges): spilling to %s",
                    self._queue.maxsize,
                    self.spill.path,
                )
            self._overflowing = self._unsynced = True
            self._spill([exchange], "queue_full", fsync=False)  # synced with the next batch
        metrics.RECORDER_QUEUE_DEPTH.set(self._queue.qsize())

    async def flush(self) -> None:
        await self._queue.join()

    async def stop(self, timeout_s: float) -> None:
        """Write what is queued for up to `timeout_s`, then spill whatever is left, so that
        the recorder stops in bounded time and loses nothing; a later `submit` spills."""
        if timeout_s > 0:
            with contextlib.suppress(TimeoutError):  # then what is left is spilled
                await asyncio.wait_for(self.flush(), timeout_s)
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left, self._batch = self._batch, []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
            self._queue.task_done()
        if left:
            self._spill(left, "shutdown")
        await self._sync()
        metrics.RECORDER_QUEUE_DEPTH.set(0)

    async def _run(self) -> None:
        while True:
            if self.spill.holds_rows():
                await self._replay()
            await self._take_batch()
            await self._sync()
            batch = self._batch
            if not batch:
                continue  # nothing arrived within the replay interval
            try:
                if self.spill.holds_rows():
                    await asyncio.to_thread(self._spill, batch, "behind_spill")
                else:
                    await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
            self._batch = []  # handled (a cancel skips this: `stop` spills the batch)

    async def _take_batch(self) -> None:
        """The next batch, into `_batch` as it is taken, so that `stop` finds every exchange
        a cancel cut short; with a spill to replay, wait no longer than the replay interval."""
        wait = self.replay_interval_s if self.spill.holds_rows() else None
        try:
            first = await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            return
        self._batch = [first]
        # Wait a moment for company: one commit for many exchanges, not one each.
        await asyncio.sleep(self.linger_s)
        while len(self._batch) < self.max_batch and not self._queue.empty():
            self._batch.append(self._queue.get_nowait())
        metrics.RECORDER_QUEUE_DEPTH.set(self._queue.qsize())
        if self._overflowing and self._queue.qsize() < self._queue.maxsize // 2:
            log.info("the recorder's queue has room again")
            self._overflowing = False

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        """Three tries; then row by row if the store refused the rows, else the spill."""
        for attempt in range(3):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                await asyncio.to_thread(self.store.record_exchanges, batch)
                return
            except Exception as error:  # a locked or unreachable database: retry, then say so
                unreachable = isinstance(error, UNREACHABLE)
                log.exception("writing %d exchanges failed (attempt %d)", len(batch), attempt + 1)
        if not unreachable:
            try:
                await asyncio.to_thread(self._write_rows, batch)
                return
            except UNREACHABLE:
                pass  # it went away midway: rows already written are skipped at replay
        await asyncio.to_thread(self._spill, batch, "store_unreachable")

    def _write_rows(self, rows: list[dict[str, Any]]) -> int:
        """One at a time, in order (a shadow after its parent), so that a row the store
        refuses loses only itself; the number written. Raises if the store goes away."""
        dropped = []
        for row in rows:
            try:
                self.store.record_exchanges([row])
            except UNREACHABLE:
                raise
            except Exception:
                log.exception("the store refused exchange %s", row["id"])
                metrics.STORE_WRITE_FAILURES.inc()
                dropped.append(row["id"])
        if dropped:
            log.error("dropped %d of %d exchanges: %s", len(dropped), len(rows), dropped)
        return len(rows) - len(dropped)

    async def _sync(self) -> None:
        if self._unsynced:
            self._unsynced = False
            try:
                await asyncio.to_thread(self.spill.sync)
            except OSError:
                log.exception("could not fsync %s", self.spill.path)

    def _spill(self, rows: list[dict[str, Any]], reason: str, fsync: bool = True) -> None:
        """Append `rows` to the spill file: only a disk that refuses them too loses them."""
        try:
            self.spill.append(rows, fsync)
        except OSError:
            metrics.STORE_WRITE_FAILURES.inc(len(rows))
            ids = [row["id"] for row in rows]
            log.exception(
                "could not spill to %s: lost %d exchanges %s", self.spill.path, len(ids), ids
            )
            return
        metrics.RECORDER_SPILLED.labels(reason).inc(len(rows))
        # A full queue is said once when it fills; a batch behind the spill at debug level,
        # since the outage that started the spill was said already and replays say it again.
        if reason in ("store_unreachable", "shutdown"):
            log.warning("spilled %d exchanges to %s (%s)", len(rows), self.spill.path, reason)
        elif reason == "behind_spill":
            log.debug("spilled %d exchanges behind the spill", len(rows))

    async def _replay(self) -> None:
        """The spill into the store, at most once a replay interval while it keeps failing."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._replay_due:
            return
        try:
            replayed = await asyncio.to_thread(self._replay_spill)
        except Exception as error:  # unreachable still, or an unreadable file: the rows stay
            self._replay_due = loop.time() + self.replay_interval_s
            log.warning(
                "replaying %s failed, again in %g s: %r",
                self.spill.replay_path,
                self.replay_interval_s,
                error,
            )
            return
        if replayed is not None:
            log.info("replayed %d spilled exchanges into the store", replayed)

    def _replay_spill(self) -> int | None:
        """Every spilled row into the store, in batches, rows without a parent first (a
        shadow can be spilled before its parent); the file goes only once all are in.
        The number written, or None if `stop` came first (the file stays)."""
        if not self.spill.take():
            return 0
        replayed = 0
        for shadows in (False, True):
            rows = (row for row in self.spill.rows() if (row["parent_id"] is not None) is shadows)
            while chunk := list(itertools.islice(rows, self.max_batch)):
                if self._stopped:
                    return None
                replayed += self._replay_batch(chunk)
        self.spill.release()
        return replayed

    def _replay_batch(self, chunk: list[dict[str, Any]]) -> int:
        # Once each: a batch spilled twice (a stop cut its append short), and not rows the
        # store already has (a write that committed but whose answer was lost).
        rows = list({row["id"]: row for row in chunk}.values())
        recorded = self.store.recorded_ids([row["id"] for row in rows])
        rows = [row for row in rows if row["id"] not in recorded]
        if not rows:
            return 0
        try:
            self.store.record_exchanges(rows)
            written = len(rows)
        except UNREACHABLE:
            raise
        except Exception:
            log.exception("replaying %d exchanges failed: row by row", len(rows))
            written = self._write_rows(rows)
        metrics.RECORDER_REPLAYED.inc(written)
        return written
