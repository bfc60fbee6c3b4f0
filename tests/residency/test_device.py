"""Packed adapter -> engine slot: which dtype a slot holds, and what that costs in bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mintd.config import EngineSettings
from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.tiny import random_adapter
from mintd.residency.device import load_packed_into
from mintd.store.packed import pack


def dtypes(engine: Engine, slot: int) -> set[torch.dtype]:
    return {t.dtype for pair in engine.slots[slot].weights.values() for t in pair}


def test_frozen_slots_hold_the_engines_frozen_dtype_and_training_keeps_float32(qwen3_dir: Path) -> None:
    """On a GPU a bfloat16 engine serves frozen adapters in bfloat16 (half the bytes the residency
    budget counts); here a CPU bfloat16 engine is given that dtype to check the mechanics: frozen
    loads and snapshots take it, trainable slots stay float32 masters, and answers stay the same."""
    engine = Engine(qwen3_dir, EngineSettings(dtype="bfloat16"))
    assert engine.slots.frozen_dtype == torch.float32  # the CPU default: products run in float32
    spec, tensors = random_adapter(engine, 8, seed=1)
    blob = pack(spec, tensors, engine.fingerprint)
    full = load_packed_into(engine, blob)
    engine.slots.frozen_dtype = torch.bfloat16  # what a bfloat16 engine on a GPU picks
    half = load_packed_into(engine, blob)
    run = load_packed_into(engine, blob, trainable=True)
    snapshot = engine.snapshot(run)
    assert dtypes(engine, full) == dtypes(engine, run) == {torch.float32}
    assert dtypes(engine, half) == dtypes(engine, snapshot) == {torch.bfloat16}
    assert 2 * engine.slots[half].nbytes == engine.slots[full].nbytes

    params = SamplingParams(max_tokens=8, temperature=0.0)
    answers = engine.sample([SampleRequest(s, [3, 14, 15, 92], params) for s in (full, half, snapshot)])
    first, *rest = [a.sequences[0] for a in answers]
    for other in rest:
        assert other.tokens == first.tokens
        assert other.logprobs == pytest.approx(first.logprobs, abs=0.05)
