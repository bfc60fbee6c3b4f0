"""Run writers in threads and collect what they return, re-raising the first failure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_writers(count: int, writer: Callable[[int], list[T]]) -> list[T]:
    """`writer(k)` for k in range(count), concurrently; the concatenated results."""
    results: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        try:
            out = writer(k)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the caller's thread
            errors.append(exc)
            return
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
