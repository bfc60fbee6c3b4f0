"""Decode attention over the paged pool: each query sees exactly its own sequence's keys, in float32 and
in bfloat16 (where the query groups of a KV head run as that head's queries), in one batch or in
batches by width, and through the C++ kernel."""

from __future__ import annotations

import pytest
import torch

from mintd.engine.kernels import cpu_kernels
from mintd.engine.step import attention
from mintd.engine.step.attention import BATCH_COST, StepCache, decode_batches, paged_attention
from mintd.engine.step.kv_cache import BlockPool, block_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("path", ["batch per width", "one batch", "kernel"])
def test_each_decode_query_attends_over_its_own_sequence(dtype, kv_heads, path, monkeypatch) -> None:
    monkeypatch.setattr(attention, "BATCH_COST", 0 if path == "batch per width" else 1000)
    kernels = cpu_kernels() if path == "kernel" else None
    assert path != "kernel" or kernels is not None, "the C++ kernels must build on the test machine"
    kernel = kernels.paged_decode if kernels is not None else None
    torch.manual_seed(0)
    heads, dim, block = 4, 16, 4
    pool = BlockPool(16, block, torch.device("cpu"), dtype)
    keys = torch.randn(16 * block, kv_heads, dim, dtype=dtype)
    values = torch.randn(16 * block, kv_heads, dim, dtype=dtype)
    tables, lengths = [[3, 7], [1], [9, 2, 5]], [6, 3, 11]
    rows = block_rows(tables, block, pool.device)
    decodes = decode_batches([0, 1, 2], tables, lengths, block, pool.device, split=kernel is None)
    assert len(decodes) == (3 if path == "batch per width" else 1)
    step = StepCache(pool, torch.empty(0, dtype=torch.long), decodes, [], kernel)
    query = torch.randn(1, heads, 3, dim, dtype=dtype)
    out, _ = paged_attention(None, query, None, values[:1], None, 0.25, mintd_step=(step, keys, values))
    for s, length in enumerate(lengths):
        r = rows[s, :length]
        k = keys[r].float().repeat_interleave(heads // kv_heads, dim=1)  # [length, heads, dim]
        v = values[r].float().repeat_interleave(heads // kv_heads, dim=1)
        q = query[0, :, s].float()  # [heads, dim]
        p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * 0.25, dim=-1)
        expected = torch.einsum("hl,lhd->hd", p, v)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[0, s].float(), expected, rtol=tol, atol=tol)


def test_decode_batches_split_by_width_where_padding_costs_more_than_a_call() -> None:
    device = torch.device("cpu")
    # 40 one-block sequences and 40 of 12 blocks: padding the short ones would read 440 more
    # sequence-blocks, far more than one more call
    tables = [[i] for i in range(40)] + [list(range(12)) for _ in range(40)]
    lengths = [3] * 40 + [12 * 4 - 1] * 40
    queries = list(range(100, 180))
    batches = decode_batches(queries, tables, lengths, 4, device)
    assert [b.blocks.shape for b in batches] == [(40, 1), (40, 12)]
    assert sorted(q for b in batches for q in b.q.tolist()) == queries
    assert batches[0].mask.shape == (40, 1, 1, 4) and batches[0].mask.sum() == 40 * 3
    # widths 3 and 4 among few sequences: one call (the padding reads fewer than BATCH_COST blocks)
    few = decode_batches([0, 1, 2], [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]], [9, 13, 10], 4, device)
    assert len(few) == 1 and few[0].blocks.tolist() == [[1, 2, 3, 0], [8, 9, 10, 0], [4, 5, 6, 7]]
    assert BATCH_COST > 2  # the padding: two sequences one block short
    assert decode_batches([], [], [], 4, device) == []


def test_the_kernel_refuses_reads_outside_the_pool() -> None:
    kernels = cpu_kernels()
    assert kernels is not None, "the C++ kernels must build on the test machine"
    keys = values = torch.randn(4 * 4, 2, 8)  # 4 blocks of 4 positions
    q = torch.randn(1, 2, 8)
    ok = kernels.paged_decode(q, keys, values, torch.tensor([[1, 3]]), torch.tensor([7]), 4, 0.5)
    assert ok.shape == (1, 2, 8)
    with pytest.raises(RuntimeError, match="a block outside the pool"):
        kernels.paged_decode(q, keys, values, torch.tensor([[1, 4]]), torch.tensor([7]), 4, 0.5)
    with pytest.raises(RuntimeError, match="a length outside its blocks"):
        kernels.paged_decode(q, keys, values, torch.tensor([[1, 3]]), torch.tensor([9]), 4, 0.5)
