"""Heap upkeep between engine rounds: freed memory back to the OS, and Python's full collections.

glibc's malloc keeps freed chunks in its arenas for reuse and returns pages only from the top of a
heap. The engine frees tensors of ever-changing sizes (each training batch's activations and
gradients, each step's decode buffers), the freed space is scattered between live chunks, and a
long-running `mintd serve` grew from 0.5 to 6 GB of resident memory under Tinker training while its
live tensors stayed the same. `malloc_trim(0)` returns the free pages of every arena; on a large heap
it takes tens of milliseconds, so it runs at most once per `trim_interval_s`. Elsewhere than glibc
(musl, macOS) there is nothing to call.

With the trim in charge of giving memory back, `free()` no longer does it on its own. By default glibc
returns a heap's top once it passes twice the largest chunk freed so far, and serves anything above
that size (always, above 32 MiB) with a fresh mapping, so each training step gave its activations
back and page-faulted them in again as zeroed pages (32 one-row adapters × 64 tokens on the `base`
preset: a forward_backward took 6.9-7.1 s, 6.4-6.5 s with the heap kept). Chunks up to glibc's 32 MiB
limit now come from the heap and stay there until the next trim.

Python's full (oldest-generation) collection scans every tracked object and holds the GIL while it
does, so every request stalls. Python starts one whenever the objects that survived younger
collections have grown by a quarter, which a wave of cold loads does every few hundred adapters; with
slots that held a tensor per matrix (~60 objects each), the probe behind `bench/cold_wave.py` saw two
such passes of 60-150 ms per 1,000 cold loads. Resident adapters now keep far fewer objects
(`engine.adapters.BufferWeights`), and the passes are also moved: while an engine worker runs,
automatic full collections are off and the worker schedules them. One is due every
`full_gc_interval_s`, runs once the worker is idle (it waited and no work came: a pause then delays no
request), and runs anyway, between rounds, once it is overdue by another interval. The younger
generations, which find most cyclic garbage, still collect automatically; what only a full pass finds
waits at most two intervals.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import threading
import time
from collections.abc import Callable

_NEVER = 1_000_000_000  # an oldest-generation threshold no count reaches


@functools.cache  # find_library runs `ldconfig -p` (~1 ms here): once per process, not per lookup
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    trim = getattr(_libc(), "malloc_trim", None)  # the call releases the GIL
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit
_TRIM_NEVER = 2**31 - 1


def _keep_freed_memory() -> None:
    """Freed chunks stay in the heap for reuse until the next trim (process-wide, glibc only)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER)


class _AutomaticFullCollections:
    """The process-wide switch, held off while any upkeep that schedules full collections is open;
    the thresholds the process had come back when the last one closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: tuple[int, int, int] | None = None

    def hold_off(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = gc.get_threshold()
                gc.set_threshold(self._saved[0], self._saved[1], _NEVER)
            self._holders += 1

    def let_go(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._saved is not None:
                gc.set_threshold(*self._saved)


_AUTOMATIC = _AutomaticFullCollections()


class HeapUpkeep:
    """Trims the C heap and runs a full collection when `between_rounds` is called and they are due
    (an interval of 0: that one never, and Python keeps its own full collections). `close` gives the
    process its automatic full collections back."""

    def __init__(
        self, trim_interval_s: float, full_gc_interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.trim_interval_s = trim_interval_s
        self.full_gc_interval_s = full_gc_interval_s
        self._trim = _malloc_trim() if trim_interval_s > 0 else None
        if self._trim is not None:
            _keep_freed_memory()
        self._clock = clock
        self._last_trim = self._last_full_gc = clock()
        self.trims = self.full_gcs = 0
        self._holding = full_gc_interval_s > 0
        if self._holding:
            _AUTOMATIC.hold_off()

    @property
    def trims_heap(self) -> bool:
        return self._trim is not None

    def between_rounds(self, idle: bool) -> None:
        """`idle`: no work is running or waiting, so a pause now delays no request."""
        now = self._clock()
        waited = now - self._last_full_gc
        due = waited >= self.full_gc_interval_s
        if self._holding and due and (idle or waited >= 2 * self.full_gc_interval_s):
            gc.collect()
            self._last_full_gc = self._clock()
            self.full_gcs += 1
        if self._trim is not None and now - self._last_trim >= self.trim_interval_s:
            self._trim(0)
            self._last_trim = self._clock()
            self.trims += 1

    def close(self) -> None:
        if self._holding:
            self._holding = False
            _AUTOMATIC.let_go()
