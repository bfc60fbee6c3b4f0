"""Give the memory the C allocator keeps after frees back to the OS.

glibc's malloc keeps freed chunks in its arenas for reuse and returns pages only from the top of a
heap. The engine frees tensors of ever-changing sizes (each training batch's activations and
gradients, each step's decode buffers), the freed space is scattered between live chunks, and a
long-running `mintd serve` grew from 0.5 to 6 GB of resident memory under Tinker training while its
live tensors stayed the same. `malloc_trim(0)` returns the free pages of every arena; on a large heap
it takes tens of milliseconds, so the engine worker calls it between rounds at most once per
`heap_trim_interval_s`. Elsewhere than glibc (musl, macOS) there is nothing to call and this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # the call releases the GIL
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Trims the process heap when `maybe_trim` is called and `interval_s` has passed (0: never)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._trim = _malloc_trim() if interval_s > 0 else None
        self._clock = clock
        self._last = clock()
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if it is time; True when it did."""
        if self._trim is None or self._clock() - self._last < self.interval_s:
            return False
        self._trim(0)
        self._last = self._clock()
        self.trims += 1
        return True
