"""Tokens of one sample request as the engine makes them, for a reader on another thread.

The engine pushes each new token of each of the request's samples as soon as the step that made it
is done, and closes the stream when the request ends. A reader that goes away (a client that
disconnected) calls `cancel()`; the engine then drops the request's rows at its next step, so they
stop costing decode work.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenEvent:
    sample_index: int
    token: int
    logprob: float
    stop_reason: str | None  # set on a sample's last token: "stop" or "length"


class TokenStream:
    def __init__(self) -> None:
        self._events: queue.SimpleQueue[TokenEvent | None] = queue.SimpleQueue()
        self._cancelled = threading.Event()

    # the engine's side

    def push(self, event: TokenEvent) -> None:
        self._events.put(event)

    def close(self) -> None:
        """No more events (the request finished, failed or was cancelled)."""
        self._events.put(None)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # the reader's side

    def cancel(self) -> None:
        self._cancelled.set()

    def get(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event, or None once the stream is closed; raises queue.Empty after `timeout`."""
        return self._events.get(timeout=timeout)
