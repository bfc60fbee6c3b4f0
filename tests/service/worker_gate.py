"""Hold an EngineWorker inside one call, so that everything submitted meanwhile is ready at once."""

from __future__ import annotations

import threading

from mintd.engine.engine import Engine
from mintd.service.scheduler import EngineWorker


class Gate:
    """`Gate(worker)` returns once the worker is held; `open()` lets it go on."""

    def __init__(self, worker: EngineWorker, timeout: float = 10.0) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.timeout = timeout

        def hold(_engine: Engine) -> None:
            self.entered.set()
            self.release.wait(timeout)

        self.thread = threading.Thread(target=worker.call, args=(hold,), daemon=True)
        self.thread.start()
        assert self.entered.wait(timeout), "the engine worker never picked up the gate"

    def open(self) -> None:
        self.release.set()
        self.thread.join(self.timeout)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()
