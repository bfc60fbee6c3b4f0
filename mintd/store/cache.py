"""A byte-bounded local disk cache of blobs: the disk tier under the host cache when blobs live remotely.

Entries are ordinary `BlobStore` files, so an entry is whole or absent after a crash and is read (or
memory-mapped) like any local blob. Only verified content enters (`add_stream` checks the hash while
writing). When the cached bytes pass the budget, the least recently used entries are deleted, except
those used in the last `in_use_s` seconds: a caller that just received a path is about to read it, and
deleting it underneath would fail that request. So the budget may be exceeded briefly while more than a
budget's worth of blobs is in use at once. Recency survives a restart as file modification times.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from mintd.store.blobs import BlobStore


class BlobCache:
    def __init__(self, root: Path | str, budget_bytes: int, in_use_s: float = 60.0) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"blob_cache_budget: {budget_bytes} must be a positive number of bytes")
        self.store = BlobStore(root)
        self.budget = budget_bytes
        self.in_use_s = in_use_s
        self._lock = threading.Lock()
        # sha -> (size, last use), least recently used first
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()
        found = []
        for sha in self.store.iter_hashes():
            st = self.store.path(sha).stat()
            found.append((st.st_mtime, sha, st.st_size))
        for mtime, sha, size in sorted(found):
            self._entries[sha] = (size, mtime)
        self.bytes = sum(size for size, _ in self._entries.values())
        self._evict(in_use_s=0.0)  # nothing is in use yet in a new process

    def lookup(self, sha: str) -> Path | None:
        """The cached file, marked as just used; None when absent."""
        path = self.store.path(sha)
        with self._lock:
            entry = self._entries.get(sha)
            if entry is None:
                return None
            if not path.is_file():  # removed behind our back: forget it
                self._forget(sha)
                return None
            now = time.time()
            self._entries[sha] = (entry[0], now)
            self._entries.move_to_end(sha)
        os.utime(path, (now, now))
        return path

    def add_stream(self, sha: str, chunks: Iterable[bytes]) -> Path:
        """Write a blob arriving in chunks; BlobCorrupt (nothing cached) when it does not hash to `sha`."""
        self.store.put_stream(chunks, expect=sha)
        return self._admit(sha)

    def add_file(self, path: Path | str) -> tuple[str, Path]:
        """Cache a local file's content; (its sha256, the cached copy)."""
        sha = self.store.put_file(path)
        return sha, self._admit(sha)

    def add_bytes(self, sha: str, data: bytes) -> Path:
        """Cache content the caller has just hashed to `sha` (a write-through of a fresh save)."""
        self.store.put(data)
        return self._admit(sha)

    def discard(self, sha: str) -> None:
        with self._lock:
            self._forget(sha)

    def _admit(self, sha: str) -> Path:
        path = self.store.path(sha)
        with self._lock:
            if sha in self._entries:
                self.bytes -= self._entries[sha][0]
            size = path.stat().st_size
            self._entries[sha] = (size, time.time())
            self._entries.move_to_end(sha)
            self.bytes += size
        self._evict()
        return path

    def _forget(self, sha: str) -> None:
        entry = self._entries.pop(sha, None)
        if entry is not None:
            self.bytes -= entry[0]
        self.store.delete(sha)

    def _evict(self, in_use_s: float | None = None) -> None:
        with self._lock:
            recent = time.time() - (self.in_use_s if in_use_s is None else in_use_s)
            for sha, (_size, used) in list(self._entries.items()):
                if self.bytes <= self.budget:
                    return
                if used < recent:
                    self._forget(sha)
