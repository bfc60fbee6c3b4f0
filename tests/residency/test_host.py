"""The host tier on its own: eviction by bytes, least recently used first, never a pinned entry."""

from __future__ import annotations

import torch

from mintd.residency.host import HostCache, Staged
from mintd.store.packed import PackedAdapter


def _packed(nbytes: int) -> Staged:
    # the cache reads only `nbytes`, which comes from the groups; no header is needed for that
    return Staged(PackedAdapter(header=None, groups={"weights.float32": torch.zeros(nbytes // 4)}))  # type: ignore[arg-type]


def test_evicts_least_recently_used_unpinned_entries_until_the_budget_holds() -> None:
    cache = HostCache(budget_bytes=400)
    for key in "abcd":
        cache.add_staged(key, _packed(100))
        cache.take(key)  # copied to the device: evictable now
    cache.take("a")  # a is the most recently used
    cache.add_staged("e", _packed(200))  # 600 bytes: the two least recently used unpinned go
    assert set(cache._entries) == {"d", "a", "e"} and cache.bytes_used == 400
    assert cache.evictions == 2


def test_a_pinned_entry_is_never_evicted() -> None:
    cache = HostCache(budget_bytes=200)
    cache.add_staged("waited-for", _packed(100))  # staged for a waiting request: pinned
    cache.add_staged("b", _packed(100))
    cache.take("b")
    cache.add_staged("c", _packed(100))
    assert "waited-for" in cache and "b" not in cache and "c" in cache
    cache.add_staged("d", _packed(100))  # only pinned entries left to evict: over budget, kept
    assert set(cache._entries) == {"waited-for", "c", "d"} and cache.bytes_used == 300
