"""Trained adapters kept for reuse, keyed by what determines their weights.

Training is deterministic given the base model, the ordered training data, the hyperparameters (seed
included) and the number of steps, so two requests with the same key would train the same adapter: the
second one reuses the first's. The cache is bounded by count and by bytes and evicts the least recently
used adapter that no request is using, from the engine and from disk. An adapter in use is never evicted;
the cache can then run over its bounds until a request lets go.

Two requests that miss on the same key at once train once: the second waits for the first ("single flight").

Concurrency: the cache lives on the replica's event loop and is only touched from it. Its one lock
serialises what awaits the engine (loading and unloading adapters) with the bookkeeping around it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import shutil
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ttserve.config import TrainingConfig
from ttserve.contract import Adapter
from ttserve.files import directory_bytes, scratch_directory, staged_directory, sweep_scratch


class AdapterHost(Protocol):
    """What the cache needs of an engine."""

    async def add_adapter(self, path: Path) -> Adapter: ...

    async def remove_adapter(self, adapter: Adapter) -> None: ...


@dataclass(frozen=True)
class AdapterKey:
    base_model: str
    selected_ids: tuple[int, ...]  # datastore sequence ids in training order
    training: str  # the training hyperparameters as canonical JSON
    steps: int
    salt: str = ""  # who may share it (ServerConfig.salt_adapters_by_key): "" for everyone

    @classmethod
    def of(
        cls,
        base_model: str,
        selected_ids: Sequence[int],
        training: TrainingConfig,
        steps: int,
        salt: str | None = None,
    ) -> AdapterKey:
        canonical = json.dumps(training.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return cls(base_model, tuple(int(i) for i in selected_ids), canonical, int(steps), salt or "")

    @property
    def digest(self) -> str:
        fields = [self.base_model, self.selected_ids, self.training, self.steps]
        payload = json.dumps([*fields, self.salt] if self.salt else fields)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class _Entry:
    key: AdapterKey
    adapter: Adapter
    info: Any  # what training returned, handed to every later hit
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class AdapterLease:
    """A request's hold on a cached adapter: it stays loaded until `release()`."""

    key: AdapterKey  # what the adapter was trained on (for a run cut short, not what was asked)
    adapter: Adapter
    info: Any
    cached: bool  # True: trained by an earlier request
    _cache: AdapterCache
    _entry: _Entry
    _released: bool = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._entry.users -= 1
            await self._cache._evict()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterCache:
    def __init__(
        self,
        engine: AdapterHost,
        max_adapters: int = 16,
        max_bytes: int = 512 * 2**20,
        scratch_dir: str | Path | None = None,
    ):
        if max_adapters < 1 or max_bytes < 1:
            raise ValueError("the adapter cache needs room for at least one adapter")
        self.engine = engine
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._scratch_root = scratch_dir
        self.stats = CacheStats()
        self._entries: OrderedDict[AdapterKey, _Entry] = OrderedDict()  # least recently used first
        self._training: dict[AdapterKey, asyncio.Future] = {}  # keys being trained now (single flight)
        self._mutex = asyncio.Lock()
        self._serial = 0

    def __len__(self) -> int:
        return len(self._entries)

    @functools.cached_property
    def directory(self) -> Path:
        """The adapters' scratch directory, made at the first training: a replica that is killed before it
        trains (Serve force-kills one still starting, and a kill runs no cleanup) leaves nothing behind."""
        return scratch_directory(self._scratch_root)

    def remove_directory(self) -> None:
        """Delete the scratch directory, if one was made. Safe from any thread (Serve's `__del__`)."""
        if "directory" in self.__dict__:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def bytes(self) -> int:
        return sum(entry.adapter.bytes for entry in self._entries.values())

    def adapters(self) -> list[Adapter]:
        """The cached adapters, least recently used first."""
        return [entry.adapter for entry in self._entries.values()]

    def held_ids(self) -> list[str]:
        """The digests of the adapters cached or being trained here."""
        return [key.digest for key in (*self._entries, *self._training)]

    def acquire(self, key: AdapterKey) -> AdapterLease | None:
        """The cached adapter for `key`, held for the caller; None on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self.stats.hits += 1
        return self._lease(entry, cached=True)

    async def get_or_train(
        self,
        key: AdapterKey,
        train: Callable[[Path], Awaitable[Any]],
        trained_key: Callable[[Any], AdapterKey] | None = None,
    ) -> AdapterLease:
        """The adapter for `key`: from the cache, from a request already training it, or by `train(dir)`,
        which must write a PEFT adapter directory at `dir` and return what later hits should see.

        `trained_key(info)` says what the adapter was really trained on when that is not `key` (training cut
        short by a deadline): it is cached under that key, so it is only ever reused as what it is.
        """
        while True:
            lease = self.acquire(key)
            if lease is not None:
                return lease
            waiting = self._training.get(key)
            if waiting is None:
                break
            # Wait for it without inheriting its fate: if it failed or its client went away, try again
            # (and train ourselves if nobody else is).
            await asyncio.wait([waiting])
        self.stats.misses += 1
        sweep_scratch(self.directory.parent)  # what killed replicas on this machine left behind
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._training[key] = done
        self._serial += 1
        target = self.directory / f"adapter-{self._serial}"
        try:
            # Staged: a failed or cancelled training leaves no half-written adapter under a real name.
            with staged_directory(target, create=False) as staging:
                info = await train(staging)
            return await self._insert(trained_key(info) if trained_key else key, target, info)
        finally:
            del self._training[key]
            done.set_result(None)

    def _lease(self, entry: _Entry, cached: bool) -> AdapterLease:
        entry.users += 1
        entry.last_used = time.monotonic()
        self._entries.move_to_end(entry.key)
        return AdapterLease(entry.key, entry.adapter, entry.info, cached, self, entry)

    async def _insert(self, key: AdapterKey, directory: Path, info: Any) -> AdapterLease:
        """Load a freshly trained adapter and hold it for the caller; evict others beyond the bounds."""
        async with self._mutex:
            if key in self._entries:  # a run cut short landed on an adapter trained before: keep that one
                shutil.rmtree(directory, ignore_errors=True)
                return self._lease(self._entries[key], cached=True)
            try:
                # Room first, so that the engine and the disk never hold more than the bounds while an
                # unused adapter could have made way.
                await self._make_room(directory_bytes(directory))
                adapter = await self.engine.add_adapter(directory)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            entry = _Entry(key, adapter, info)
            self._entries[key] = entry
            return self._lease(entry, cached=False)

    async def _evict(self) -> None:
        """Back within the bounds, once a request releases an adapter that kept the cache over them."""
        async with self._mutex:
            await self._make_room()

    async def _make_room(self, incoming_bytes: int | None = None) -> None:
        """Evict least recently used adapters nobody is using until the cache is within its bounds, with
        room for one more of `incoming_bytes` when given. The caller holds the mutex."""
        extra, extra_bytes = (0, 0) if incoming_bytes is None else (1, incoming_bytes)
        while len(self._entries) + extra > self.max_adapters or self.bytes + extra_bytes > self.max_bytes:
            victim = next((entry for entry in self._entries.values() if entry.users == 0), None)
            if victim is None:
                return  # everything is in use: over the bounds until a request releases its adapter
            del self._entries[victim.key]
            await self.engine.remove_adapter(victim.adapter)
            shutil.rmtree(victim.adapter.path, ignore_errors=True)
            self.stats.evictions += 1

    async def close(self) -> None:
        """Unload every adapter and delete the scratch directory (that too if an unload fails)."""
        try:
            async with self._mutex:
                for entry in list(self._entries.values()):
                    await self.engine.remove_adapter(entry.adapter)
                self._entries.clear()
        finally:
            self.remove_directory()
