"""Frozen base linears pre-packed for oneDNN, for inference on CPU in bfloat16 / float16.

On CPU, `F.linear` in bf16 reads its weight at a third of the bandwidth that the same machine reaches
with the weight reordered once into oneDNN's blocked layout (the profile in the project's reference
notes: 25 vs 82 GB/s at one row); vLLM's CPU backend and torch.compile's freezing pass pack weights the
same way. The packed copy serves forward passes without autograd (sampling steps, forward-only
scoring); training keeps the plain weight, which stays where it is, so the packed copy costs one more
copy of the base linears' bytes.
"""

from __future__ import annotations

import torch
from torch import nn


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear:
    def __init__(self, linear: nn.Linear, batch_hint: int = 16) -> None:
        weight = linear.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = linear.bias.detach() if linear.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])
