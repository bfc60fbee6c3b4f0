"""Segment LoRA math on a flat token batch equals each token's own adapter applied alone."""

from __future__ import annotations

import random

import pytest
import torch

from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.kernels import cpu_kernels
from mintd.engine.lora_batch import row_order
from mintd.engine.lora_flat import (
    FEW_TOKENS,
    FlatLoraBatch,
    RowKernelBackend,
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


def _backend(kind: str) -> TorchBackend:
    if kind == "torch":
        return TorchBackend()
    kernels = cpu_kernels()
    assert kernels is not None, "the C++ kernels must build on the test machine"
    return RowKernelBackend(kernels.lora_rows)


# the torch path, and mintd's CPU kernel for the runs of a few tokens per adapter
BACKENDS = pytest.mark.parametrize("backend", ["torch", "kernel"])


def _delta(engine, weights, token_slots, lengths, name: str, x, y, backend: str = "torch"):
    segments = merge_segments(token_slots, lengths)
    batch = FlatLoraBatch(segments, segments, engine.slots, weights, _backend(backend), None, x.device)
    return batch.add_linear_delta(name, x, y.clone())


@BACKENDS
def test_segments_of_unequal_lengths_match_a_per_token_reference(engine, backend) -> None:
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
    assert groups[0].segment.tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 4, 4]
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    x = torch.randn(1, len(token_slots), target.in_features)
    y = torch.randn(1, len(token_slots), target.out_features)
    weights = WeightCache(engine.slots)
    first = _delta(engine, weights, token_slots, [1] * len(token_slots), name, x, y, backend)
    want = _reference(engine, name, token_slots, x, y)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    weights.sweep()
    # the next step: b, e and f left, so the rank-4 group is (a, d), of equal lengths (one run)
    token_slots = [a, d]
    again = _delta(engine, weights, token_slots, [1, 1], name, x[:, :2], y[:, :2], backend)
    torch.testing.assert_close(again, _reference(engine, name, token_slots, x[:, :2], y[:, :2]))


def test_bank_rows_are_kept_while_steps_run_their_adapter_and_given_back_after(engine) -> None:
    a, b, c = _frozen(engine, 4, 1), _frozen(engine, 4, 2), _frozen(engine, 4, 3)
    name = next(iter(engine.slots[a].weights))
    weights = WeightCache(engine.slots)
    weights.get(name, (a, b), torch.float32)
    weights.sweep()
    (bank,) = weights._banks.values()
    rows = dict(bank.rows)
    weights.get(name, (a,), torch.float32)  # b's request finished
    assert bank.rows == rows, "a kept its row (not written again); b keeps its own until the sweep"
    weights.sweep()
    assert bank.rows == {a: rows[a]}
    weights.get(name, (a, c), torch.float32)
    assert bank.rows == {a: rows[a], c: rows[b]}, "c took the row b gave back"
    weights.sweep()
    weights.sweep()
    assert not weights._banks, "a step that runs no adapter frees the bank"


F32 = torch.float32


def _ordered(weights: WeightCache, slots: list[int], tokens: list[int]) -> tuple[list[int], list[int]]:
    order = weights.order(slots, tokens, F32)
    return [slots[i] for i in order], [tokens[i] for i in order]


def _views(engine, weights: WeightCache, slots: list[int], tokens: list[int]) -> bool:
    """Whether every group of the step reads its weights as a view of its bank."""
    groups = plan_groups(merge_segments(slots, tokens), engine.slots, torch.device("cpu"))
    return all(not isinstance(weights._placed(g.slots, F32)[1], torch.Tensor) for g in groups)


def test_a_step_order_makes_each_group_a_view_of_its_bank_moving_only_rows_out_of_place(engine) -> None:
    a, b, c, d = (_frozen(engine, 4, seed) for seed in (1, 2, 3, 4))
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    x = torch.randn(1, 4, target.in_features)
    y = torch.randn(1, 4, target.out_features)
    weights = WeightCache(engine.slots)

    def step(slots: list[int], tokens: list[int]) -> list[int]:
        slots, tokens = _ordered(weights, slots, tokens)
        assert _views(engine, weights, slots, tokens)
        n = sum(tokens)
        flat = [s for s, k in zip(slots, tokens, strict=True) for _ in range(k)]
        got = _delta(engine, weights, slots, tokens, name, x[:, :n], y[:, :n])
        torch.testing.assert_close(got, _reference(engine, name, flat, x[:, :n], y[:, :n]))
        weights.sweep()
        return slots

    step([c, b, a], [1, 1, 1])
    (bank,) = weights._banks.values()
    rows = dict(bank.rows)
    assert sorted(rows.values()) == [0, 1, 2] and bank.moved == 0
    # b's request finished and d's joined: d moves into b's row (b, which this step does not run, gives
    # its row back unmoved); a and c stay where they are
    step([a, c, d], [1, 1, 1])
    assert bank.moved == 1 and (bank.rows[a], bank.rows[c], bank.rows[d]) == (rows[a], rows[c], rows[b])
    # the same composition again: nothing moves
    step([d, c, a], [1, 1, 1])
    assert bank.moved == 1
    # d has two samples now: its run of length 2 comes after the decodes of a and c
    order = step([a, d, c, d], [1, 1, 1, 1])
    assert order[-2:] == [d, d] and bank.rows[d] == 2


@BACKENDS
def test_step_orders_keep_every_group_a_view_and_every_delta_exact_as_compositions_churn(
    engine, backend
) -> None:
    rng = random.Random(0)
    adapters = [_frozen(engine, 4 if i % 3 else 8, 10 + i) for i in range(10)]
    name = next(iter(engine.slots[adapters[0]].weights))
    target = engine.slots.targets[name]
    weights = WeightCache(engine.slots)
    for _ in range(30):
        slots = [rng.choice([BASE_SLOT, *adapters]) for _ in range(rng.randint(1, 12))]
        tokens = [rng.choice([1, 1, 1, 2, 5]) for _ in slots]
        slots, tokens = _ordered(weights, slots, tokens)
        assert _views(engine, weights, slots, tokens)
        for bank in weights._banks.values():
            held = list(bank.rows.values())
            assert len(set(held)) == len(held) and not set(held) & set(bank.free)
        n = sum(tokens)
        x, y = torch.randn(1, n, target.in_features), torch.randn(1, n, target.out_features)
        flat = [s for s, k in zip(slots, tokens, strict=True) for _ in range(k)]
        got = _delta(engine, weights, slots, tokens, name, x, y, backend)
        torch.testing.assert_close(got, _reference(engine, name, flat, x, y))
        weights.sweep()


def test_a_composition_out_of_its_banks_order_reads_gathered_weights(engine) -> None:
    a, b, c = (_frozen(engine, 4, seed) for seed in (1, 2, 3))
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    x, y = torch.randn(1, 3, target.in_features), torch.randn(1, 3, target.out_features)
    weights = WeightCache(engine.slots)
    _ordered(weights, [a, b, c], [1, 1, 1])
    (bank,) = weights._banks.values()
    # a second composition in the same step (the LM head's kept tokens), in another order: an index
    stacked = weights.get(name, (c, a), F32)
    assert stacked[0]._base is not bank.tensors[name][0]
    got = _delta(engine, weights, [c, a, b], [1, 1, 1], name, x, y)
    torch.testing.assert_close(got, _reference(engine, name, [c, a, b], x, y))


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


@pytest.mark.parametrize("chunks", [(6, 3), (40, 30)])  # a block run of FEW_TOKENS or fewer; of more
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_a_bf16_model_gets_each_tokens_own_delta(engine, chunks, backend) -> None:
    """The CPU serving case: bf16 activations. The torch path: banks in float32, decodes and small block
    runs multiply in float32, block runs of many tokens (prompt chunks) in bf16. The kernel: banks in
    bf16, read by the kernel for decodes and by bf16 GEMMs for chunks."""
    assert (sum(chunks) + 2 > FEW_TOKENS) == (chunks == (40, 30))
    a, b, c, d = (_frozen(engine, 4, seed) for seed in (1, 2, 3, 4))
    name = next(iter(engine.slots[a].weights))
    target = engine.slots.targets[name]
    weights = WeightCache(engine.slots)
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    order = weights.order([a, b, c, d, b], [1, 1, *chunks, 1], dtype)
    slots, tokens = [[a, b, c, d, b][i] for i in order], [[1, 1, *chunks, 1][i] for i in order]
    segments = merge_segments(slots, tokens)
    flat = [s for s, k in zip(slots, tokens, strict=True) for _ in range(k)]
    x = torch.randn(1, len(flat), target.in_features).to(torch.bfloat16)
    y = torch.randn(1, len(flat), target.out_features).to(torch.bfloat16)
    batch = FlatLoraBatch(segments, segments, engine.slots, weights, _backend(backend), dtype, x.device)
    got = batch.add_linear_delta(name, x, y.clone()).float()
    want = _reference(engine, name, flat, x.float(), y.float())
    scale = want.abs().amax().item()  # the outputs' bf16 rounding grows with it
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * scale)
    assert (want - y.float()).abs().amax() > 0.1 * scale  # deltas that a wrong adapter would miss


def test_the_row_kernel_refuses_a_segment_outside_its_weights() -> None:
    rows = _backend("kernel").rows
    x, y = torch.randn(3, 16), torch.zeros(3, 8)
    a, b = torch.randn(2, 4, 16), torch.randn(2, 4, 8)
    rows(x, a, b, torch.tensor([0, 1, 1]), y)
    torch.testing.assert_close(y[2], (x[2] @ a[1].t()) @ b[1])
    with pytest.raises(RuntimeError, match="a segment outside a and b"):
        rows(x, a, b, torch.tensor([0, 2, 1]), y)
