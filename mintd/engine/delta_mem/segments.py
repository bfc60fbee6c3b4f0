"""Episodes of several sessions in one row: attention cut by session, the δ-mem state left to flow."""

from __future__ import annotations

import torch


def segment_attention(
    segment_ids: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal attention by segment (sessions of one episode, in order in each row):
    (an additive 4D mask [B, 1, T, T] of 0 and dtype's min, position ids restarting at every segment).

    Only attention is cut: the δ-mem state still flows through the row's tokens in order, so a later
    segment can learn from an earlier one only through the state."""
    if segment_ids.shape[1] > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1])[valid[:, 1:]].any()):
        raise ValueError("segment_ids must not decrease along a row: segments are consecutive runs")
    t = segment_ids.shape[1]
    index = torch.arange(t, device=segment_ids.device)
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    allowed = same & (index.unsqueeze(-1) >= index) & valid.unsqueeze(-2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=-1).values
    return mask, index - first
