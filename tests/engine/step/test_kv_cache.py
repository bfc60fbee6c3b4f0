"""The block pool: reservations, shared prompt blocks, copy of the partial one, every block back."""

from __future__ import annotations

import torch

from mintd.engine.step.kv_cache import BlockPool, BlockTable, block_rows


def _pool(blocks: int = 8, size: int = 4) -> BlockPool:
    return BlockPool(blocks, size, torch.device("cpu"), torch.float32)


def test_forks_share_full_blocks_and_copy_the_partial_one() -> None:
    pool = _pool()
    pool.reserve(pool.blocks_for(prompt_len=6, max_tokens=3, samples=2))
    parent = BlockTable(pool)
    parent.ensure(6)  # positions 0..5: one full block, one half-full
    k = torch.arange(6 * 2 * 3, dtype=torch.float32).view(1, 2, 6, 3)  # [1, heads, tokens, dim]
    keys, _ = pool.layer(0, k, k)
    keys.index_copy_(0, torch.tensor(parent.rows(0, 6)), k[0].transpose(0, 1))
    shared = parent.blocks[0]
    children = [parent.fork(6) for _ in range(2)]
    parent.free()
    for child in children:
        assert child.blocks[0] == shared, "the full prompt block is shared"
        torch.testing.assert_close(keys[child.row_tensor(6)], k[0].transpose(0, 1))
    assert children[0].blocks[1] != children[1].blocks[1], "each sample writes its own partial block"
    for child in children:
        child.ensure(9)
        child.free()
    pool.unreserve(pool.reserved)
    assert pool.free_blocks == pool.num_blocks and pool.reserved == 0


def test_a_request_reserves_what_it_can_ever_take() -> None:
    pool = _pool(blocks=4, size=4)
    need = pool.blocks_for(prompt_len=5, max_tokens=4, samples=2)
    assert need == 2 + 2 * 2  # the prompt's 2 blocks, then per sample its partial block and 4 tokens
    assert not pool.can_reserve(need)
    assert pool.can_reserve(pool.blocks_for(prompt_len=3, max_tokens=4, samples=1))


def test_block_rows_pads_short_tables() -> None:
    rows = block_rows([[2], [0, 3]], 4, torch.device("cpu"))
    assert rows.tolist() == [[8, 9, 10, 11, 0, 1, 2, 3], [0, 1, 2, 3, 12, 13, 14, 15]]
