"""Frozen base linears run through oneDNN on CPU, their weights pre-packed in place.

On CPU, `F.linear` reads its weight far below the machine's bandwidth: in bfloat16 at a third of what
the same machine reaches with the weight reordered once into oneDNN's blocked layout (25 vs 82 GB/s at
one row); in float32 it goes to MKL's sgemm, which on the project's 2-core AMD machine takes 1.24 ms
for a 1024 -> 3072 linear at 16 rows where oneDNN on the packed weight takes 0.48 ms (a 151,936-row
unembedding: 119 vs 29 ms). vLLM's CPU backend and torch.compile's freezing pass pack weights the same
way.

The packed weight replaces the plain one (`linear.weight` becomes the oneDNN tensor): one copy of the
base linears, not two. (Weights memory-mapped from the checkpoint leave the pages packing read in the
page cache, clean and reclaimable.) Training, which needs the input's gradient through the frozen
base, gets it from a plain copy unpacked for the backward pass only. A weight that another module
also reads (embeddings tied to the unembedding) keeps its plain layout, which oneDNN reads too,
without the reorder's gain.
"""

from __future__ import annotations

import torch
from torch import nn

# rows a decode step usually runs: oneDNN picks the packed layout for this many
BATCH_HINT = 16


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """A linear's weight in the plain [out, in] layout, packed or not: for code that reads the base's
    values (a δ-mem readout initialised from them), not for the forward pass."""
    return _plain(linear.weight)


def _plain(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_dense() if weight.is_mkldnn else weight


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: the backward pass gives the input's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ _plain(ctx.weight), None, None


class PackedLinear:
    """Computes a frozen `nn.Linear` through oneDNN; with `pack`, first reorders its weight in place."""

    def __init__(self, linear: nn.Linear, pack: bool = True) -> None:
        if pack:
            weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
            linear.weight = nn.Parameter(weight, requires_grad=False)
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, weight, bias)
        return _linear(x, weight, bias)
