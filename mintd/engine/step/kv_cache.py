"""Paged key/value cache: fixed-size blocks in one pool per layer, a block table per sequence.

Why not transformers' own continuous-batching cache (`PagedAttentionCache`): it comes with its manager
(requests, scheduler, sampling, logits processors of its own) and, for SDPA on CPU, gathers every
sequence's keys into one batch-wide tensor with a dense block-diagonal mask, so each query attends over
all sequences' keys. Here a sequence joins or leaves by taking or returning blocks (nothing is re-padded),
the n samples of a prompt share its full blocks, and attention reads only each sequence's own blocks.

Blocks are reserved when a request is admitted (prompt + max_tokens for every sample), so a running
sequence never finds the pool empty and nothing has to be preempted.
"""

from __future__ import annotations

import math

import torch


class BlockPool:
    """Block ids with reference counts, and the K/V tensors, allocated per layer on first write."""

    def __init__(self, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self.reserved = 0  # promised to admitted requests, not yet taken
        self.touched = 0  # blocks [0, touched) have been handed out at least once (and zeroed)
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [num_blocks * block_size, kv_heads, head_dim]
        self.values: dict[int, torch.Tensor] = {}

    # accounting ---------------------------------------------------------------------------------

    def blocks_for(self, prompt_len: int, max_tokens: int, samples: int) -> int:
        """Blocks a request can ever hold: the prompt's, then per sample its partial prompt block and
        its generated tokens."""
        b = self.block_size
        return math.ceil(prompt_len / b) + samples * math.ceil((prompt_len % b + max_tokens) / b)

    def can_reserve(self, blocks: int) -> bool:
        return len(self._free) - self.reserved >= blocks

    def reserve(self, blocks: int) -> None:
        self.reserved += blocks

    def unreserve(self, blocks: int) -> None:
        self.reserved -= blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free block out of an earlier reservation. Blocks go out lowest first; one handed out for the
        first time is zeroed (masked-out padding must never read NaN), so pool memory the cache has not
        reached yet stays untouched (the pools are allocated empty)."""
        block = self._free.pop()
        self._refs[block] = 1
        self.reserved -= 1
        if block >= self.touched:
            self._zero(self.touched, block + 1)
            self.touched = block + 1
        return block

    def _zero(self, first: int, end: int) -> None:
        b = self.block_size
        for pools in (self.keys, self.values):
            for pool in pools.values():
                pool[first * b : end * b].zero_()

    def share(self, block: int) -> None:
        self._refs[block] += 1

    def release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    # tensors ------------------------------------------------------------------------------------

    def layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pools, shaped after its first key/value states ([1, heads, tokens, dim])."""
        if layer not in self.keys:
            size = self.num_blocks * self.block_size
            self.keys[layer] = torch.zeros((size, k.shape[1], k.shape[3]), dtype=k.dtype, device=self.device)
            self.values[layer] = torch.zeros(
                (size, v.shape[1], v.shape[3]), dtype=v.dtype, device=self.device
            )
        return self.keys[layer], self.values[layer]

    def copy_block(self, src: int, dst: int) -> None:
        b = self.block_size
        for pools in (self.keys, self.values):
            for pool in pools.values():
                pool[dst * b : (dst + 1) * b] = pool[src * b : (src + 1) * b]


class BlockTable:
    """One sequence's blocks; position p lives at row `blocks[p // B] * B + p % B` of every pool."""

    def __init__(self, pool: BlockPool, blocks: list[int] | None = None) -> None:
        self.pool = pool
        self.blocks = blocks or []

    def ensure(self, length: int) -> None:
        """Blocks for positions [0, length)."""
        while len(self.blocks) * self.pool.block_size < length:
            self.blocks.append(self.pool.take())

    def rows(self, start: int, end: int) -> list[int]:
        b = self.pool.block_size
        return [self.blocks[p // b] * b + p % b for p in range(start, end)]

    def row_tensor(self, length: int) -> torch.Tensor:
        """Pool rows of positions [0, length), as a tensor."""
        return block_rows([self.blocks], self.pool.block_size, self.pool.device)[0, :length]

    def fork(self, length: int) -> BlockTable:
        """A copy for a sample that continues from `length` cached tokens: full blocks are shared, the
        partial last one (which the sample will write into) is copied."""
        b = self.pool.block_size
        full = length // b
        for block in self.blocks[:full]:
            self.pool.share(block)
        table = BlockTable(self.pool, self.blocks[:full])
        if length % b:
            block = self.pool.take()
            self.pool.copy_block(self.blocks[full], block)
            table.blocks.append(block)
        return table

    def free(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks = []


def block_rows(tables: list[list[int]], block_size: int, device: torch.device) -> torch.Tensor:
    """[sequences, widest * block_size] pool rows of every position the tables' blocks hold (shorter
    tables padded with block 0; the caller masks positions past each sequence's length)."""
    width = max(len(t) for t in tables)
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
    offsets = torch.arange(block_size, device=device)
    return (blocks.unsqueeze(-1) * block_size + offsets).view(len(tables), -1)
