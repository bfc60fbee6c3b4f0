"""Saved adapters in an engine's slots (the device tier), under a byte budget.

The key of a saved adapter is its revision's content hash, so every sampler of one revision, whether
it was named by path, alias or number, shares one resident copy. An adapter is referenced while a
batch uses it and is never evicted then; unreferenced ones leave least recently used first when a
load needs room. When even that is not enough, `acquire` raises `NoRoom` and the caller retries after
the running batch has released its adapters. Only the engine's worker thread calls in (it alone
touches slots), so there is no lock; `stats` reads plain counters and may be called from anywhere.

Not here yet (the rest of the residency issue): a host tier and a loader thread that verifies blobs off
the engine thread, parking idle training runs, and training runs and snapshots under the budget.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mintd.catalog import Revision
from mintd.engine.engine import Engine

Loader = Callable[[Engine, Revision], int]  # puts a revision in a new slot; raises ValueError if it can't


class NoRoom(Exception):
    """Every resident adapter is in use and the budget is full: try again after the running batch."""


@dataclass
class _Resident:
    slot: int
    nbytes: int
    refs: int = 0


class Residency:
    def __init__(self, engine: Engine, load: Loader, budget_bytes: int) -> None:
        self.engine = engine
        self.load = load
        self.budget_bytes = budget_bytes
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self.bytes_used = self.peak_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.in_use = 0  # resident adapters some batch references
        self._load_ms: list[float] = []

    def acquire(self, rev: Revision) -> int:
        """The slot holding `rev`, loaded if needed; referenced until `release(rev)`."""
        entry = self._resident.get(rev.content_hash)
        if entry is not None:
            self.hits += 1
            self._resident.move_to_end(rev.content_hash)
        else:
            entry = self._load(rev)
        entry.refs += 1
        self.in_use += entry.refs == 1
        return entry.slot

    def release(self, rev: Revision) -> None:
        entry = self._resident.get(rev.content_hash)
        if entry is not None and entry.refs > 0:
            entry.refs -= 1
            self.in_use -= entry.refs == 0

    def _load(self, rev: Revision) -> _Resident:
        if rev.size_bytes > self.budget_bytes:
            raise ValueError(
                f"model_path: {rev.ref} holds {rev.size_bytes} bytes, more than this server's adapter device "
                f"budget of {self.budget_bytes} (MINTD_ADAPTER_DEVICE_BUDGET)"
            )
        self._make_room(rev.size_bytes)
        started = time.perf_counter()
        slot = self.load(self.engine, rev)  # a corrupt or foreign blob raises here, and is not kept
        self._load_ms.append((time.perf_counter() - started) * 1000)
        del self._load_ms[:-1000]
        entry = _Resident(slot, self.engine.slots[slot].nbytes)
        self.misses += 1
        self._resident[rev.content_hash] = entry
        self.bytes_used += entry.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_used)
        self._make_room(0)  # the blob's size was an estimate: settle on the real one
        return entry

    def _make_room(self, needed: int) -> None:
        for key in list(self._resident):
            if self.bytes_used + needed <= self.budget_bytes:
                return
            entry = self._resident[key]
            if entry.refs == 0:
                self.engine.drop(entry.slot)
                self.bytes_used -= entry.nbytes
                self.evictions += 1
                del self._resident[key]
        if self.bytes_used + needed > self.budget_bytes and needed:
            raise NoRoom(f"{needed} bytes do not fit until the running batch releases its adapters")

    def stats(self) -> dict[str, Any]:
        loads = sorted(self._load_ms)
        return {
            "device_budget_bytes": self.budget_bytes,
            "device_bytes": self.bytes_used,
            "device_peak_bytes": self.peak_bytes,
            "resident_adapters": len(self._resident),
            "adapters_in_use": self.in_use,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "load_ms_p50": loads[len(loads) // 2] if loads else None,
            "load_ms_p99": loads[min(len(loads) - 1, int(len(loads) * 0.99))] if loads else None,
        }
