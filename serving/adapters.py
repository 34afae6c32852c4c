"""Keeps the engine's loaded adapters and the gateway's routing table in step with the store.

The store is the truth: an adapter registered there is loaded on the engine, and a
restarted engine (or one restarted by someone else, under `tunewatch serve`) gets its
adapters back at the next reconcile. The routing table is re-read on the same tick, so a
controller in another process, or another gateway host, steers this one.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from serving import metrics
from serving.engine import (
    ADAPTER_WEIGHTS,
    EngineClient,
    EngineUnavailableError,
    InvalidAdapterError,
    adapter_fingerprint,
)
from store import Store
from store.adapters import AdapterRecord, RoutingTable

log = logging.getLogger(__name__)


class AdapterInUseError(ValueError):
    pass


class AdapterPathError(InvalidAdapterError):
    """A path the admin API may not load from: relative, or outside every adapter root."""


def within_roots(path: str, roots: list[Path]) -> Path:
    """`path` resolved, if it and the files vLLM reads from it lie inside one of `roots`.

    Symlinks are resolved before the check, so neither `..` nor a link (the directory's, or
    a file's inside it) leads out of a root; the resolved path is what gets registered, so
    vLLM loads the directory that was checked. The roots are resolved too (a root may itself
    be a link, e.g. a mounted volume)."""
    given = Path(path)
    if not given.is_absolute():
        raise AdapterPathError(f"adapter path {path!r} is not absolute")
    resolved = given.resolve()
    root = next((r for r in (r.resolve() for r in roots) if resolved.is_relative_to(r)), None)
    if root is None:
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        raise AdapterPathError(
            f"adapter path {path!r} is outside the adapter roots ({allowed}): "
            "gateway.adapter_roots names where adapters may be loaded from"
        )
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        target = (resolved / name).resolve()
        if (resolved / name).exists() and not target.is_relative_to(root):
            raise AdapterPathError(f"{path}/{name} links to {target}, outside {root}")
    return resolved


class AdapterSet:
    """Registered adapters, their load state on the engine, and the routing table in force.

    One lock orders every change (load, unload, routing, reconcile): a reconcile reads the
    store and then overwrites its view of it, and a change landing in between would be undone.
    """

    def __init__(self, store: Store, engine: EngineClient, base_adapter: str) -> None:
        self.store, self.engine, self.base_adapter = store, engine, base_adapter
        self._use_routing(RoutingTable())
        self._registered: dict[str, AdapterRecord] = {}
        self._lock = asyncio.Lock()
        self.serve_base_through(None)

    def is_registered(self, name: str) -> bool:
        return name in self._registered

    def registered(self) -> list[AdapterRecord]:
        return list(self._registered.values())

    def serve_base_through(self, engine_base_model: str | None) -> None:
        """Base-model requests go to the engine's own base model (its served name), or, with
        None, to the identity adapter: the choice for an engine whose LoRA path is not known
        to leave plain base-model rows alone (serving/vllm_plugin.py)."""
        self.engine_base_model = engine_base_model
        metrics.BASE_SERVED_DIRECTLY.set(engine_base_model is not None)

    def resolve(self, adapter: str | None) -> str:
        """The engine-side name of an adapter; None (the base model) is the engine's base model
        where that is safe, else the identity adapter. While a rollout compares a candidate
        with what serves now (a shadow or a canary in the table), the base takes the identity
        adapter's LoRA road too: the latency guard then weighs the candidate against the road
        it would replace, not against what the LoRA path itself costs on the engine."""
        if adapter is not None:
            return adapter
        comparing = self.routing.shadow is not None or self.routing.canary is not None
        if self.engine_base_model is None or comparing:
            return self.base_adapter
        return self.engine_base_model

    async def load(self, name: str, path: str, reason: str) -> AdapterRecord:
        fingerprint = await asyncio.to_thread(adapter_fingerprint, path)
        async with self._lock:
            # Register first: a name already bound to other weights is refused before vLLM sees it.
            await asyncio.to_thread(self.store.register_adapter, name, path, fingerprint)
            try:
                await self.engine.load_adapter(name, path)
            except InvalidAdapterError:
                # Refused by vLLM: left marked loaded, every reconcile would retry it forever.
                if name not in self._registered:
                    await asyncio.to_thread(self.store.set_adapter_loaded, name, False)
                raise
            await asyncio.to_thread(
                self.store.record_event, "adapter.loaded", reason, name, path=path
            )
            self._registered[name] = AdapterRecord(name, path, fingerprint, loaded=True)
            return self._registered[name]

    async def unload(self, name: str, reason: str) -> None:
        async with self._lock:
            if name == self.base_adapter or name in self.routing.adapters():
                raise AdapterInUseError(
                    f"adapter {name!r} is in the routing table; route it out first"
                )
            await self.engine.unload_adapter(name)
            await asyncio.to_thread(self.store.set_adapter_loaded, name, False)
            await asyncio.to_thread(self.store.record_event, "adapter.unloaded", reason, name)
            self._registered.pop(name, None)

    async def set_routing(self, table: RoutingTable, reason: str) -> None:
        async with self._lock:
            missing = sorted(table.adapters() - self._registered.keys())
            if missing:
                raise KeyError(f"not registered: {', '.join(missing)}")
            await asyncio.to_thread(self.store.set_routing_table, table, reason)
            self._use_routing(table)

    async def reconcile(self) -> None:
        """Load every registered adapter the engine lacks; pick up routing written elsewhere."""
        async with self._lock:
            records = await asyncio.to_thread(self.store.adapters)
            self._registered = {r.name: r for r in records if r.loaded}
            table = await asyncio.to_thread(self.store.routing_table)
            if table is not None:
                self._use_routing(table)
            try:
                served = set(await self.engine.model_ids())
                for record in self._registered.values():
                    if record.name not in served:
                        await self._reload(record)
            except EngineUnavailableError:
                return

    def _use_routing(self, table: RoutingTable) -> None:
        self.routing = table
        metrics.publish_routing(table)

    async def _reload(self, record: AdapterRecord) -> None:
        """One adapter gone bad (its files deleted, say) must not keep the others off the engine."""
        try:
            await self.engine.load_adapter(record.name, record.path)
        except InvalidAdapterError as exc:
            log.error("adapter could not be reloaded: %s", exc, extra={"adapter": record.name})
            return
        log.info("adapter reloaded on the engine", extra={"adapter": record.name})

    async def ready(self) -> bool:
        """The engine answers and serves every registered adapter."""
        try:
            served = set(await self.engine.model_ids())
        except EngineUnavailableError:
            return False
        return self._registered.keys() <= served
