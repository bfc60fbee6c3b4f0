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


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position; `targets` is [T] or [T, K] (several candidates per position)."""
    lse = torch.logsumexp(logits, dim=-1)
    if targets.dim() == 1:
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return logits.gather(-1, targets) - lse.unsqueeze(-1)
