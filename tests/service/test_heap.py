"""The heap trimmer: it really returns freed allocator memory, and only as often as it is told to."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

from mintd.service.heap import HeapTrimmer

CHUNK = 64 * 1024  # below glibc's mmap threshold: these come from the heap, not from mmap
CHUNKS = 2000


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_trimming_returns_memory_freed_between_live_chunks() -> None:
    """Every other chunk stays live, so the freed ones can neither merge nor shrink the heap from its
    top and free() alone returns nothing: the shape a server's heap takes after many tensors of
    different sizes and lifetimes. (Small live chunks would not do: they fill older holes.)"""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trimmer = HeapTrimmer(interval_s=1e-9)
    assert trimmer.enabled  # glibc (the CI's and this project's platforms)
    trimmer.maybe_trim()
    chunks = []
    for _ in range(2 * CHUNKS):
        chunks.append(libc.malloc(CHUNK))
        ctypes.memset(chunks[-1], 1, CHUNK)
    freed, pins = chunks[1::2], chunks[::2]
    try:
        for p in freed:
            libc.free(p)
        before = _rss_mb()
        assert trimmer.maybe_trim()
        returned = before - _rss_mb()
    finally:
        for p in pins:
            libc.free(p)
    allocated = CHUNKS * CHUNK / 2**20
    assert returned > 0.5 * allocated, f"trim returned {returned:.0f} of {allocated:.0f} MiB freed"


def test_trims_at_most_once_per_interval_and_never_when_off() -> None:
    now = [0.0]
    trimmer = HeapTrimmer(interval_s=10.0, clock=lambda: now[0])
    done = []
    for t in (1.0, 9.9, 10.0, 15.0, 20.5, 21.0):
        now[0] = t
        done.append(trimmer.maybe_trim())
    assert done == [False, False, True, False, True, False]
    assert trimmer.trims == 2

    off = HeapTrimmer(interval_s=0, clock=lambda: now[0])
    now[0] = 1e9
    assert not off.enabled and not off.maybe_trim() and off.trims == 0
