"""The host tier: verified packed adapters in host memory, ready for a device copy without re-hashing.

An entry enters verified (the loader checked every checksum once) and stays until the byte budget
needs its room. Entries the engine has not copied yet are pinned: the loader made them for a request
that is waiting, and evicting them would only make that request load again. Thread-safe: the loader
thread adds, the engine thread takes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from mintd.engine.adapters import Adapter
from mintd.store.packed import PackedAdapter


@dataclass(frozen=True)
class Staged:
    """A verified packed adapter, and the frozen slot the loader built of it when that needs no copy
    (`device.frozen_view`), so the engine thread only adds it. The slot goes with the first `take`; the
    cache keeps the bytes alone: a built slot is dozens of objects that Python's full collections
    scan, and a host tier holds many thousand adapters."""

    packed: PackedAdapter
    adapter: Adapter | None = None


@dataclass
class _Entry:
    staged: Staged
    nbytes: int
    pinned: bool


class HostCache:
    def __init__(self, budget_bytes: int, pin_memory: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory  # page-locked copies, for fast host-to-GPU transfers
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.bytes_used = self.peak_bytes = 0
        self.hits = self.evictions = 0

    def add_staged(self, key: str, staged: Staged) -> None:
        """A freshly verified adapter some request waits for: pinned until `take` copies it."""
        if self.pin_memory:
            pinned = {k: g.pin_memory() for k, g in staged.packed.groups.items()}
            staged = Staged(PackedAdapter(staged.packed.header, pinned))
        entry = _Entry(staged, staged.packed.nbytes, True)
        with self._lock:
            old = self._entries.pop(key, None)
            self.bytes_used += entry.nbytes - (old.nbytes if old else 0)
            self._entries[key] = entry
            self._evict()
            self.peak_bytes = max(self.peak_bytes, self.bytes_used)

    def take(self, key: str) -> Staged | None:
        """The entry for a device copy (it stays cached, now evictable), or None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if not entry.pinned:
                self.hits += 1  # a reload from host memory: no disk read, no hash
            entry.pinned = False
            self._entries.move_to_end(key)
            staged = entry.staged
            if staged.adapter is not None:
                entry.staged = Staged(staged.packed)
            return staged

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        """Least recently used unpinned entries out until the budget holds. Walks only as far as it
        must: a load into a cache of many thousand entries costs the same as into an empty one."""
        excess = self.bytes_used - self.budget_bytes
        victims = []
        for key, entry in self._entries.items():
            if excess <= 0:
                break
            if not entry.pinned:
                victims.append(key)
                excess -= entry.nbytes
        for key in victims:
            self.bytes_used -= self._entries.pop(key).nbytes
            self.evictions += 1
