"""EngineWorker without HTTP, over a real tiny engine: seq order, seq gaps, duplicates, merging."""

from __future__ import annotations

import gc
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mintd.catalog import Provenance as CatalogProvenance
from mintd.catalog import Revision
from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.tiny import random_adapter
from mintd.engine.train import Datum, TrainGroup
from mintd.residency import Residency, RunKey
from mintd.service.futures import Future, FutureStore
from mintd.service.scheduler import CallOp, EngineWorker, SampleOp, SchedulerLimits, TrainOp
from mintd.store.packed import PackedAdapter, pack, read_packed
from tests.service.conftest import GAP_S, make_worker
from tests.service.worker_gate import Gate


def wait_done(fut: Future, timeout: float = 10.0) -> Future:
    deadline = time.monotonic() + timeout
    while not fut.done:
        assert time.monotonic() < deadline, f"{fut.kind} {fut.request_id} did not complete in {timeout}s"
        time.sleep(0.005)
    return fut


def submit(
    worker: EngineWorker, futures: FutureStore, model_id: str, seq_id: int, op: TrainOp | CallOp
) -> Future:
    fut, _ = futures.create(type(op).__name__, "local", ("run", model_id, seq_id))
    worker.submit_run_op(model_id, seq_id, fut, op)
    return fut


def record(log: list[Any], tag: Any, delay: float = 0.0) -> CallOp:
    def fn(_engine: Engine) -> Any:
        log.append(tag)
        if delay:
            time.sleep(delay)
        return tag

    return CallOp(fn)


def train_op(model_id: str, log: list[Any], tag: Any, seed: int = 0) -> TrainOp:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (9,), generator=g)
    group = TrainGroup(BASE_SLOT, [Datum(ids[:-1], {"target_tokens": ids[1:]})])

    def finish(out: Any) -> Any:
        log.append(tag)
        return out.loss

    return TrainOp(RunKey(model_id), group, forward_only=False, finish=finish)


def new_run(worker: EngineWorker, model_id: str, seed: int = 0) -> int:
    """A training run's adapter, registered with residency and the worker; its slot."""

    def create(engine: Engine) -> int:
        slot = engine.create_adapter(LoraSpec(rank=4, seed=seed))
        worker.residency.add_run(RunKey(model_id), slot)
        return slot

    slot = worker.call(create)
    worker.add_run(model_id)
    return slot


def test_out_of_order_submissions_run_in_seq_order(worker: EngineWorker, futures: FutureStore) -> None:
    worker.add_run("m")
    log: list[int] = []
    assert [wait_done(f).result for f in [submit(worker, futures, "m", s, record(log, s)) for s in (3, 2, 1)]]
    assert log == [1, 2, 3]


def test_an_op_without_seq_id_runs_after_everything_submitted_before_it(
    worker: EngineWorker, futures: FutureStore
) -> None:
    worker.add_run("m")
    log: list[Any] = []
    first = [submit(worker, futures, "m", s, record(log, s)) for s in (1, 3)]  # seq 2 still to come
    after, _ = futures.create("CallOp", "local")
    worker.submit_after_run("m", after, record(log, "after"))
    time.sleep(0.1)
    assert log == [1]  # waits for seq 2 and 3, which were submitted (or awaited) before it
    later = [submit(worker, futures, "m", s, record(log, s)) for s in (2, 4)]  # consumes no seq_id
    for f in [*first, after, *later]:
        assert wait_done(f).error is None, f.error
    assert log == [1, 2, 3, "after", 4]


def test_mixed_ops_in_random_arrival_order_run_in_seq_order(
    worker: EngineWorker, futures: FutureStore
) -> None:
    """forward_backward (batchable) and calls (optim_step, save, ...) interleaved, arriving shuffled."""
    new_run(worker, "m")
    log: list[int] = []
    ops: dict[int, Callable[[], TrainOp | CallOp]] = {
        s: (lambda s=s: train_op("m", log, s, seed=s)) if s % 3 else (lambda s=s: record(log, s))
        for s in range(1, 13)
    }
    order = list(ops)
    random.Random(0).shuffle(order)
    futs = [submit(worker, futures, "m", s, ops[s]()) for s in order]
    for f in futs:
        assert wait_done(f).error is None, f.error
    assert log == sorted(ops)


def test_seq_gap_fails_the_run_naming_the_missing_seq_id(worker: EngineWorker, futures: FutureStore) -> None:
    worker.add_run("gap")
    worker.add_run("other")
    log: list[Any] = []
    assert wait_done(submit(worker, futures, "gap", 1, record(log, 1))).error is None
    started = time.monotonic()
    early = submit(worker, futures, "gap", 3, record(log, 3))  # seq 2 never comes
    wait_done(early, timeout=GAP_S + 5)
    waited = time.monotonic() - started
    assert early.error is not None and early.error.category == "user"
    assert "seq_id 2" in str(early.error) and "never arrived" in str(early.error), early.error
    assert waited >= GAP_S * 0.9, f"the run failed after {waited:.2f}s, before seq_gap_timeout_s"
    for late_seq in (2, 4):  # the missing one arriving late, and later ones: all get the run's error
        late = wait_done(submit(worker, futures, "gap", late_seq, record(log, late_seq)), timeout=1.0)
        assert late.error is not None and "seq_id 2" in str(late.error), late.error
    assert log == [1], "nothing after the gap may run"
    other = wait_done(submit(worker, futures, "other", 1, record(log, "other")))
    assert other.error is None and log == [1, "other"], "another run on the same worker is unaffected"


def test_a_stalled_run_fails_on_time_while_other_runs_keep_the_worker_busy(
    worker: EngineWorker, futures: FutureStore
) -> None:
    worker.add_run("busy")
    worker.add_run("gap")
    log: list[Any] = []
    gate = Gate(worker)
    busy = [submit(worker, futures, "busy", s, record(log, s, delay=0.1)) for s in range(1, 31)]
    stalled = submit(worker, futures, "gap", 2, record(log, "never"))  # seq 1 never comes
    started = time.monotonic()
    gate.open()
    wait_done(stalled, timeout=GAP_S + 5)
    failed_after = time.monotonic() - started
    assert stalled.error is not None and "seq_id 1" in str(stalled.error)
    assert not busy[-1].done, (
        f"the stalled run was failed only after {failed_after:.1f}s, when the busy run had drained"
    )
    assert failed_after < GAP_S + 1.5
    for f in busy:
        assert wait_done(f).error is None
    assert "never" not in log


def test_duplicate_seq_id_is_rejected(worker: EngineWorker, futures: FutureStore) -> None:
    worker.add_run("m")
    log: list[Any] = []
    waiting = submit(worker, futures, "m", 2, record(log, "first 2"))
    dup_fut, _ = futures.create("CallOp", "local")  # a second submission of seq 2 while the first still waits
    worker.submit_run_op("m", 2, dup_fut, record(log, "second 2"))
    wait_done(dup_fut, timeout=1.0)
    assert dup_fut.error is not None and "seq_id 2 was already used" in str(dup_fut.error)
    assert not waiting.done
    assert wait_done(submit(worker, futures, "m", 1, record(log, 1))).error is None
    assert wait_done(waiting).error is None
    replay, _ = futures.create("CallOp", "local")  # and once it has run
    worker.submit_run_op("m", 1, replay, record(log, "second 1"))
    assert "seq_id 1 was already used" in str(wait_done(replay, timeout=1.0).error)
    assert log == [1, "first 2"]


def test_unknown_run_is_an_error(worker: EngineWorker, futures: FutureStore) -> None:
    fut, _ = futures.create("CallOp", "local")
    worker.submit_run_op("nobody", 1, fut, record([], 1))
    assert "unknown model_id nobody" in str(wait_done(fut, timeout=1.0).error)


def test_ready_train_ops_of_different_runs_share_one_engine_call(
    worker: EngineWorker, futures: FutureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots = [new_run(worker, f"r{i}", seed=i) for i in range(3)]
    calls: list[list[int]] = []
    real = worker.engine.forward_backward

    def spy(groups: list[TrainGroup], forward_only: bool = False) -> Any:
        calls.append([g.slot for g in groups])
        return real(groups, forward_only)

    monkeypatch.setattr(worker.engine, "forward_backward", spy)
    log: list[Any] = []
    gate = Gate(worker)
    futs = [submit(worker, futures, f"r{i}", 1, train_op(f"r{i}", log, i, seed=i)) for i in range(3)]
    gate.open()
    merged = [wait_done(f).result for f in futs]
    assert [sorted(c) for c in calls] == [slots], f"expected one merged call over {slots}, got {calls}"

    monkeypatch.setattr(worker.engine, "forward_backward", real)
    alone = []
    for i in range(3):  # the same work one run at a time gives the same losses (rows are independent)
        new_run(worker, f"solo{i}", seed=i)
        alone.append(
            wait_done(submit(worker, futures, f"solo{i}", 1, train_op(f"solo{i}", log, i, seed=i))).result
        )
    assert merged == pytest.approx(alone, rel=1e-5)


def test_the_step_engine_counts_rows_not_requests(
    engine: Engine, futures: FutureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests of 4 samples each under an 8-row cap: two decode together, the third joins when
    they have finished (never more than 8 rows in a step)."""
    worker = make_worker(engine, futures, SchedulerLimits(max_sample_rows=8), "rows")
    rows: list[int] = []
    real = engine.step

    def spy() -> Any:
        rows.append(engine.steps.running_rows)
        return real()

    monkeypatch.setattr(engine, "step", spy)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    try:
        with Gate(worker):
            futs = []
            for i in range(3):
                fut, _ = futures.create("Sample", "local")
                request = SampleRequest(BASE_SLOT, [1, 2, 3], params, num_samples=4)
                worker.submit_sample(fut, SampleOp(request, lambda result: result, f"s{i}"))
                futs.append(fut)
        assert all(wait_done(f).error is None for f in futs)
        assert max(rows) == 8 and rows[-1] == 4, rows
    finally:
        worker.stop()


def _revision(n: int, engine: Engine) -> Revision:
    return Revision(
        n, "local", f"cold{n}", f"a{n}", 1, "sampler", f"{n:064x}", None,
        CatalogProvenance(engine.fingerprint), None, 0.0, None, None, {},
    )  # fmt: skip


def test_requests_waiting_on_cold_loads_are_not_looked_at_every_step(
    engine: Engine, futures: FutureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wave of requests whose loads cannot finish yet: each waiting queue is asked about once, not
    once per step, while resident (base) traffic decodes; each is answered once its load lands."""
    blobs = {}
    for n in range(40):
        spec, tensors = random_adapter(engine, 4, seed=n)
        blobs[f"{n:064x}"] = pack(spec, tensors, engine.fingerprint)
    loads_may_finish = threading.Event()

    def read(rev: Revision) -> PackedAdapter:
        loads_may_finish.wait(30)
        return read_packed(blobs[rev.content_hash])

    residency = Residency(engine, read, 2**30, 2**30, "cold")
    worker = EngineWorker(engine, futures, SchedulerLimits(), "cold", residency)
    asked: list[str] = []
    real = residency.ready

    def counted(key: Any, priority: int = 1) -> bool:
        asked.append(key.content_hash)
        return real(key, priority)

    monkeypatch.setattr(residency, "ready", counted)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    try:
        cold = []
        for n in range(40):
            fut, _ = futures.create("Sample", "local")
            request = SampleRequest(BASE_SLOT, [1, 2, 3], params)
            worker.submit_sample(fut, SampleOp(request, lambda r: r, f"cold{n}", _revision(n, engine)))
            cold.append(fut)
        base = []
        for i in range(4):  # resident traffic: many steps while the wave waits
            fut, _ = futures.create("Sample", "local")
            worker.submit_sample(
                fut, SampleOp(SampleRequest(BASE_SLOT, [4, 5], params), lambda r: r, f"b{i}")
            )
            base.append(fut)
        assert all(wait_done(f).error is None for f in base)
        assert not any(f.done for f in cold)
        assert len(asked) <= 2 * 40, f"{len(asked)} readiness checks for 40 waiting queues"
        loads_may_finish.set()
        results = [wait_done(f).result for f in cold]
        alone = [
            engine.sample(
                [SampleRequest(engine.load_adapter(*random_adapter(engine, 4, n)), [1, 2, 3], params)]
            )
            for n in range(2)
        ]
        assert [r.sequences[0].tokens for r in results[:2]] == [a[0].sequences[0].tokens for a in alone]
    finally:
        worker.stop()


def test_the_worker_keeps_the_heap_between_rounds(engine: Engine, futures: FutureStore) -> None:
    limits = SchedulerLimits(heap_trim_interval_s=1e-9, full_gc_interval_s=1e-9)
    saved = gc.get_threshold()
    worker = make_worker(engine, futures, limits, "trim")
    try:
        assert gc.get_threshold()[2] > saved[2]  # Python's own full collections are off meanwhile
        new_run(worker, "r")
        wait_done(submit(worker, futures, "r", 1, train_op("r", [], 0)))
        assert worker.heap.trims >= 1 and worker.heap.full_gcs >= 1
    finally:
        worker.stop()
    assert gc.get_threshold() == saved


def test_an_idle_worker_still_keeps_the_heap(engine: Engine, futures: FutureStore) -> None:
    """With no work at all, the worker takes an empty round each second: the heap upkeep (and the
    parking of idle runs) does not wait for a request."""
    worker = make_worker(engine, futures, SchedulerLimits(full_gc_interval_s=1e-9), "idle")
    try:
        deadline = time.monotonic() + 10
        while worker.heap.full_gcs < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.heap.full_gcs >= 2
    finally:
        worker.stop()
