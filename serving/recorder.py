"""Writes exchanges to the store off the request path, in batches.

A request hands its exchange to `submit` (no I/O) and answers at once; one background
task waits `linger_s` after the first arrival, then commits whatever has queued up in a
single transaction, on a worker thread. Under
load that turns hundreds of commits a second into a few, and a slow disk delays the
record, never the client. `flush` waits until everything submitted so far is written;
`stop` drains the queue, so a clean shutdown loses nothing. A batch the store refuses
three times is written row by row, so that one bad row loses only itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serving import metrics
from store import Store

log = logging.getLogger(__name__)


class ExchangeRecorder:
    def __init__(self, store: Store, max_batch: int = 256, linger_s: float = 0.02) -> None:
        self.store, self.max_batch, self.linger_s = store, max_batch, linger_s
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="exchange-recorder")

    def submit(self, exchange: dict[str, Any]) -> None:
        self._queue.put_nowait(exchange)

    async def flush(self) -> None:
        await self._queue.join()

    async def stop(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Wait a moment for company: one commit for many exchanges, not one each.
            await asyncio.sleep(self.linger_s)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        for attempt in range(3):
            try:
                await asyncio.to_thread(self.store.record_exchanges, batch)
                return
            except Exception:  # a locked or unreachable database: retry, then say so
                log.exception("writing %d exchanges failed (attempt %d)", len(batch), attempt + 1)
                await asyncio.sleep(0.5 * 2**attempt)
        dropped = [e["id"] for e in batch if not await self._write_one(e)]
        metrics.STORE_WRITE_FAILURES.inc(len(dropped))
        if dropped:
            log.error("dropped %d of %d exchanges: %s", len(dropped), len(batch), dropped)

    async def _write_one(self, exchange: dict[str, Any]) -> bool:
        """One row alone (in batch order, so a shadow follows its parent); False if refused."""
        try:
            await asyncio.to_thread(self.store.record_exchanges, [exchange])
        except Exception:
            log.exception("the store refused exchange %s", exchange["id"])
            return False
        return True
