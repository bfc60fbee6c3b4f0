"""One padded forward pass over rows that may each use a different adapter slot."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from mintd.engine.adapters import AdapterSlots
from mintd.engine.lora import LoraContext
from mintd.engine.lora_batch import LoraBatch


def padded_forward(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    slots: list[int],
    rows: list[torch.Tensor],
    pad_id: int,
) -> torch.Tensor:
    """float32 logits [rows, max_len, vocab]; rows must already be in `row_order`. Right padding, so
    every row's positions start at 0 exactly as when it runs alone."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    with ctx.use(LoraBatch(slots, table, device)):
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()


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
