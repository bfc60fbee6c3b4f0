"""δ-mem adapter weights: per attention layer, the memory projections, the write gate and the q/o readouts.

Only these are trained; the state they write is not a weight but per-sequence data (`DeltaMemRun`).
Everything runs in fp32 whatever the base dtype: the state is fp32 and lives across calls, and the
corrections are cast to the base's dtype only when added.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mintd.lora_config import DeltaMemSpec

GATE_BIAS_INIT = -1.5  # the release's initial write gate: β = σ(-1.5) ≈ 0.18
BASE_SLICE_GAIN = 0.05  # the release's `base_slice_fixed` readout scale


class DeltaMemLayer(nn.Module):
    """One attention layer's δ-mem weights (hidden size d, q_proj width d_q)."""

    def __init__(self, spec: DeltaMemSpec, hidden: int, q_width: int) -> None:
        super().__init__()
        r = spec.rank
        self.scale = spec.scale
        self.memory_q = nn.Parameter(torch.empty(r, hidden))
        self.memory_k = nn.Parameter(torch.empty(r, hidden))
        self.memory_v = nn.Parameter(torch.empty(r, hidden))
        self.gate_weight = nn.Parameter(torch.zeros(r, hidden))
        self.gate_bias = nn.Parameter(torch.full((r,), GATE_BIAS_INIT))
        self.read_q = nn.Parameter(torch.zeros(q_width, r))
        self.read_o = nn.Parameter(torch.zeros(hidden, r))

    def reset(
        self, generator: torch.Generator, q_weight: torch.Tensor, o_weight: torch.Tensor, init: str
    ) -> None:
        """Kaiming-uniform memory projections (as nn.Linear), zero gate weights; readouts per `init`
        from the base's q_proj [d_q, d] and o_proj [d, d_q] weights."""
        bound = 1 / math.sqrt(self.memory_q.shape[1])
        with torch.no_grad():
            for p in (self.memory_q, self.memory_k, self.memory_v):
                p.uniform_(-bound, bound, generator=generator)
            if init == "base_slice":
                r = self.read_q.shape[1]
                for read, base in ((self.read_q, q_weight), (self.read_o, o_weight)):
                    read.copy_(F.normalize(base[:, :r].float(), dim=0) * BASE_SLICE_GAIN)

    def memory_query(self, x: torch.Tensor) -> torch.Tensor:
        """q̃ [B, T, r] fp32: what each token reads the state with."""
        return F.normalize(torch.tanh(x.float() @ self.memory_q.t()), dim=-1)

    def memory_inputs(
        self, x: torch.Tensor, write: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q̃, k̃, v, β) [B, T, r] in fp32 for the attention input x [B, T, d]; β = 0 where `write`
        [B, T] is false (padding, read-only tokens), so those tokens leave the state unchanged."""
        x = x.float()
        q, k = self.memory_query(x), F.normalize(torch.tanh(x @ self.memory_k.t()), dim=-1)
        v = x @ self.memory_v.t()
        beta = torch.sigmoid(x @ self.gate_weight.t() + self.gate_bias)
        if write is not None:
            beta = beta * write.unsqueeze(-1).to(beta.dtype)
        return q, k, v, beta

    def correction(self, read: torch.Tensor, which: Literal["q", "o"]) -> torch.Tensor:
        """scale · U m for the reads m [B, T, r]: zero exactly when the reads are (an empty state)."""
        weight = self.read_q if which == "q" else self.read_o
        return (read @ weight.t()) * self.scale


class DeltaMemAdapter(nn.Module):
    """δ-mem weights for every attention layer of one base model, keyed by layer index."""

    def __init__(self, spec: DeltaMemSpec, shapes: dict[int, tuple[int, int]]) -> None:
        super().__init__()
        self.spec = spec
        self.shapes = dict(shapes)  # layer -> (hidden, q_proj width)
        self.layers = nn.ModuleDict({str(i): DeltaMemLayer(spec, d, dq) for i, (d, dq) in shapes.items()})

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.layers]

    def layer(self, index: int) -> DeltaMemLayer:
        return self.layers[str(index)]  # type: ignore[return-value]

    def frozen_copy(self) -> DeltaMemAdapter:
        """A copy that later training of this one does not reach (no gradients, none tracked)."""
        copy = DeltaMemAdapter(self.spec, self.shapes).to(next(self.parameters()).device)
        copy.load_state_dict(self.state_dict())
        return copy.requires_grad_(False)

    def empty_state(self, rows: int) -> torch.Tensor:
        """A fresh instance's state for `rows` sequences: [rows, layers, r, r] fp32 zeros, on the
        adapter's device."""
        r = self.spec.rank
        device = next(self.parameters()).device
        return torch.zeros(rows, len(self.layers), r, r, device=device)
