"""Packed adapter -> engine slot: which dtype a slot holds, and what that costs in bytes."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from mintd.config import EngineSettings
from mintd.engine.adapters import AdapterSlots, BufferWeights
from mintd.engine.engine import Engine
from mintd.engine.sampling import SampleRequest, SamplingParams
from mintd.engine.tiny import random_adapter
from mintd.residency.device import frozen_view, load_packed_into
from mintd.store.packed import pack, read_packed


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


def test_an_adopted_slot_is_a_handful_of_objects_with_the_same_answers(qwen3_dir: Path) -> None:
    """A frozen CPU slot reads its weights from the packed buffer when asked: Python's full
    collections scan every object a resident adapter keeps, and views kept per matrix made that 60."""
    engine = Engine(qwen3_dir, EngineSettings())
    blobs = [pack(*random_adapter(engine, 1 + i % 8, seed=i), engine.fingerprint) for i in range(40)]
    packed = [read_packed(b) for b in blobs]
    gc.collect()
    before = len(gc.get_objects())
    slots = [engine.slots.add(frozen_view(engine, p)) for p in packed]
    gc.collect()
    assert (len(gc.get_objects()) - before) / len(slots) <= 20
    params = SamplingParams(max_tokens=6, temperature=0.0)
    adopted = engine.sample([SampleRequest(s, [1, 2, 3], params) for s in slots[:8]])
    copied = [load_packed_into(engine, b) for b in blobs[:8]]
    assert [r.sequences[0].tokens for r in adopted] == [
        r.sequences[0].tokens for r in engine.sample([SampleRequest(s, [1, 2, 3], params) for s in copied])
    ]


def test_adopting_checks_the_buffer_against_the_base_model(qwen3_dir: Path) -> None:
    engine = Engine(qwen3_dir, EngineSettings())
    spec, tensors = random_adapter(engine, 4, seed=1)
    weights = frozen_view(engine, read_packed(pack(spec, tensors, engine.fingerprint))).weights
    assert isinstance(weights, BufferWeights)
    name, (a, b) = next(iter(weights.pieces.items()))
    cases = {
        "has shape": {**weights.pieces, name: (a._replace(shape=(a.shape[0], a.shape[1] - 1)), b)},
        "missing": {k: v for k, v in weights.pieces.items() if k != name},
        "unknown target": {**weights.pieces, "model.layers.9.mlp.up_proj": (a, b)},
    }
    for message, pieces in cases.items():
        fresh = AdapterSlots(engine.slots.targets, engine.device)  # nothing checked yet
        with pytest.raises(ValueError, match=message):
            fresh.adopt(spec, BufferWeights(weights.groups, pieces))
