"""Service fixtures: one real tiny engine per test module, and a worker over it per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mintd.catalog import Revision
from mintd.engine.engine import Engine
from mintd.residency import Residency
from mintd.service.futures import FutureStore
from mintd.service.scheduler import EngineWorker, SchedulerLimits
from mintd.store.packed import PackedAdapter

GAP_S = 1.0  # seq_gap_timeout_s of the `worker` fixture


@pytest.fixture(scope="module")
def engine(qwen3_dir: Path) -> Engine:
    return Engine(qwen3_dir)


@pytest.fixture
def futures() -> FutureStore:
    return FutureStore(retention_s=600)


def make_worker(engine: Engine, futures: FutureStore, limits: SchedulerLimits, name: str) -> EngineWorker:
    """A worker with a residency of its own (1 GiB device and host budgets) over `engine`."""

    def read(rev: Revision) -> PackedAdapter:
        raise ValueError(f"{rev.ref}: these tests sample no saved adapters")

    return EngineWorker(engine, futures, limits, name, Residency(engine, read, 2**30, 2**30, name))


@pytest.fixture
def worker(engine: Engine, futures: FutureStore) -> Iterator[EngineWorker]:
    w = make_worker(engine, futures, SchedulerLimits(seq_gap_timeout_s=GAP_S), "test")
    yield w
    w.stop()
