"""Keeps the engine's loaded adapters and the gateway's routing table in step with the store.

The store is the truth: an adapter registered there is loaded on the engine, and a
restarted engine (or one restarted by someone else, under `tunewatch serve`) gets its
adapters back at the next reconcile. The routing table is re-read on the same tick, so a
controller in another process, or another gateway host, steers this one.
"""

from __future__ import annotations

import asyncio
import logging

from serving.engine import EngineClient, EngineUnavailableError, adapter_fingerprint
from serving.routing import RoutingTable
from serving.store import AdapterRecord, Store

log = logging.getLogger(__name__)


class AdapterInUseError(ValueError):
    pass


class AdapterSet:
    """Registered adapters, their load state on the engine, and the routing table in force."""

    def __init__(self, store: Store, engine: EngineClient, base_adapter: str) -> None:
        self.store, self.engine, self.base_adapter = store, engine, base_adapter
        self.routing = RoutingTable()
        self._registered: dict[str, AdapterRecord] = {}
        self._lock = asyncio.Lock()

    def is_registered(self, name: str) -> bool:
        return name in self._registered

    def registered(self) -> list[AdapterRecord]:
        return list(self._registered.values())

    def resolve(self, adapter: str | None) -> str:
        """The engine-side name of an adapter; None (the base model) is the identity adapter."""
        return self.base_adapter if adapter is None else adapter

    async def load(self, name: str, path: str, reason: str) -> AdapterRecord:
        fingerprint = await asyncio.to_thread(adapter_fingerprint, path)
        async with self._lock:
            # Register first: a name already bound to other weights is refused before vLLM sees it.
            await asyncio.to_thread(self.store.register_adapter, name, path, fingerprint)
            await self.engine.load_adapter(name, path)
            await asyncio.to_thread(
                self.store.record_event, "adapter.loaded", reason, name, path=path
            )
            self._registered[name] = AdapterRecord(name, path, fingerprint, loaded=True)
            return self._registered[name]

    async def unload(self, name: str, reason: str) -> None:
        if name == self.base_adapter or name in self.routing.adapters():
            raise AdapterInUseError(f"adapter {name!r} is in the routing table; route it out first")
        async with self._lock:
            await self.engine.unload_adapter(name)
            await asyncio.to_thread(self.store.set_adapter_loaded, name, False)
            await asyncio.to_thread(self.store.record_event, "adapter.unloaded", reason, name)
            self._registered.pop(name, None)

    async def set_routing(self, table: RoutingTable, reason: str) -> None:
        missing = sorted(table.adapters() - self._registered.keys())
        if missing:
            raise KeyError(f"not registered: {', '.join(missing)}")
        await asyncio.to_thread(self.store.set_routing_table, table, reason)
        self.routing = table

    async def reconcile(self) -> None:
        """Load every registered adapter the engine lacks; pick up routing written elsewhere."""
        records = await asyncio.to_thread(self.store.adapters)
        self._registered = {r.name: r for r in records if r.loaded}
        table = await asyncio.to_thread(self.store.routing_table)
        if table is not None:
            self.routing = table
        try:
            served = set(await self.engine.model_ids())
        except EngineUnavailableError:
            return
        for record in self._registered.values():
            if record.name not in served:
                async with self._lock:
                    await self.engine.load_adapter(record.name, record.path)
                log.info("adapter reloaded on the engine", extra={"adapter": record.name})

    async def ready(self) -> bool:
        """The engine answers and serves every registered adapter."""
        try:
            served = set(await self.engine.model_ids())
        except EngineUnavailableError:
            return False
        return self._registered.keys() <= served
