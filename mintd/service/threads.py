"""Which threads may run torch's parallel CPU ops, and why it matters.

On Linux torch's CPU ops run on libgomp (OpenMP). Each thread that runs a parallel op gets a team of
worker threads that lives until that thread exits, and once a process holds more OpenMP threads than it
has cores, libgomp's workers spin only ~100 times before sleeping instead of ~300,000: every parallel op
then wakes a sleeping worker and waits for it. A server that loaded its models on the main thread and
steps on an engine thread is in that state for good (2 cores: decode steps under serving load took
2.1x as long, and the second core sat three-quarters idle). So startup's heavy torch work runs on a
passing thread, whose team ends with it, and the engine threads are the process's only lasting teams.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a thread that exits once it returns (or raises), taking its OpenMP team with it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mintd-startup") as pool:
        return pool.submit(fn).result()
