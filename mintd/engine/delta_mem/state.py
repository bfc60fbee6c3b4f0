"""An instance's δ-mem state as bytes, its digest, and the hash chain of the tokens that wrote it.

The state is a pure function of (weights, initial state, token stream, write policy), so what a catalog
`memory` revision needs from the engine is exact bytes (fp32, little-endian, [layers, r, r] row-major:
reloading gives the very same tensor, so a restarted session continues bit for bit), a digest of them
(replay reproduces it on the same device and dtype) and a transcript hash chain h_n = sha256(h_{n-1} ‖
the n-th segment's token ids) that says which tokens were written, without storing them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

GENESIS = "0" * 64  # the chain's value before any segment: an empty state


def state_bytes(state: torch.Tensor) -> bytes:
    """One instance's state [layers, r, r] as fp32 little-endian bytes."""
    if state.dim() != 3 or state.shape[1] != state.shape[2]:
        raise ValueError(f"delta_mem state: shape {tuple(state.shape)}, expected [layers, r, r]")
    return state.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def state_from_bytes(data: bytes, layers: int, rank: int) -> torch.Tensor:
    """The inverse of `state_bytes`, refusing bytes of another shape."""
    expected = layers * rank * rank * 4
    if len(data) != expected:
        raise ValueError(
            f"delta_mem state: {len(data)} bytes, expected {expected} ({layers}×{rank}×{rank} fp32)"
        )
    array = np.frombuffer(data, dtype="<f4").reshape(layers, rank, rank)
    return torch.from_numpy(array.astype(np.float32))


def state_digest(state: torch.Tensor) -> str:
    return hashlib.sha256(state_bytes(state)).hexdigest()


def chain(previous: str, tokens: Sequence[int]) -> str:
    """The transcript chain after writing one more segment of `tokens` (int32 little-endian ids)."""
    data = np.asarray(list(tokens), dtype="<i4").tobytes()
    return hashlib.sha256(bytes.fromhex(previous) + data).hexdigest()
