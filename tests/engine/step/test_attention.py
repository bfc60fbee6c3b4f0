"""Decode attention over the paged pool: each query sees exactly its own sequence's keys, in float32 and
in bfloat16 (where the query groups of a KV head run as that head's queries)."""

from __future__ import annotations

import pytest
import torch

from mintd.engine.step.attention import StepCache, paged_attention
from mintd.engine.step.kv_cache import BlockPool, block_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_each_decode_query_attends_over_its_own_sequence(dtype, kv_heads) -> None:
    torch.manual_seed(0)
    heads, dim, block = 4, 16, 4
    pool = BlockPool(16, block, torch.device("cpu"), dtype)
    keys = torch.randn(16 * block, kv_heads, dim, dtype=dtype)
    values = torch.randn(16 * block, kv_heads, dim, dtype=dtype)
    tables, lengths = [[3, 7], [1], [9, 2, 5]], [6, 3, 11]
    rows = block_rows(tables, block, pool.device)
    width = max(len(t) for t in tables)
    mask = torch.arange(width * block) < torch.tensor(lengths).unsqueeze(1)
    step = StepCache(pool, torch.empty(0, dtype=torch.long), torch.tensor([0, 1, 2]), None, None, [])
    step.decode_blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    step.decode_mask = mask[:, None, None]
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
