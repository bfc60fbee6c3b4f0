"""LoRA targets and the layer wrappers that apply many adapters inside one forward pass.

A wrapper owns no adapter weights and never learns an adapter's name. Each forward pass reads the
`LoraBatch` the engine put in the shared `LoraContext`; the batch knows which rows use which slot and
hands each wrapper the stacked weights it needs. Base weights are never modified (no merging).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mintd.engine.lora_batch import LoraBatch

TargetKind = Literal["attn", "mlp", "unembed"]

# Module leaf names and the Tinker LoRA switch (train_attn / train_mlp / train_unembed) that covers them.
LINEAR_KINDS: dict[str, TargetKind] = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
    "lm_head": "unembed",
}


@dataclass(frozen=True)
class LoraTarget:
    """One adapted weight, named the way PEFT names it (module path, or module path + parameter)."""

    name: str
    kind: TargetKind
    in_features: int
    out_features: int
    num_experts: int = 0  # > 0: one A/B pair per expert, shapes [E, r, in] and [E, out, r]

    def shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lead = (self.num_experts,) if self.num_experts else ()
        return (*lead, rank, self.in_features), (*lead, self.out_features, rank)


class LoraContext:
    """Shared by every wrapper of one model: the batch currently running, or None for base-only."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None

    @contextmanager
    def use(self, batch: LoraBatch) -> Iterator[None]:
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, target: LoraTarget, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.ctx.batch
        return y if batch is None else batch.add_linear_delta(self.target.name, x, y)


class MultiLoraExperts(nn.Module):
    """Fused MoE experts (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) with per-expert LoRA.

    Tokens of one expert come from many rows, so here the slot index is per token.
    """

    def __init__(self, base: nn.Module, name: str, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.gate_up_name = f"{name}.gate_up_proj"
        self.down_name = f"{name}.down_proj"

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        batch = self.ctx.batch
        token_slots = batch.token_slots(len(hidden)) if batch is not None else None
        out = torch.zeros_like(hidden)
        for expert in top_k_index.unique().tolist():
            token_idx, k_pos = torch.where(top_k_index == expert)
            x = hidden[token_idx]
            h = F.linear(x, self.base.gate_up_proj[expert])
            if batch is not None:
                h = batch.add_expert_delta(self.gate_up_name, expert, x, token_slots[token_idx], h)
            gate, up = h.chunk(2, dim=-1)
            a = self.base.act_fn(gate) * up
            o = F.linear(a, self.base.down_proj[expert])
            if batch is not None:
                o = batch.add_expert_delta(self.down_name, expert, a, token_slots[token_idx], o)
            out.index_add_(0, token_idx, (o * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and hasattr(module, "act_fn")
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
    )


def install_lora(model: nn.Module, ctx: LoraContext) -> dict[str, LoraTarget]:
    """Wrap every adaptable layer of `model` in place; return the targets by name."""
    targets: dict[str, LoraTarget] = {}
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in LINEAR_KINDS:
            target = LoraTarget(name, LINEAR_KINDS[leaf], module.in_features, module.out_features)
            targets[name] = target
            replacements.append((name, MultiLoraLinear(module, target, ctx)))
        elif _is_fused_experts(module):
            num_experts, double_inter, hidden = module.gate_up_proj.shape
            for param, (d_in, d_out) in (
                ("gate_up_proj", (hidden, double_inter)),
                ("down_proj", (double_inter // 2, hidden)),
            ):
                full = f"{name}.{param}"
                targets[full] = LoraTarget(full, "mlp", d_in, d_out, num_experts)
            replacements.append((name, MultiLoraExperts(module, name, ctx)))
    if not targets:
        raise ValueError(
            f"{type(model).__name__}: no LoRA target layers found (expected q/k/v/o_proj, gate/up/down_proj)"
        )
    for name, wrapper in replacements:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, wrapper)
    return targets
