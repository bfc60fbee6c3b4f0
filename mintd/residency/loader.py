"""The loader thread: cold loads (fetch, read, verify) off the engine thread, most urgent first.

A load reads a revision's blob (from the object store through the disk cache when there is one),
checks every checksum and the base model, and stages the result in the host tier, with its slot
already built when that needs no copy (a CPU engine adopts views of the buffer); the engine thread then
only adds that slot, or copies the adapter into one, between batches. A failed load (a corrupt or
missing blob) is kept as an error for the one request that asked, and nothing is cached, so a repaired
blob loads next time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from mintd.catalog import Revision
from mintd.residency.host import HostCache, Staged
from mintd.store.packed import PackedAdapter

log = logging.getLogger(__name__)

Read = Callable[[Revision], PackedAdapter]  # verified bytes of a revision; ValueError when unusable
Stage = Callable[[Revision], Staged]  # a revision read and made ready for its slot


class Loader:
    def __init__(self, stage: Stage, host: HostCache, name: str) -> None:
        self.stage = stage
        self.host = host
        self.on_done: Callable[[str], None] = lambda key: None  # the engine worker's wake-up, by hash
        self._cv = threading.Condition()
        self._queue: list[tuple[int, int, Revision]] = []  # (priority, arrival, revision)
        self._pending: dict[str, int] = {}  # content hash -> priority, queued or in flight
        self._failed: dict[str, ValueError] = {}
        self._order = itertools.count()
        self._in_flight = 0
        self._load_ms: list[float] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"loader-{name}", daemon=True)
        self._thread.start()

    def request(self, rev: Revision, priority: int) -> None:
        """Queue a load unless one is queued or in flight already (any thread)."""
        with self._cv:
            key = rev.content_hash
            if key in self._pending or key in self._failed or key in self.host:
                return
            self._pending[key] = priority
            heapq.heappush(self._queue, (priority, next(self._order), rev))
            self._cv.notify()

    def pending(self, key: str) -> bool:
        return key in self._pending

    def failure(self, key: str) -> ValueError | None:
        """The error of a failed load, handed out once (the next request loads again)."""
        with self._cv:
            return self._failed.pop(key, None)

    def has_failure(self, key: str) -> bool:
        return key in self._failed

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def load_ms(self) -> list[float]:
        return list(self._load_ms)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._queue:
                    self._cv.wait()
                if self._stop:
                    return
                _, _, rev = heapq.heappop(self._queue)
                self._in_flight += 1
            started = time.perf_counter()
            try:
                self.host.add_staged(rev.content_hash, self.stage(rev))
                failure = None
            except ValueError as exc:
                failure = exc
            except Exception as exc:  # noqa: BLE001 - the loader outlives a bug in one load
                log.exception("loading %s failed", rev.ref)
                failure = ValueError(f"internal error loading {rev.ref}: {type(exc).__name__}")
            with self._cv:
                self._in_flight -= 1
                del self._pending[rev.content_hash]
                if failure is not None:
                    self._failed[rev.content_hash] = failure
                else:
                    self._load_ms.append((time.perf_counter() - started) * 1000)
                    del self._load_ms[:-1000]
            self.on_done(rev.content_hash)
