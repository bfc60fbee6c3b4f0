"""Segment LoRA math on a flat token batch equals each token's own adapter applied alone."""

from __future__ import annotations

import torch

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.lora_batch import row_order
from mintd.engine.lora_flat import (
    FlatLoraBatch,
    TorchBackend,
    WeightCache,
    _runs,
    merge_segments,
    plan_groups,
)


def _frozen(engine, rank: int, seed: int) -> int:
    slot = engine.create_adapter(LoraSpec(rank=rank, seed=seed))
    with torch.no_grad():
        for _, b in engine.slots[slot].weights.values():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed)))
    return engine.snapshot(slot)


def _reference(engine, name: str, token_slots: list[int], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    want = y.clone()
    for i, slot in enumerate(token_slots):
        if slot != BASE_SLOT:
            adapter = engine.slots[slot]
            la, lb = adapter.weights[name]
            want[0, i] += (x[0, i] @ la.t() @ lb.t()) * adapter.spec.scale
    return want


def _delta(engine, weights: WeightCache, token_slots: list[int], lengths: list[int], name: str, x, y):
    segments = merge_segments(token_slots, lengths)
    batch = FlatLoraBatch(segments, segments, engine.slots, weights, TorchBackend(), None, x.device)
    return batch.add_linear_delta(name, x, y.clone())


def test_segments_of_unequal_lengths_match_a_per_token_reference(engine) -> None:
    a, b, c, d = _frozen(engine, 4, 1), _frozen(engine, 4, 2), _frozen(engine, 8, 3), _frozen(engine, 4, 4)
    e, f = _frozen(engine, 4, 5), _frozen(engine, 4, 6)
    # base, then a rank-4 group of five adapters with segments of lengths 3, 1, 1, 3, 2, then a rank-8
    # adapter. Runs: a's chunk alone, the decodes of b and d, the chunks of e and f as one block (their
    # tokens keep their own adapter's columns). The step engine orders a group by length; any order is
    # right.
    token_slots = [BASE_SLOT] * 2 + [a] * 3 + [b] + [d] + [e] * 3 + [f] * 2 + [c] * 2
    segments = merge_segments(token_slots, [1] * len(token_slots))
    groups = plan_groups(segments, engine.slots, torch.device("cpu"))
    assert [(g.start, g.end, g.slots, g.lengths) for g in groups] == [
        (2, 12, (a, b, d, e, f), (3, 1, 1, 3, 2)),
        (12, 14, (c,), (2,)),
    ]
    runs = groups[0].runs
    assert [(r.first, r.last, r.start, r.end, r.mask is None) for r in runs] == [
        (0, 1, 0, 3, True),
        (1, 3, 3, 5, True),
        (3, 5, 5, 10, False),
    ]
    assert runs[2].mask.tolist() == [[True] * 4 + [False] * 4] * 3 + [[False] * 4 + [True] * 4] * 2
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    x = torch.randn(1, len(token_slots), target.in_features)
    y = torch.randn(1, len(token_slots), target.out_features)
    weights = WeightCache(engine.slots)
    first = _delta(engine, weights, token_slots, [1] * len(token_slots), name, x, y)
    want = _reference(engine, name, token_slots, x, y)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    weights.sweep()
    # the next step: b, e and f left, so the rank-4 group is (a, d), of equal lengths (one run)
    token_slots = [a, d]
    again = _delta(engine, weights, token_slots, [1, 1], name, x[:, :2], y[:, :2])
    torch.testing.assert_close(again, _reference(engine, name, token_slots, x[:, :2], y[:, :2]))


def test_bank_rows_are_kept_while_steps_run_their_adapter_and_given_back_after(engine) -> None:
    a, b, c = _frozen(engine, 4, 1), _frozen(engine, 4, 2), _frozen(engine, 4, 3)
    name = next(iter(engine.slots[a].weights))
    weights = WeightCache(engine.slots)
    weights.get(name, (a, b), (torch.float32, torch.float32))
    weights.sweep()
    (bank,) = weights._banks.values()
    rows = dict(bank.rows)
    weights.get(name, (a,), (torch.float32, torch.float32))  # b's request finished
    assert bank.rows == rows, "a kept its row (not written again); b keeps its own until the sweep"
    weights.sweep()
    assert bank.rows == {a: rows[a]}
    weights.get(name, (a, c), (torch.float32, torch.float32))
    assert bank.rows == {a: rows[a], c: rows[b]}, "c took the row b gave back"
    weights.sweep()
    weights.sweep()
    assert not weights._banks, "a step that runs no adapter frees the bank"


def test_a_composition_reads_its_weights_as_a_view_of_the_bank_once_its_rows_are_in_order(engine) -> None:
    a, b, c, d = (_frozen(engine, 4, seed) for seed in (1, 2, 3, 4))
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    x = torch.randn(1, 3, target.in_features)
    y = torch.randn(1, 3, target.out_features)
    weights = WeightCache(engine.slots)
    weights.get(name, (c, b), (torch.float32, torch.float32))  # rows c 0, b 1
    weights.sweep()
    (bank,) = weights._banks.values()
    # a joins, in row order before b and c: the bank is rewritten once with (a, b, c) first, in order
    got = _delta(engine, weights, [a, b, c], [1, 1, 1], name, x, y)
    torch.testing.assert_close(got, _reference(engine, name, [a, b, c], x, y))
    assert [bank.rows[s] for s in (a, b, c)] == [0, 1, 2]
    stacked_a, stacked_b = weights.get(name, (a, b, c), (torch.float32, torch.float32))
    assert stacked_a._base is bank.tensors[name][0] and stacked_b._base is bank.tensors[name][1]
    # a second composition of the same bank in the same step, out of order: an index (a copy), and the
    # first keeps its view
    weights.get(name, (d, a), (torch.float32, torch.float32))
    assert weights.get(name, (a, b, c), (torch.float32, torch.float32))[1]._base is bank.tensors[name][1]
    got = _delta(engine, weights, [d, a], [1, 1], name, x[:, :2], y[:, :2])
    torch.testing.assert_close(got, _reference(engine, name, [d, a], x[:, :2], y[:, :2]))
    weights.sweep()
    # the next step runs (a, b, c) again: no move, the same view
    version = bank.version
    weights.get(name, (a, b, c), (torch.float32, torch.float32))
    assert bank.version == version


def test_trainable_adapters_are_written_again_each_step(engine) -> None:
    live = engine.create_adapter(LoraSpec(rank=4, seed=0))
    name = next(iter(engine.slots[live].weights))
    target = engine.slots.targets[name]
    x = torch.randn(1, 2, target.in_features)
    y = torch.zeros(1, 2, target.out_features)
    weights = WeightCache(engine.slots)
    _delta(engine, weights, [live, live], [1, 1], name, x, y)
    weights.sweep()
    with torch.no_grad():
        engine.slots[live].weights[name][1].normal_()  # an optimizer step
    got = _delta(engine, weights, [live, live], [1, 1], name, x, y)
    torch.testing.assert_close(got, _reference(engine, name, [live, live], x, y))
    assert got.abs().sum() > 0


def test_a_block_run_holds_at_most_its_columns_and_never_spans_another_run() -> None:
    # rank 16: four segments a block at most; the 20 decodes and the 5-segment run of length 2 (5 x 16
    # columns) stay runs of their own, between the blocks
    lengths = (3, 4, 4, 5, 6, 7) + (1,) * 20 + (2,) * 5 + (9, 9)
    runs = _runs(lengths, 16, torch.device("cpu"))
    assert [(r.first, r.last, r.mask is None) for r in runs] == [
        (0, 4, False),
        (4, 6, False),
        (6, 26, True),
        (26, 31, True),
        (31, 33, False),
    ]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    assert all((r.start, r.end) == (offsets[r.first], offsets[r.last]) for r in runs)


def test_a_step_orders_each_group_by_its_slots_tokens_so_equal_lengths_are_adjacent(engine) -> None:
    a, b, c = _frozen(engine, 4, 1), _frozen(engine, 4, 2), _frozen(engine, 4, 3)
    # rows: a chunk of 7 for a, a decode for b, a decode and a chunk of 3 for c (4 tokens in all), a
    # decode for a (8 in all), the base
    slots, tokens = [a, b, c, c, a, BASE_SLOT], [7, 1, 1, 3, 1, 1]
    order = row_order(slots, engine.slots, tokens)
    assert [slots[i] for i in order] == [BASE_SLOT, b, c, c, a, a]
    segments = merge_segments([slots[i] for i in order], [tokens[i] for i in order])
    assert segments == [(BASE_SLOT, 1), (b, 1), (c, 4), (a, 8)]
