"""Reverse-KL distillation: a student adapter against a reference (any slot, or the base), per position.

Each datum is a pair of rows in one mixed batch: the student reads `student`, the reference reads
`reference`; they are aligned on their last N positions (the reference may carry extra context in
front, e.g. a system prompt the student must learn to do without). At each aligned position t, with
p = softmax(logits / τ) over the full vocabulary:

    loss_t = w_t · KL(p_student ‖ p_reference) = w_t · Σ_v p_s(v) (log p_s(v) − log p_r(v))

summed (Tinker's token-sum contract). Gradients reach only the student's adapter (the reference's
logits are detached) and accumulate until its optim_step, like forward_backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from mintd.engine.adapters import BASE_SLOT, AdapterSlots
from mintd.engine.forward import padded_forward
from mintd.engine.lora import LoraContext
from mintd.engine.lora_batch import row_order


@dataclass
class KLDatum:
    student: torch.Tensor  # int64 [Ts]
    reference: torch.Tensor  # int64 [Tr]
    targets: torch.Tensor  # int64 [N]: the tokens the student produced at the aligned positions
    weights: torch.Tensor  # float32 [N]


@dataclass
class KLGroup:
    slot: int  # the student: a trainable adapter
    reference_slot: int  # any slot, or BASE_SLOT
    data: list[KLDatum]
    temperature: float = 1.0


@dataclass
class KLOutput:
    losses: list[torch.Tensor]  # per datum, w_t · KL_t per aligned position [N]
    loss: float  # Σ w·KL (exact, full vocabulary)
    sampled_kl: float  # Σ w·(log π_s(y) − log π_r(y)) at the target tokens: the one-sample estimate
    weight: float  # Σ w


def validate(group: KLGroup, vocab_size: int, max_len: int) -> None:
    """ValueError naming the bad field; pure, safe from any thread."""
    if not (math.isfinite(group.temperature) and group.temperature > 0):
        raise ValueError("temperature: must be a finite number > 0")
    if not group.data:
        raise ValueError("data: empty batch")
    for i, d in enumerate(group.data):
        where = f"data[{i}]"
        for name, ids in (
            ("student_input", d.student),
            ("reference_input", d.reference),
            ("target_tokens", d.targets),
        ):
            if ids.dim() != 1 or len(ids) == 0:
                raise ValueError(f"{where}.{name}: must be a non-empty token list")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ValueError(f"{where}.{name}: token ids must be in [0, {vocab_size})")
            if name != "target_tokens" and len(ids) > max_len:
                raise ValueError(f"{where}.{name}: {len(ids)} tokens exceed the model's context of {max_len}")
        n = len(d.targets)
        if tuple(d.weights.shape) != (n,):
            raise ValueError(
                f"{where}.weights: shape {tuple(d.weights.shape)} must equal target_tokens' ({n},)"
            )
        for name, ids in (("student_input", d.student), ("reference_input", d.reference)):
            if n > len(ids):
                raise ValueError(
                    f"{where}.target_tokens: {n} positions, but {name} has only {len(ids)} (they align on "
                    "the last positions)"
                )


def _pair_batches(data: list[KLDatum], budget: int) -> list[list[int]]:
    """Consecutive datums whose two rows together stay within `budget` padded tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, d in enumerate(data):
        width = max(longest, len(d.student), len(d.reference))
        if current and width * 2 * (len(current) + 1) > budget:
            batches.append(current)
            current, width = [], max(len(d.student), len(d.reference))
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def reverse_kl(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    group: KLGroup,
    pad_id: int,
    micro_batch_tokens: int,
) -> KLOutput:
    device = next(model.parameters()).device
    # A trainable reference shares the batch; batched LoRA kernels give its params zero gradients.
    # Put back "no gradient" where there was none, so the reference stays exactly as it was.
    untouched = (
        []
        if group.reference_slot in (BASE_SLOT, group.slot)
        else [p for p in table[group.reference_slot].params if p.grad is None]
    )
    out = KLOutput([torch.empty(0)] * len(group.data), 0.0, 0.0, 0.0)
    for batch in _pair_batches(group.data, micro_batch_tokens):
        # rows 2j (student) and 2j+1 (reference) of datum batch[j], put in slot order for the LoRA batch
        slots = [s for _ in batch for s in (group.slot, group.reference_slot)]
        tokens = [t for i in batch for t in (group.data[i].student, group.data[i].reference)]
        order = row_order(slots, table)
        logits, _ = padded_forward(
            model, ctx, table, [slots[k] for k in order], [tokens[k].to(device) for k in order], pad_id
        )
        where = {k: pos for pos, k in enumerate(order)}
        total = None
        for j, i in enumerate(batch):
            d = group.data[i]
            n = len(d.targets)
            student = logits[where[2 * j], len(d.student) - n : len(d.student)] / group.temperature
            reference = (
                logits[where[2 * j + 1], len(d.reference) - n : len(d.reference)].detach() / group.temperature
            )
            log_s, log_r = torch.log_softmax(student, -1), torch.log_softmax(reference, -1)
            weights = d.weights.to(device)
            kl = (log_s.exp() * (log_s - log_r)).sum(-1)
            losses = weights * kl
            detached = losses.detach()
            y = d.targets.to(device).unsqueeze(-1)
            sampled = (log_s.gather(-1, y) - log_r.gather(-1, y)).squeeze(-1).detach()
            out.losses[i] = detached.cpu()
            out.loss += float(detached.sum())
            out.sampled_kl += float((weights * sampled).sum())
            out.weight += float(weights.sum())
            total = losses.sum() if total is None else total + losses.sum()
        if total is not None and total.requires_grad:
            total.backward()
    for p in untouched:
        p.grad = None
    return out
