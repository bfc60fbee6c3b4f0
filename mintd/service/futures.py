"""Futures: every queued request gets an id at once; its result is fetched later by long-poll.

Submissions are idempotent by their natural key (for example `(model_id, seq_id)`): the SDK may send
the same request twice (its outer retry loop makes a new idempotency header each time), and the second
one must get the first one's id rather than run again. Results are kept `retention_s` after they
complete; after that a poll gets "expired" (HTTP 410 upstream).

A future belongs to the owner who submitted it, and its id is 128 random bits: another owner's id is
as unknown as a made-up one. Each future may name the session it works for, so that polling keeps
that session alive and a session with work in flight is never reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Category = Literal["user", "server", "unknown"]


class RequestError(Exception):
    """A failure the client should see as a terminal error with this category."""

    def __init__(self, message: str, category: Category = "user") -> None:
        super().__init__(message)
        self.category = category


@dataclass
class Future:
    request_id: str
    kind: str
    owner: str
    session_id: str | None = None
    created_at: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    result: Any = None
    error: RequestError | None = None
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    _callbacks: list[Callable[[Future], None]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.done_at is not None


class FutureStore:
    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._by_key: dict[tuple, str] = {}
        self._key_of: dict[str, tuple] = {}  # request id -> its key, to forget both at once
        # (done_at, request id) in the order futures completed, which is the order they expire in: a
        # request never scans the retained futures (tens of thousands on a busy server)
        self._completed: deque[tuple[float, str]] = deque()
        self._pending: dict[str, int] = {}  # session id -> futures not yet done

    def create(
        self, kind: str, owner: str, key: tuple | None = None, session_id: str | None = None
    ) -> tuple[Future, bool]:
        """(future, created). An existing future for `key` is returned with created=False; keys are
        built from objects the caller already proved it owns, so they never cross owners."""
        with self._lock:
            self._expire()
            if key is not None and key in self._by_key:
                existing = self._futures.get(self._by_key[key])
                if existing is not None:
                    return existing, False
            fut = Future(f"req-{secrets.token_urlsafe(16)}", kind, owner, session_id)
            self._futures[fut.request_id] = fut
            if key is not None:
                self._by_key[key] = fut.request_id
                self._key_of[fut.request_id] = key
            if session_id is not None:
                self._pending[session_id] = self._pending.get(session_id, 0) + 1
            return fut, True

    def known(self, key: tuple) -> bool:
        """Whether a future was made for `key` (a retried request, which is answered, not refused)."""
        with self._lock:
            return key in self._by_key

    def get(self, request_id: str, owner: str) -> Future | None:
        """The caller's future, or None: unknown, expired and another owner's look the same."""
        with self._lock:
            self._expire()
            fut = self._futures.get(request_id)
        return fut if fut is not None and fut.owner == owner else None

    def busy_sessions(self) -> set[str]:
        """Sessions with work submitted and not yet done."""
        with self._lock:
            return set(self._pending)

    def resolve(self, fut: Future, result: Any = None, error: RequestError | None = None) -> None:
        """Called from any thread; wakes every long-poll waiting on `fut`."""
        with self._lock:
            if fut.done_at is None and fut.session_id is not None:
                left = self._pending.get(fut.session_id, 1) - 1
                if left:
                    self._pending[fut.session_id] = left
                else:
                    self._pending.pop(fut.session_id, None)
            fut.result, fut.error, fut.done_at = result, error, time.monotonic()
            self._completed.append((fut.done_at, fut.request_id))
            waiters, fut._waiters = fut._waiters, []
            callbacks, fut._callbacks = fut._callbacks, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)
        for callback in callbacks:
            callback(fut)

    def on_done(self, fut: Future, callback: Callable[[Future], None]) -> None:
        """Call `callback(fut)` once `fut` is resolved (at once if it already is), on the resolving
        thread: for in-process consumers such as evaluation runs, which wait on many futures at once."""
        with self._lock:
            if not fut.done:
                fut._callbacks.append(callback)
                return
        callback(fut)

    async def wait(self, fut: Future, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `fut`; True if it is done."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if fut.done:
                return True
            fut._waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:  # a poll that timed out (or was cancelled) leaves no waiter behind on a pending future
            with self._lock, contextlib.suppress(ValueError):
                fut._waiters.remove(waiter)
        return fut.done

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.retention_s
        while self._completed and self._completed[0][0] < cutoff:
            _, request_id = self._completed.popleft()
            self._futures.pop(request_id, None)
            key = self._key_of.pop(request_id, None)
            if key is not None and self._by_key.get(key) == request_id:
                del self._by_key[key]
