"""Heap upkeep: the trim really returns freed allocator memory, full collections move from Python's
schedule to the worker's, and each runs only as often as it is told to."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

from mintd.service.heap import HeapUpkeep

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
    now = [0.0]
    upkeep = HeapUpkeep(trim_interval_s=1.0, full_gc_interval_s=0, clock=lambda: now[0])
    assert upkeep.trims_heap  # glibc (the CI's and this project's platforms)
    now[0] += 1
    upkeep.between_rounds(idle=True)
    chunks = []
    for _ in range(2 * CHUNKS):
        chunks.append(libc.malloc(CHUNK))
        ctypes.memset(chunks[-1], 1, CHUNK)
    freed, pins = chunks[1::2], chunks[::2]
    try:
        for p in freed:
            libc.free(p)
        before = _rss_mb()
        now[0] += 1
        upkeep.between_rounds(idle=False)
        assert upkeep.trims == 2
        returned = before - _rss_mb()
    finally:
        for p in pins:
            libc.free(p)
    allocated = CHUNKS * CHUNK / 2**20
    assert returned > 0.5 * allocated, f"trim returned {returned:.0f} of {allocated:.0f} MiB freed"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


def test_a_freed_activation_sized_chunk_stays_in_the_heap_until_the_trim() -> None:
    """A 24 MiB chunk (a base-size MLP activation) comes from the heap, not from a fresh mapping, and
    freeing it keeps its pages for the next one; the trim gives them back."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = _Mallinfo2
    now = [0.0]
    upkeep = HeapUpkeep(trim_interval_s=1.0, full_gc_interval_s=0, clock=lambda: now[0])
    size = 24 << 20
    mapped_before = libc.mallinfo2().hblkhd
    chunk = libc.malloc(size)
    ctypes.memset(chunk, 1, size)
    assert libc.mallinfo2().hblkhd - mapped_before < size  # not a mapping of its own
    libc.free(chunk)
    assert libc.mallinfo2().fordblks >= size  # kept for reuse
    before = _rss_mb()
    now[0] += 1
    upkeep.between_rounds(idle=True)
    assert before - _rss_mb() > 0.5 * size / 2**20


def test_each_runs_only_when_due_and_a_full_collection_waits_for_idle() -> None:
    """The trim runs once per interval, busy or not; a due full collection waits for an idle round,
    but not beyond a second interval."""
    now = [0.0]
    upkeep = HeapUpkeep(trim_interval_s=10.0, full_gc_interval_s=4.0, clock=lambda: now[0])
    done = []
    try:
        for t, idle in (
            (1.0, True),
            (4.0, True),  # due and idle
            (9.0, False),  # due, busy
            (10.0, False),  # the trim's interval
            (11.9, False),
            (12.0, False),  # overdue by a second interval: runs busy
            (13.0, True),  # idle, not due
            (16.5, True),
            (20.0, False),
        ):
            now[0] = t
            before = (upkeep.trims, upkeep.full_gcs)
            upkeep.between_rounds(idle)
            done.append((upkeep.trims - before[0], upkeep.full_gcs - before[1]))
    finally:
        upkeep.close()
    assert done == [(0, 0), (0, 1), (0, 0), (1, 0), (0, 0), (0, 1), (0, 0), (0, 1), (1, 0)]

    off = HeapUpkeep(trim_interval_s=0, full_gc_interval_s=0, clock=lambda: now[0])
    now[0] = 1e9
    off.between_rounds(idle=True)
    assert not off.trims_heap and off.trims == off.full_gcs == 0


def test_automatic_full_collections_are_off_while_any_upkeep_is_open() -> None:
    """Two workers (two base models) hold the switch; the process's own thresholds come back only when
    the last one closes, and an upkeep that leaves full collections to Python does not touch them."""
    saved = gc.get_threshold()
    first, second = HeapUpkeep(0, 60.0), HeapUpkeep(0, 60.0)
    assert gc.get_threshold()[:2] == saved[:2] and gc.get_threshold()[2] > 10**8
    first.close()
    first.close()  # twice is once
    assert gc.get_threshold()[2] > 10**8
    second.close()
    assert gc.get_threshold() == saved
    HeapUpkeep(0, 0).close()
    assert gc.get_threshold() == saved


def test_a_full_collection_frees_what_only_it_finds() -> None:
    """A reference cycle that survived the younger generations stays until the scheduled pass."""
    now = [0.0]
    upkeep = HeapUpkeep(0, 1.0, clock=lambda: now[0])

    class Node:
        pass

    try:
        gc.collect()
        a, b = Node(), Node()
        a.other, b.other = b, a
        gc.collect(1)  # both survive into the oldest generation
        del a, b
        gc.collect(1)  # younger collections do not look there
        assert any(isinstance(o, Node) for o in gc.get_objects())
        now[0] = 1.0
        upkeep.between_rounds(idle=True)
        assert not any(isinstance(o, Node) for o in gc.get_objects())
    finally:
        upkeep.close()
