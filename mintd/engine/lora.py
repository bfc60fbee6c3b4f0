"""LoRA targets and the layer wrappers that apply many adapters inside one forward pass.

A wrapper owns no adapter weights and never learns an adapter's name. Each forward pass reads the
`LoraBatch` the engine put in the shared `LoraContext`; the batch knows which rows use which slot and
hands each wrapper the stacked weights it needs. Base weights are never modified (no merging).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mintd.families import Found, TargetKind, UnclassifiedLayerError

if TYPE_CHECKING:
    from mintd.engine.lora_batch import LoraBatch


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
        self.packed: Callable[[torch.Tensor], torch.Tensor] | None = None  # the base through oneDNN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) if self.packed is None else self.packed(x)
        batch = self.ctx.batch
        return y if batch is None else batch.add_linear_delta(self.target.name, x, y)


class MultiLoraExperts(nn.Module):
    """Fused MoE experts with per-expert LoRA, in either layout transformers uses:

    - output-major (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `F.linear`, `act_fn(gate) * up` on
      halves): Qwen3-MoE, DeepSeek-V3, Qwen3-Next;
    - input-major with biases (`gate_up_proj` [E, H, 2I] + bias, `x @ W + b`, the module's own
      `_apply_gate` on interleaved gate/up): gpt-oss.

    Tokens of one expert come from many rows, so here the slot index is per token.
    """

    def __init__(self, base: nn.Module, name: str, ctx: LoraContext, input_major: bool) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.name = name
        self.input_major = input_major

    def _project(self, x: torch.Tensor, param: str, expert: int, slots: torch.Tensor | None) -> torch.Tensor:
        weight = getattr(self.base, param)[expert]
        if self.input_major:
            h = x @ weight + getattr(self.base, f"{param}_bias")[expert]
        else:
            h = F.linear(x, weight)
        batch = self.ctx.batch
        if batch is not None:
            h = batch.add_expert_delta(f"{self.name}.{param}", expert, x, slots, h)
        return h

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        batch = self.ctx.batch
        token_slots = batch.token_slots(len(hidden)) if batch is not None else None
        out = torch.zeros_like(hidden)
        for expert in top_k_index.unique().tolist():
            token_idx, k_pos = torch.where(top_k_index == expert)
            slots = token_slots[token_idx] if token_slots is not None else None
            h = self._project(hidden[token_idx], "gate_up_proj", expert, slots)
            if self.input_major:
                a = self.base._apply_gate(h)
            else:
                gate, up = h.chunk(2, dim=-1)
                a = self.base.act_fn(gate) * up
            o = self._project(a, "down_proj", expert, slots)
            out.index_add_(0, token_idx, (o * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out


def _experts_layout(module: nn.Module) -> bool | None:
    """True: input-major with biases (gpt-oss); False: output-major, no biases; None: neither.

    transformers marks the layout on the module (`is_transposed`, `has_bias`), and PEFT's ParamWrapper
    reads it too: in/out features are (d1, d2) of a transposed [E, d1, d2] parameter, else (d2, d1)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3):
        return None
    transposed, bias = getattr(module, "is_transposed", False), getattr(module, "has_bias", False)
    if transposed and bias and hasattr(module, "_apply_gate") and hasattr(module, "gate_up_proj_bias"):
        return True
    if not transposed and not bias and hasattr(module, "act_fn"):
        return False
    return None


def install_lora(model: nn.Module, ctx: LoraContext, weights: list[Found]) -> dict[str, LoraTarget]:
    """Wrap every layer the family's contract adapts (`weights`: `families.classify(model, family)`, which
    already refused any weight neither adapted nor excluded), in place; return the targets by name."""
    targets: dict[str, LoraTarget] = {}
    replacements: dict[str, nn.Module] = {}
    for found in weights:
        if found.kind is None:
            continue
        module = model.get_submodule(found.module)
        if isinstance(module, nn.Linear):
            target = LoraTarget(found.module, found.kind, module.in_features, module.out_features)
            targets[target.name] = target
            replacements[found.module] = MultiLoraLinear(module, target, ctx)
            continue
        input_major = _experts_layout(module)
        if input_major is None:
            raise UnclassifiedLayerError(
                f"{found.module}: experts module {type(module).__name__} has a layout mintd cannot adapt"
            )
        num_experts, d1, d2 = getattr(module, found.param).shape
        full = f"{found.module}.{found.param}"
        d_in, d_out = (d1, d2) if input_major else (d2, d1)
        targets[full] = LoraTarget(full, "mlp", d_in, d_out, num_experts)
        replacements[found.module] = MultiLoraExperts(module, found.module, ctx, input_major)
    if not targets:
        raise ValueError(f"{type(model).__name__}: no LoRA target layers found")
    for name, wrapper in replacements.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, wrapper)
    return targets
