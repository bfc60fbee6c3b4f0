"""Attention for a flat step over the paged cache, plugged into transformers' attention interface.

The model runs on one flat row of tokens ([1, T]) holding decode tokens of running sequences and
prompt chunks of new ones. Each attention layer's `cache.update` writes the step's keys and values into
the pool (the block rows of each token) and hands this function the pools through the layer's kwargs,
as transformers' own paged cache does. Decode queries (one per sequence) are answered in one SDPA call
over their sequences' gathered blocks with a length mask; each prompt chunk attends causally over its
own sequence's blocks. No sequence ever sees another's keys, and no cache is rebuilt.

Decode sequences are answered in batches of similar lengths (`decode_batches`): one SDPA call pads its
sequences' keys to the longest, and CPU decode attention is bound by the keys it reads, so one call over
sequences of 1 to 12 blocks read about twice the keys they hold. On CPU, where mintd's kernels build
(`kernels.CpuKernels.paged_decode`), all decodes are one call that reads each sequence's blocks where
they lie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from mintd.engine.step.kv_cache import BlockPool

NAME = "mintd_paged"
# what one more decode batch costs (its gathers and SDPA call), in sequence-blocks of keys read: about
# 40 us against 2 us per sequence-block (bf16, 4 KV heads of 64, 2 cores)
BATCH_COST = 20
# architectures whose attention is plain causal softmax attention over `cache.update`'s keys and values
# (no sliding window, sinks, softcapping or latent compression): the ones the flat path is tested on
FLAT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe"})


def supports_flat(model: PreTrainedModel) -> bool:
    config = model.config
    if config.model_type not in FLAT_MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types) and not getattr(
        config, "use_sliding_window", False
    )


@dataclass
class Chunk:
    """A prompt chunk: query tokens [start, end) of the flat batch, attending over pool `rows` (its
    sequence's positions 0 .. last query) under a causal `mask` [queries, keys]."""

    start: int
    end: int
    rows: torch.Tensor
    mask: torch.Tensor


@dataclass
class DecodeBatch:
    """Decode queries answered in one SDPA call: the flat positions `q` [S] of one query per sequence,
    each sequence's cache `blocks` [S, width] (padded with block 0) and `mask` [S, 1, 1, width * block
    size], True where a key is real."""

    q: torch.Tensor
    blocks: torch.Tensor
    lengths: torch.Tensor  # [S] positions each sequence holds
    mask: torch.Tensor


@dataclass
class StepCache:
    """What one flat step's attention layers need; passed to the model as its `cache`."""

    pool: BlockPool
    write: torch.Tensor  # [T] pool row of each token of the step
    decodes: list[DecodeBatch]
    chunks: list[Chunk]
    kernel: Callable[..., torch.Tensor] | None = None  # CpuKernels.paged_decode: no gather, no SDPA

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.pool.layer(layer_idx, key, value)
        keys.index_copy_(0, self.write, key[0].transpose(0, 1))
        values.index_copy_(0, self.write, value[0].transpose(0, 1))
        kwargs["mintd_step"] = (self, keys, values)
        return key, value


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, T, dim]
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    step, keys, values = kwargs["mintd_step"]
    q = query[0]  # [heads, T, dim]
    out = q.new_empty((q.shape[1], q.shape[0], value.shape[-1]))  # [T, heads, dim_v]
    gqa = q.shape[0] != keys.shape[1]
    for d in step.decodes:
        qd = q[:, d.q].transpose(0, 1)  # [S, heads, dim]
        if step.kernel is not None:
            scale = scaling if scaling is not None else qd.shape[-1] ** -0.5
            out[d.q] = step.kernel(qd, keys, values, d.blocks, d.lengths, step.pool.block_size, scale)
        else:
            out[d.q] = _decode(qd, keys, values, d, step.pool.block_size, scaling)
    for c in step.chunks:
        qc = q[:, c.start : c.end].unsqueeze(0)
        kc = keys.index_select(0, c.rows).transpose(0, 1).unsqueeze(0)
        vc = values.index_select(0, c.rows).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scaling, enable_gqa=gqa)
        out[c.start : c.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def decode_batches(
    queries: list[int],
    tables: list[list[int]],
    lengths: list[int],
    block_size: int,
    device: torch.device,
    split: bool = True,
) -> list[DecodeBatch]:
    """The decode sequences (flat query position, cache blocks, length) in batches of similar widths:
    sorted by width and cut where the keys padding would read cost more than another call
    (`BATCH_COST`; an exact split of the sorted widths, by dynamic programming over distinct widths).
    Without `split`, one batch (for the kernel, which reads no padding)."""
    if not tables:
        return []
    if not split:
        return [_batch(queries, tables, lengths, list(range(len(tables))), block_size, device)]
    order = sorted(range(len(tables)), key=lambda i: len(tables[i]))
    widths = sorted({len(t) for t in tables})
    counts = [sum(1 for t in tables if len(t) == w) for w in widths]
    seen = [0, *accumulate(counts)]  # sequences of the first k widths
    # best[j]: the least cost of the first j widths; cut[j]: where its last batch starts
    best, cut = [0.0], [0]
    for j in range(1, len(widths) + 1):
        cost, i = min((best[i] + (seen[j] - seen[i]) * widths[j - 1] + BATCH_COST, i) for i in range(j))
        best.append(cost)
        cut.append(i)
    bounds, j = [], len(widths)
    while j:
        bounds.append((seen[cut[j]], seen[j]))
        j = cut[j]
    return [
        _batch(queries, tables, lengths, order[first:last], block_size, device)
        for first, last in reversed(bounds)
    ]


def _batch(
    queries: list[int],
    tables: list[list[int]],
    lengths: list[int],
    members: list[int],
    block_size: int,
    device: torch.device,
) -> DecodeBatch:
    width = max(len(tables[i]) for i in members)
    blocks = [tables[i] + [0] * (width - len(tables[i])) for i in members]
    length = torch.tensor([lengths[i] for i in members], device=device)
    key_at = torch.arange(width * block_size, device=device)
    return DecodeBatch(
        torch.tensor([queries[i] for i in members], device=device),
        torch.tensor(blocks, device=device),
        length,
        (key_at < length.unsqueeze(1))[:, None, None],
    )


def _decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: DecodeBatch,
    block_size: int,
    scaling: float | None,
) -> torch.Tensor:
    """One query per sequence ([S, heads, dim]) over its gathered keys; returns [S, heads, dim_v].

    `index_select` copies whole blocks ([block_size, kv_heads, dim]: 5-8x faster than advanced indexing
    on CPU, and about 2x faster than copying the same keys row by row). In bfloat16 each KV head's
    query group runs as that head's queries, which CPU SDPA does 4-7x faster than `enable_gqa` with one
    query; in float32 `enable_gqa` is the faster one.
    """
    s, heads, dim = q.shape
    kd, vd = (_gathered(pool, batch.blocks, block_size) for pool in (keys, values))
    kv_heads, mask = kd.shape[1], batch.mask
    if q.dtype == torch.float32 or kv_heads == heads:
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scaling, enable_gqa=kv_heads != heads
        )
    else:
        o = F.scaled_dot_product_attention(
            q.view(s, kv_heads, heads // kv_heads, dim), kd, vd, attn_mask=mask, scale=scaling
        )
    return o.reshape(s, heads, -1)


def _gathered(pool: torch.Tensor, blocks: torch.Tensor, size: int) -> torch.Tensor:
    """[S, kv_heads, blocks * size, dim]: the pool's rows of each sequence's blocks."""
    shape = pool.shape[1:]
    picked = pool.view(-1, size, *shape).index_select(0, blocks.view(-1))
    return picked.view(len(blocks), -1, *shape).transpose(1, 2)


AttentionInterface.register(NAME, paged_attention)
