"""forward_backward over groups of datums (one group per client request), all in shared batches.

Gradients land on each adapter's own tensors and accumulate there until that adapter's optim_step.
Rows are cut into micro-batches by a token budget; under the token-sum contract the accumulated result
equals one full-batch pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from mintd.engine.adapters import BASE_SLOT, AdapterSlots
from mintd.engine.delta_mem import DeltaMemContext, DeltaMemRun
from mintd.engine.forward import padded_forward, target_logprobs
from mintd.engine.lora import LoraContext
from mintd.engine.lora_batch import row_order
from mintd.engine.losses import WRITE_SPARSITY, WRITE_SPARSITY_TARGET, check_config, get_loss

# A per-token loss_fn_input no loss reads: the session each token belongs to. Attention is cut by
# session (and positions restart), a δ-mem state flows on through the row.
SEGMENT_IDS = "segment_ids"


@dataclass
class Datum:
    """Tinker's Datum: position i of `tokens` predicts `inputs["target_tokens"][i]`."""

    tokens: torch.Tensor  # int64 [T]
    inputs: dict[str, torch.Tensor]  # target_tokens [T] or [T, K] (int64); the rest float32


@dataclass
class TrainGroup:
    slot: int
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainOutput:
    logprobs: list[torch.Tensor]  # per datum, the shape of its target_tokens
    loss: float  # token sum over the group's datums


def check_slot(slot: int, table: AdapterSlots, train: bool) -> None:
    if slot != BASE_SLOT and slot not in table:
        raise ValueError(f"model: no adapter in slot {slot}")
    if train and (slot == BASE_SLOT or not table[slot].trainable):
        raise ValueError("model: this adapter is a frozen snapshot and cannot be trained")


def validate(group: TrainGroup, vocab_size: int, max_len: int) -> None:
    """Raise ValueError naming the bad field. Pure: safe to call from any thread before queueing."""
    _, required = get_loss(group.loss_fn)
    check_config(group.loss_config)
    if not group.data:
        raise ValueError("data: empty batch")
    for i, d in enumerate(group.data):
        where = f"data[{i}]"
        n = len(d.tokens)
        if d.tokens.dim() != 1 or n == 0:
            raise ValueError(f"{where}.model_input: must be a non-empty token list")
        if n > max_len:
            raise ValueError(f"{where}.model_input: {n} tokens exceed the model's context of {max_len}")
        for name, ids in (("model_input", d.tokens), ("target_tokens", d.inputs.get("target_tokens"))):
            if ids is None:
                raise ValueError(f"{where}.loss_fn_inputs: missing target_tokens")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"{where}.{name}: token ids must be in [0, {vocab_size})")
        target = d.inputs["target_tokens"]
        if target.dim() not in (1, 2) or target.shape[0] != n:
            raise ValueError(
                f"{where}.target_tokens: shape {tuple(target.shape)} does not match {n} input tokens"
            )
        for name in required:
            if name not in d.inputs:
                raise ValueError(f"{where}.loss_fn_inputs: {group.loss_fn} needs {name}")
        for name, t in d.inputs.items():
            if name != "target_tokens" and (t.dim() == 0 or t.shape[0] != n):
                raise ValueError(
                    f"{where}.loss_fn_inputs.{name}: shape {tuple(t.shape)} does not match {n} tokens"
                )
        if group.loss_fn == "gspo" and not bool((d.inputs["sequence_ratio_mask"] != 0).any()):
            raise ValueError(f"{where}.sequence_ratio_mask: selects no rows (gspo's ratio is their mean)")
        if "weights" in d.inputs and d.inputs["weights"].shape != target.shape:
            raise ValueError(f"{where}.weights: shape must equal target_tokens shape {tuple(target.shape)}")
        if SEGMENT_IDS in d.inputs:
            _check_segments(d.inputs[SEGMENT_IDS], f"{where}.loss_fn_inputs.{SEGMENT_IDS}")


def _check_segments(ids: torch.Tensor, where: str) -> None:
    """Segment ids: whole numbers >= 0 that never decrease (each segment one consecutive run)."""
    if ids.dim() != 1:
        raise ValueError(f"{where}: must be one id per token (shape {tuple(ids.shape)})")
    ids = ids.double()
    if not bool((ids == ids.round()).all()) or bool((ids < 0).any()) or ids.max() >= 2**24:
        raise ValueError(f"{where}: must be whole numbers in [0, 2^24)")
    if bool((ids[1:] < ids[:-1]).any()):
        raise ValueError(f"{where}: must not decrease (a segment is a consecutive run of tokens)")


def _micro_batches(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows (in group order) whose padded size rows × longest stays within `budget` tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > budget:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def merged_budget(groups: list[TrainGroup], micro_batch_tokens: int, merge_min_tokens: int) -> int:
    """Padded tokens per micro-batch when several runs' groups share one call: no more than the largest
    group would have used alone, so merging runs never raises peak memory (MinT's concurrent policies
    share a base "without more peak memory"), and larger merged micro-batches bring nothing on a CPU
    either (four 3,072-token GRPO batches took 15% longer as one 12,288-token micro-batch than one by
    one). But at least `merge_min_tokens`: 32 one-row runs of 64 tokens must not run as 32 forwards."""
    alone = max((len(g.data) * max(len(d.tokens) for d in g.data) for g in groups if g.data), default=1)
    return min(micro_batch_tokens, max(alone, merge_min_tokens))


def _write_sparsity(runs: list[DeltaMemRun], groups: list[TrainGroup]) -> list[torch.Tensor | float]:
    """Each row's δ-mem write-sparsity term, weight · (its mean write gate − target)², from its group's
    (`groups`: one per row) `loss_fn_config` (`delta_mem_write_sparsity`, the weight, default 0: off;
    and `delta_mem_write_sparsity_target`, default 0); 0.0 for rows without δ-mem or the term."""
    terms: list[torch.Tensor | float] = [0.0] * len(groups)
    for run in runs:
        penalty = None
        for j, row in enumerate(run.rows.tolist()):
            config = groups[row].loss_config
            weight = config.get(WRITE_SPARSITY, 0.0)
            if weight:
                if penalty is None:
                    penalty = run.write_sparsity(config.get(WRITE_SPARSITY_TARGET, 0.0))
                terms[row] = weight * penalty[j]
    return terms


def forward_backward(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    groups: list[TrainGroup],
    pad_id: int,
    micro_batch_tokens: int,
    merge_min_tokens: int,
    forward_only: bool = False,
    delta_ctx: DeltaMemContext | None = None,
) -> list[TrainOutput]:
    """Rows are whole datums, so an episode (one datum) is never split across micro-batches."""
    rows = [(gi, d) for gi, g in enumerate(groups) for d in g.data]
    slots = [groups[gi].slot for gi, _ in rows]
    lengths = [len(d.tokens) for _, d in rows]
    device = next(model.parameters()).device
    logprobs: list[torch.Tensor | None] = [None] * len(rows)
    losses = [0.0] * len(groups)
    budget = merged_budget(groups, micro_batch_tokens, merge_min_tokens)
    for batch in _micro_batches(row_order(slots, table), lengths, budget):
        with torch.set_grad_enabled(not forward_only):
            logits, runs = padded_forward(
                model,
                ctx,
                table,
                [slots[i] for i in batch],
                [rows[i][1].tokens.to(device) for i in batch],
                pad_id,
                [rows[i][1].inputs.get(SEGMENT_IDS) for i in batch],
                delta_ctx,
            )
            total = None
            batch_inputs = [{k: v.to(device) for k, v in rows[i][1].inputs.items()} for i in batch]
            batch_lps = target_logprobs(logits, [inputs["target_tokens"] for inputs in batch_inputs])
            sparsity = _write_sparsity(runs, [groups[rows[i][0]] for i in batch])
            for i, inputs, lp, extra in zip(batch, batch_inputs, batch_lps, sparsity, strict=True):
                gi = rows[i][0]
                group = groups[gi]
                loss = get_loss(group.loss_fn)[0](lp, inputs, group.loss_config) + extra
                logprobs[i] = lp.detach().cpu()
                losses[gi] += loss.item()
                total = loss if total is None else total + loss
        if not forward_only and total is not None and total.requires_grad:
            total.backward()
    outputs = [TrainOutput([], loss) for loss in losses]
    for i, (gi, _) in enumerate(rows):
        outputs[gi].logprobs.append(logprobs[i])
    return outputs
