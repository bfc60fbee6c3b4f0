"""Linear combinations of LoRA adapters of one base model, exactly, and optional SVD compression.

An adapter's delta on a module is Δ = s·B·A (s = alpha / rank; A [.., r, in], B [.., out, r]; leading
dims are fused MoE experts). Σᵢ cᵢ·Δᵢ is itself a LoRA of rank Σᵢ rᵢ: stack the A's and put cᵢ·sᵢ/s·Bᵢ
side by side, so the result is exact for any coefficients, ranks and target sets (a module one source
does not adapt contributes zero blocks). `compress` then keeps the best rank-k approximation per module
(Eckart–Young, through QR of the factors, never forming the full out × in matrix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mintd.engine.adapters import LoraSpec
from mintd.families import LINEAR_KINDS

Tensors = dict[str, torch.Tensor]
DEFAULT_ALPHA = 32.0  # Tinker's convention: scale = 32 / rank


def union_spec(specs: Sequence[LoraSpec], rank: int, alpha: float = DEFAULT_ALPHA) -> LoraSpec:
    """A spec that adapts every module any of `specs` adapts."""
    kinds = set().union(*(s.kinds for s in specs))
    modules: tuple[str, ...] | None = None
    if any(s.target_modules is not None for s in specs):
        leaves = set()
        for s in specs:
            leaves |= set(s.target_modules or (m for m, kind in LINEAR_KINDS.items() if kind in s.kinds))
        modules = tuple(sorted(leaves))
    return LoraSpec(
        rank=rank,
        alpha=alpha,
        train_attn="attn" in kinds,
        train_mlp="mlp" in kinds,
        train_unembed="unembed" in kinds,
        target_modules=modules,
    )


def _targets(tensors: Tensors) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_A")}


def combine(
    sources: Sequence[tuple[LoraSpec, Tensors]], coefficients: Sequence[float], alpha: float = DEFAULT_ALPHA
) -> tuple[LoraSpec, Tensors]:
    """Σ cᵢ·Δᵢ as one adapter of rank Σ rᵢ (exact up to float rounding)."""
    if len(sources) != len(coefficients):
        raise ValueError(f"coefficients: {len(coefficients)} given for {len(sources)} sources")
    rank = sum(spec.rank for spec, _ in sources)
    spec = union_spec([s for s, _ in sources], rank, alpha)
    out: Tensors = {}
    for target in sorted(set().union(*(_targets(t) for _, t in sources))):
        a_blocks, b_blocks = [], []
        like = next(t for _, t in sources if f"{target}.lora_A" in t)
        a_like, b_like = like[f"{target}.lora_A"], like[f"{target}.lora_B"]
        for (src, tensors), c in zip(sources, coefficients, strict=True):
            a, b = tensors.get(f"{target}.lora_A"), tensors.get(f"{target}.lora_B")
            if a is None or b is None:  # a module this source does not adapt: zero blocks
                a = a_like.new_zeros((*a_like.shape[:-2], src.rank, a_like.shape[-1]))
                b = b_like.new_zeros((*b_like.shape[:-1], src.rank))
            a_blocks.append(a.double())
            b_blocks.append(b.double() * (c * src.scale / spec.scale))
        out[f"{target}.lora_A"] = torch.cat(a_blocks, dim=-2).to(a_like.dtype)
        out[f"{target}.lora_B"] = torch.cat(b_blocks, dim=-1).to(b_like.dtype)
    return spec, out


def compress(spec: LoraSpec, tensors: Tensors, rank: int) -> tuple[LoraSpec, Tensors, float]:
    """The best rank-`rank` approximation of every module's delta, and the relative Frobenius error
    ‖Δ − Δₖ‖ / ‖Δ‖ over all modules together (0 when nothing was cut)."""
    out_spec = spec.model_copy(update={"rank": rank})
    out: Tensors = {}
    cut, total = 0.0, 0.0
    for target in sorted(_targets(tensors)):
        a, b = tensors[f"{target}.lora_A"], tensors[f"{target}.lora_B"]
        q_b, r_b = torch.linalg.qr(b.double())  # B = Q_b R_b
        q_a, r_a = torch.linalg.qr(a.double().transpose(-1, -2))  # Aᵀ = Q_a R_a
        u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(-1, -2))  # B·A = Q_b (U S Vh) Q_aᵀ
        k = min(rank, s.shape[-1])
        total += float((s**2).sum()) * spec.scale**2
        cut += float((s[..., k:] ** 2).sum()) * spec.scale**2
        new_a = vh[..., :k, :] @ q_a.transpose(-1, -2)
        new_b = (q_b @ u[..., :, :k]) * s[..., None, :k] * (spec.scale / out_spec.scale)
        if k < rank:  # fewer singular values than the rank asked for: zero-pad
            new_a = torch.cat([new_a, new_a.new_zeros((*new_a.shape[:-2], rank - k, new_a.shape[-1]))], -2)
            new_b = torch.cat([new_b, new_b.new_zeros((*new_b.shape[:-1], rank - k))], -1)
        out[f"{target}.lora_A"] = new_a.to(a.dtype).contiguous()
        out[f"{target}.lora_B"] = new_b.to(b.dtype).contiguous()
    return out_spec, out, math.sqrt(cut / total) if total > 0 else 0.0
