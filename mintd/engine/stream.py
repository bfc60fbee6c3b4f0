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
    logprob: float  # under the distribution it was sampled from (temperature, top-k, top-p)
    stop_reason: str | None  # set on a sample's last token: "stop" or "length"
    # with a stream's `score_top`: the token's logprob under the model's own distribution (temperature 1,
    # what a forward pass over prompt + answer reports), and the most likely tokens there
    score: float | None = None
    alternatives: tuple[tuple[int, float], ...] = ()


class TokenStream:
    def __init__(self, score_top: int | None = None) -> None:
        """`score_top`: also score each token (see TokenEvent), with this many alternatives."""
        self.score_top = score_top
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
