"""Segment LoRA math on a flat token batch equals each token's own adapter applied alone."""

from __future__ import annotations

import torch

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.lora_flat import FlatLoraBatch, TorchBackend, WeightCache, merge_segments, plan_groups


def _frozen(engine, rank: int, seed: int) -> int:
    slot = engine.create_adapter(LoraSpec(rank=rank, seed=seed))
    with torch.no_grad():
        for _, b in engine.slots[slot].weights.values():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed)))
    return engine.snapshot(slot)


def test_segments_of_unequal_lengths_match_a_per_token_reference(engine) -> None:
    a, b, c = _frozen(engine, 4, 1), _frozen(engine, 4, 2), _frozen(engine, 8, 3)
    # base, then a rank-4 group of two adapters with unequal segments, then a rank-8 adapter
    token_slots = [BASE_SLOT] * 2 + [a] * 3 + [b] * 1 + [c] * 2
    segments = merge_segments(token_slots, [1] * len(token_slots))
    groups = plan_groups(segments, engine.slots, torch.device("cpu"))
    assert [(g.start, g.end, g.slots, g.lengths) for g in groups] == [
        (2, 6, (a, b), (3, 1)),
        (6, 8, (c,), (2,)),
    ]
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    x = torch.randn(1, len(token_slots), target.in_features)
    y = torch.randn(1, len(token_slots), target.out_features)
    weights = WeightCache(engine.slots)
    batch = FlatLoraBatch(segments, segments, engine.slots, weights, TorchBackend(), None, x.device)
    per_segment = batch.add_linear_delta(name, x, y.clone())  # a new composition: per-segment products
    weights.sweep()
    got = batch.add_linear_delta(name, x, y.clone())  # the same composition again: stacked
    torch.testing.assert_close(per_segment, got, rtol=1e-5, atol=1e-5)
    want = y.clone()
    for i, slot in enumerate(token_slots):
        if slot != BASE_SLOT:
            adapter = engine.slots[slot]
            la, lb = adapter.weights[name]
            want[0, i] += (x[0, i] @ la.t() @ lb.t()) * adapter.spec.scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights.sweep()
    assert (name, (a, b), torch.float32) in weights._entries, (
        "a stacked composition is kept for the next step"
    )
    weights.sweep()
    assert not weights._entries, "and dropped once a step no longer uses it"


def test_trainable_adapters_are_never_cached(engine) -> None:
    live = engine.create_adapter(LoraSpec(rank=4, seed=0))
    name = next(iter(engine.slots[live].weights))
    weights = WeightCache(engine.slots)
    weights.get(name, (live,), torch.float32)
    assert not weights._entries
