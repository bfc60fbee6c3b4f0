"""Iteration-level scheduling in the worker: training and sampling take turns, and a short sample
finishes while a long one is still decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.engine import Engine
from mintd.engine.optim import AdamParams
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.stream import TokenEvent, TokenStream
from mintd.engine.train import Datum, TrainGroup
from mintd.residency import RunKey
from mintd.service.futures import Future, FutureStore
from mintd.service.scheduler import CallOp, EngineWorker, SampleOp, SchedulerLimits, TrainOp
from tests.service.conftest import make_worker
from tests.service.test_scheduler import new_run, submit, wait_done
from tests.service.worker_gate import Gate

STEPS = 4


class CountingStream(TokenStream):
    """A stream that also counts what was pushed so far (read from the worker thread's callbacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.pushed = 0

    def push(self, event: TokenEvent) -> None:
        self.pushed += 1
        super().push(event)


def _datum(seed: int) -> Datum:
    ids = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(seed))
    return Datum(ids[:-1], {"target_tokens": ids[1:]})


def _training(worker: EngineWorker, futures: FutureStore, run: str, seed: int, on_loss: Any) -> list[Future]:
    """STEPS iterations of forward_backward + optim_step on a fresh adapter, all submitted at once."""
    slot = new_run(worker, run, seed)
    futs = []
    for i in range(STEPS):
        group = TrainGroup(BASE_SLOT, [_datum(seed * 100 + i), _datum(seed * 100 + i + 50)])
        futs.append(submit(worker, futures, run, 2 * i + 1, TrainOp(RunKey(run), group, False, on_loss)))
        step = CallOp(lambda e, slot=slot: e.optim_step(slot, AdamParams(learning_rate=1e-2)))
        futs.append(submit(worker, futures, run, 2 * i + 2, step))
    return futs


def _losses(futs: list[Future]) -> list[float]:
    return [wait_done(f, timeout=60).result for f in futs[::2]]


def test_two_training_runs_and_two_sampling_streams_progress_together(
    worker: EngineWorker, futures: FutureStore, engine: Engine, qwen3_dir: Path
) -> None:
    streams = [CountingStream(), CountingStream()]
    adapter = worker.call(lambda e: e.snapshot(e.create_adapter(LoraSpec(rank=8, seed=9))))
    sample_futs = []
    tokens_at_loss: list[tuple[int, int]] = []

    def on_loss(out: Any) -> float:
        tokens_at_loss.append((streams[0].pushed, streams[1].pushed))
        return out.loss

    params = SamplingParams(max_tokens=300, temperature=0.0, stop=[])
    with Gate(worker):
        for i, (slot, stream) in enumerate(zip((BASE_SLOT, adapter), streams, strict=True)):
            fut, _ = futures.create("Sample", "local")
            request = SampleRequest(slot, [5 + i, 6, 7], params, stream=stream)
            worker.submit_sample(fut, SampleOp(request, lambda r: r, f"sampler{i}"))
            sample_futs.append(fut)
        runs = [_training(worker, futures, run, seed, on_loss) for run, seed in (("a", 1), ("b", 2))]
    together = [_losses(futs) for futs in runs]
    assert all(not f.done for f in sample_futs), "training finished while both streams still decode"
    first, last = tokens_at_loss[0], tokens_at_loss[-1]
    assert all(n < 300 for n in last)
    assert all(b > a for a, b in zip(first, last, strict=True)), (
        f"the streams made tokens between the first and the last training step: {tokens_at_loss}"
    )
    for fut in sample_futs:
        assert len(wait_done(fut, timeout=120).result.sequences[0].tokens) == 300

    solo_worker = make_worker(Engine(qwen3_dir), futures, SchedulerLimits(), "solo")
    try:
        for (run, seed), got in zip((("a", 1), ("b", 2)), together, strict=True):
            alone = _losses(_training(solo_worker, futures, run, seed, lambda out: out.loss))
            assert got == pytest.approx(alone, rel=1e-4)
    finally:
        solo_worker.stop()


def test_a_short_sample_finishes_while_a_long_one_decodes(worker: EngineWorker, futures: FutureStore) -> None:
    long_stream = CountingStream()
    long_fut, _ = futures.create("Sample", "local")
    long_params = SamplingParams(max_tokens=400, temperature=0.0, stop=[])
    worker.submit_sample(
        long_fut,
        SampleOp(SampleRequest(BASE_SLOT, [1, 2, 3], long_params, stream=long_stream), lambda r: r, "l"),
    )
    assert long_stream.get(timeout=30) is not None  # decoding has started
    short_fut, _ = futures.create("Sample", "local")
    short = SampleRequest(BASE_SLOT, [9, 8, 7, 6], SamplingParams(max_tokens=4, temperature=0.0, stop=[]))
    worker.submit_sample(short_fut, SampleOp(short, lambda r: r, "s"))
    assert len(wait_done(short_fut, timeout=60).result.sequences[0].tokens) == 4
    assert not long_fut.done and long_stream.pushed < 400
    assert len(wait_done(long_fut, timeout=120).result.sequences[0].tokens) == 400
