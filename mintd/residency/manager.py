"""One base model's working set: which adapters occupy its engine's slots, under byte budgets.

The manager is the only code that knows both adapter keys and slots. A key is one of:
- a saved revision (`Revision`), keyed by content hash, so every sampler, alias and path of one
  revision shares one resident copy; evictable when no batch uses it;
- a live training run (`RunKey`): never evicted, but parked in host memory with its gradients and
  optimizer state when the device budget needs its room or it idles (resumed bit-exactly on its next
  use);
- a training run's sampling snapshot (`SnapshotKey`): evictable when unused (its sampler then says so).

Tiers: device slots (`device_budget`) over a host cache of verified packed blobs (`host_budget`) over
the blob store. A saved revision not on the device is loaded by the loader thread (read, verify,
stage in the host tier); `acquire` raises `Loading` meanwhile and the op waits in its queue while
resident work goes on. The engine thread then only copies host → device (on a CPU engine, not even
that: it adds the slot the loader built of views of the buffer). Every `acquire` is matched
by one `release` when the batch is done; a referenced entry is never evicted or parked. Only the
engine's worker thread calls in, except `prefetch` and `stats`, which any thread may call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mintd.catalog import Revision
from mintd.engine.engine import Engine, Parked
from mintd.residency.device import frozen_view, load_packed_into
from mintd.residency.host import HostCache, Staged
from mintd.residency.loader import Loader, Read


class Wait(Exception):
    """The adapter cannot be used yet; the op stays queued and asks again at the next round."""


class NoRoom(Wait):
    """Every resident adapter is in use and the budget is full: try again after the running batch."""


class Loading(Wait):
    """The adapter's cold load is queued or in flight on the loader thread."""


@dataclass(frozen=True)
class RunKey:
    model_id: str


@dataclass(frozen=True)
class SnapshotKey:
    sampler_id: str


AdapterKey = Revision | RunKey | SnapshotKey


@dataclass
class _Resident:
    slot: int | None  # None: a parked run
    nbytes: int
    kind: str  # "revision", "snapshot" (both evictable) or "run" (parked, never evicted)
    refs: int = 0
    parked: Parked | None = None
    last_used: float = field(default_factory=time.monotonic)


def _key(key: AdapterKey) -> str:
    if isinstance(key, RunKey):
        return f"run:{key.model_id}"
    if isinstance(key, SnapshotKey):
        return f"snapshot:{key.sampler_id}"
    return f"rev:{key.content_hash}"


class Residency:
    def __init__(
        self,
        engine: Engine,
        read: Read,
        device_budget: int,
        host_budget: int,
        name: str = "",
        park_after_s: float = 600.0,
    ) -> None:
        self.engine = engine
        self.device_budget = device_budget
        self.park_after_s = park_after_s
        self.read = read
        self.host = HostCache(host_budget, pin_memory=engine.device.type == "cuda")
        self.loader = Loader(self._stage, self.host, name)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self.device_bytes = self.device_peak = self.parked_bytes = 0
        self.hits = self.misses = self.evictions = self.parks = self.unparks = 0
        self._copy_ms: list[float] = []
        self._next_park_check = 0.0

    def set_wake(self, wake: Callable[[str], None]) -> None:
        """Called (on the loader thread) with a content hash when its load finishes or fails, so the
        ops waiting on it are looked at again (and no others)."""
        self.loader.on_done = wake

    def close(self) -> None:
        self.loader.stop()

    # saved revisions and snapshots ----------------------------------------------------------------

    def prefetch(self, rev: Revision, priority: int) -> None:
        """Start a revision's cold load now if it is in no tier (any thread)."""
        if _key(rev) not in self._resident:
            self.loader.request(rev, priority)  # unless queued, in flight or in the host tier

    def ready(self, key: AdapterKey, priority: int = 1) -> bool:
        """Whether `acquire(key)` would answer without waiting on a load (a failed load is ready: its
        error is the answer). Queues the load when it is not."""
        if not isinstance(key, Revision) or self._at_hand(key):
            return True
        self.loader.request(key, priority)
        return False

    def load_backlog(self, rev: Revision) -> int | None:
        """How many loads wait before a new one for `rev` would; None when `rev` needs no new load
        (it is resident, in the host tier, or its load is queued already)."""
        if self._at_hand(rev) or self.loader.pending(rev.content_hash):
            return None
        return self.loader.queued + self.loader.in_flight

    def _at_hand(self, rev: Revision) -> bool:
        sha = rev.content_hash
        return _key(rev) in self._resident or sha in self.host or self.loader.has_failure(sha)

    def acquire(self, key: AdapterKey) -> int:
        """The slot holding `key`, referenced until `release(key)`. Raises Loading while a saved
        revision's load runs, NoRoom while the budget is full of adapters in use, ValueError for an
        unusable adapter (a corrupt blob, a dropped snapshot, a run that was unloaded)."""
        k = _key(key)
        entry = self._resident.get(k)
        if entry is None:
            if not isinstance(key, Revision):
                raise ValueError(_gone(key))
            entry = self._load(key)
        elif entry.parked is not None:
            self._unpark(entry)
        else:
            self.hits += isinstance(key, Revision)
        self._resident.move_to_end(k)
        entry.refs += 1
        entry.last_used = time.monotonic()
        return entry.slot  # type: ignore[return-value]  # on the device now

    @contextmanager
    def hold(self, key: AdapterKey) -> Iterator[int]:
        """`key`'s slot for one piece of work on the engine thread (an optimizer step, a save, a
        distillation reference). A saved revision not staged yet is read here, synchronously."""
        if isinstance(key, Revision) and not self._at_hand(key):
            self.host.add_staged(key.content_hash, self._stage(key))
        slot = self.acquire(key)
        try:
            yield slot
        finally:
            self.release(key)

    def slot_of(self, key: AdapterKey) -> int | None:
        """Where `key` is on the device now, if it is (a look, for observers; no reference taken)."""
        entry = self._resident.get(_key(key))
        return None if entry is None else entry.slot

    def release(self, key: AdapterKey) -> None:
        entry = self._resident.get(_key(key))
        if entry is not None and entry.refs > 0:
            entry.refs -= 1

    def _load(self, rev: Revision) -> _Resident:
        if (failure := self.loader.failure(rev.content_hash)) is not None:
            raise failure
        staged = self.host.take(rev.content_hash)
        if staged is None:
            self.loader.request(rev, 1)
            raise Loading(f"{rev.ref} is loading")
        size = staged.packed.nbytes
        if size > self.device_budget:
            raise ValueError(
                f"model_path: {rev.ref} needs {size} bytes, more than this server's adapter device budget "
                f"of {self.device_budget} (MINTD_ADAPTER_DEVICE_BUDGET)"
            )
        self._make_room(size)
        slot = self._copy(staged)
        self.misses += 1
        return self._add(_key(rev), _Resident(slot, self.engine.slots[slot].nbytes, "revision"))

    def _stage(self, rev: Revision) -> Staged:
        """Read and verify `rev` and, where its slot needs no copy, build that slot (the loader thread)."""
        packed = self.read(rev)
        return Staged(packed, frozen_view(self.engine, packed))

    def _copy(self, staged: Staged) -> int:
        started = time.perf_counter()
        if staged.adapter is not None:
            slot = self.engine.slots.add(staged.adapter)
        else:  # verified when it entered the host
            slot = load_packed_into(self.engine, staged.packed, verify=False)
        self._copy_ms.append((time.perf_counter() - started) * 1000)
        del self._copy_ms[:-1000]
        return slot

    def add_snapshot(self, run: RunKey, snapshot: SnapshotKey) -> None:
        """A frozen copy of a run's adapter, for sampling."""
        source = self.acquire(run)
        try:
            nbytes = self.engine.slots[source].nbytes
            self._make_room(nbytes)
            self._add(_key(snapshot), _Resident(self.engine.snapshot(source), nbytes, "snapshot"))
        finally:
            self.release(run)

    # training runs ----------------------------------------------------------------------------------

    def add_run(self, run: RunKey, slot: int) -> None:
        """A live training run's new slot (made by the engine), pinned. The room it needs is made
        first (evicting, parking); when even that fails the slot is dropped and NoRoom raised."""
        nbytes = self.engine.training_bytes(slot)
        try:
            if nbytes > self.device_budget:
                raise ValueError(
                    f"lora_config: a training run of this size needs {nbytes} bytes on the device, more "
                    f"than this server's adapter device budget of {self.device_budget}"
                )
            self._make_room(nbytes)
        except Exception:
            self.engine.drop(slot)
            raise
        old = self._resident.pop(_key(run), None)
        if old is not None:
            self._free(old)
        self._add(_key(run), _Resident(slot, nbytes, "run"))

    def drop(self, key: AdapterKey) -> None:
        """Forget a run (parked or not) or a snapshot and free its memory."""
        entry = self._resident.pop(_key(key), None)
        if entry is not None:
            self._free(entry)

    def park_idle(self) -> None:
        """Park training runs nobody used for `park_after_s`. Called before every engine step, so it
        looks at the entries at most once a second (sooner when `park_after_s` is shorter)."""
        now = time.monotonic()
        if now < self._next_park_check:
            return
        self._next_park_check = now + min(1.0, self.park_after_s / 4)
        cutoff = now - self.park_after_s
        for entry in list(self._resident.values()):
            if entry.kind == "run" and entry.parked is None and entry.refs == 0 and entry.last_used < cutoff:
                self._park(entry)

    def _park(self, entry: _Resident) -> None:
        entry.parked = self.engine.park(entry.slot)  # type: ignore[arg-type]
        entry.slot = None
        self.device_bytes -= entry.nbytes
        self.parked_bytes += entry.nbytes
        self.parks += 1

    def _unpark(self, entry: _Resident) -> None:
        self._make_room(entry.nbytes)
        entry.slot = self.engine.unpark(entry.parked)  # type: ignore[arg-type]
        entry.parked = None
        self.parked_bytes -= entry.nbytes
        self._count_in(entry.nbytes)
        self.unparks += 1

    # bookkeeping ------------------------------------------------------------------------------------

    def _add(self, key: str, entry: _Resident) -> _Resident:
        self._resident[key] = entry
        self._count_in(entry.nbytes)
        return entry

    def _count_in(self, nbytes: int) -> None:
        self.device_bytes += nbytes
        self.device_peak = max(self.device_peak, self.device_bytes)

    def _free(self, entry: _Resident) -> None:
        if entry.parked is not None:
            self.parked_bytes -= entry.nbytes
        else:
            self.engine.drop(entry.slot)  # type: ignore[arg-type]
            self.device_bytes -= entry.nbytes

    def _make_room(self, needed: int) -> None:
        """Evict unreferenced saved adapters and snapshots, then park unreferenced runs, least
        recently used first, until `needed` more bytes fit. Walks only as far as it must."""
        for runs in (False, True):
            excess = self.device_bytes + needed - self.device_budget
            victims = []
            for key, entry in self._resident.items():
                if excess <= 0:
                    break
                if entry.refs or (entry.kind == "run") != runs or entry.parked is not None:
                    continue
                victims.append(key)
                excess -= entry.nbytes
            for key in victims:
                if runs:
                    self._park(self._resident[key])
                else:
                    self._free(self._resident.pop(key))
                    self.evictions += 1
        if self.device_bytes + needed > self.device_budget:
            raise NoRoom(f"{needed} bytes do not fit until the running batch releases its adapters")

    def stats(self) -> dict[str, Any]:
        loads = sorted(self.loader.load_ms())
        copies = sorted(self._copy_ms)
        resident = list(self._resident.values())
        return {
            "device_budget_bytes": self.device_budget,
            "device_bytes": self.device_bytes,
            "device_peak_bytes": self.device_peak,
            "host_budget_bytes": self.host.budget_bytes,
            "host_bytes": self.host.bytes_used,
            "host_peak_bytes": self.host.peak_bytes,
            "parked_bytes": self.parked_bytes,
            "resident_adapters": sum(1 for e in resident if e.kind == "revision"),
            "snapshots": sum(1 for e in resident if e.kind == "snapshot"),
            "host_adapters": len(self.host),
            "adapters_in_use": sum(1 for e in resident if e.refs),
            "training_runs": sum(1 for e in resident if e.kind == "run"),
            "parked_runs": sum(1 for e in resident if e.parked is not None),
            "hits": self.hits,
            "host_hits": self.host.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "host_evictions": self.host.evictions,
            "parks": self.parks,
            "unparks": self.unparks,
            "loads_queued": self.loader.queued,
            "loads_in_flight": self.loader.in_flight,
            "load_ms_p50": _quantile(loads, 0.5),
            "load_ms_p99": _quantile(loads, 0.99),
            "copy_ms_p50": _quantile(copies, 0.5),
            "copy_ms_p99": _quantile(copies, 0.99),
        }


def _quantile(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(len(values) * q))] if values else None


def _gone(key: RunKey | SnapshotKey) -> str:
    if isinstance(key, SnapshotKey):
        return (
            "this sampler's weights snapshot was dropped (a training run keeps its newest few, and an "
            "unused one leaves when the device budget needs room); save the weights for sampling again"
        )
    return f"model {key.model_id} is not loaded"
