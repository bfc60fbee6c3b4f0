"""One padded forward pass over rows that may each use a different adapter slot."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import PreTrainedModel

from mintd.engine.adapters import BASE_SLOT, AdapterSlots
from mintd.engine.delta_mem import DeltaMemContext, DeltaMemRun, segment_attention
from mintd.engine.lora import LoraContext
from mintd.engine.lora_batch import LoraBatch


def padded_forward(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    slots: list[int],
    rows: list[torch.Tensor],
    pad_id: int,
    segments: list[torch.Tensor | None] | None = None,
    delta_ctx: DeltaMemContext | None = None,
) -> tuple[torch.Tensor, list[DeltaMemRun]]:
    """float32 logits [rows, max_len, vocab], and the δ-mem runs (their rows' states and write gates
    after the forward); rows must already be in `row_order`. Right padding, so every row's positions
    start at 0 exactly as when it runs alone.

    `segments`: per row, None or its tokens' segment ids (sessions of an episode): attention is cut by
    segment and positions restart at each. Rows on a δ-mem slot run from an empty state through the
    hooks of `delta_ctx`, every real token writing, so the state flows across a row's segments."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    runs = _delta_mem_runs(table, slots, mask.bool(), delta_ctx)
    attention: dict[str, torch.Tensor] = {"attention_mask": mask}
    if segments is not None and any(s is not None for s in segments):
        attention = _segment_attention(model, segments, mask.bool())
    with ctx.use(LoraBatch(slots, table, device)), delta_ctx.use(*runs) if runs else nullcontext():
        return model(input_ids=input_ids, **attention, use_cache=False).logits.float(), runs


def _delta_mem_runs(
    table: AdapterSlots, slots: list[int], valid: torch.Tensor, delta_ctx: DeltaMemContext | None
) -> list[DeltaMemRun]:
    """One run per δ-mem slot of the batch, over its rows: empty states, padding writes nothing."""
    runs = []
    for slot in dict.fromkeys(slots):
        adapter = table[slot].delta_mem if slot != BASE_SLOT else None
        if adapter is None:
            continue
        if delta_ctx is None:
            raise ValueError(f"model: slot {slot} is a delta_mem adapter, which this operation does not run")
        rows = torch.tensor([i for i, s in enumerate(slots) if s == slot], device=valid.device)
        runs.append(DeltaMemRun.start(adapter, adapter.empty_state(len(rows)), rows=rows, write_mask=valid))
    return runs


def _segment_attention(
    model: PreTrainedModel, segments: list[torch.Tensor | None], valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The block-diagonal 4D mask and restarting position ids (rows without segments: one segment)."""
    if model.config._attn_implementation.startswith("flash"):
        raise ValueError("segment_ids: not supported with flash attention (needs a 4D mask); use sdpa")
    ids = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    for i, seg in enumerate(segments):
        if seg is not None:
            ids[i, : len(seg)] = seg.to(ids.device, torch.long)
            ids[i, len(seg) :] = ids[i, len(seg) - 1]  # padding: the last segment, never a whole masked row
    mask, positions = segment_attention(ids, valid, next(model.parameters()).dtype)
    return {"attention_mask": mask, "position_ids": positions}


def target_logprobs(logits: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """log p(target) per position for each row of padded `logits` [rows, T, V]; row j's targets are
    [T_j] or [T_j, K] (several candidates per position). One gather over the whole batch, so backward
    writes the logits gradient once instead of zero-filling a [rows, T, V] tensor per row."""
    rows, width, _ = logits.shape
    k = max(t.shape[1] if t.dim() == 2 else 1 for t in targets)
    index = torch.zeros((rows, width, k), dtype=torch.long, device=logits.device)
    for j, t in enumerate(targets):
        t2 = t.view(len(t), -1)
        index[j, : len(t), : t2.shape[1]] = t2
    picked = logits.gather(-1, index) - torch.logsumexp(logits, dim=-1, keepdim=True)
    out = []
    for j, t in enumerate(targets):
        lp = picked[j, : len(t)]
        out.append(lp[:, 0] if t.dim() == 1 else lp[:, : t.shape[1]])
    return out
