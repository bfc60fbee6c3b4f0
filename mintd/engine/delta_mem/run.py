"""A δ-mem run: one adapter's per-row states, carried across the forward calls of a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from mintd.engine.delta_mem.adapter import DeltaMemAdapter
from mintd.engine.delta_mem.scan import DEFAULT_CHUNK, chunked_scan, step


class MemoryRun(Protocol):
    """What the hooks need of a run: its adapter, its reads per layer (kept from the q_proj hook for the
    o_proj hook), the scan over its tokens of the batch, and adding a correction to those tokens only."""

    adapter: DeltaMemAdapter
    _reads: dict[int, torch.Tensor]

    def read_and_write(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...
    def add(self, out: torch.Tensor, correction: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DeltaMemRun:
    """One sequence batch under a δ-mem adapter: each row's state, carried across forward calls (a
    prefill, then decode steps), and which tokens of the next call write.

    `states` holds one [B, r, r] fp32 tensor per layer, replaced (never modified in place) by every
    call, so autograd reaches through all calls into the initial state and the weights."""

    adapter: DeltaMemAdapter
    states: list[torch.Tensor]
    # which rows of the batch this run's adapter and states serve (None: all); other rows are untouched
    rows: torch.Tensor | None = None
    writes: bool = True  # False: read-only, every token reads the fixed state
    write_mask: torch.Tensor | None = None  # [batch, T] for the next call; None: every token writes
    chunk: int = DEFAULT_CHUNK
    _reads: dict[int, torch.Tensor] = field(default_factory=dict)
    # per row: Σβ over every written token, layer and state row so far, and how many gates that is
    _gate_sum: torch.Tensor | float = 0.0
    _gate_count: torch.Tensor | int = 0

    @classmethod
    def start(cls, adapter: DeltaMemAdapter, state: torch.Tensor, **kwargs) -> DeltaMemRun:
        """From a stacked state [rows, layers, r, r]."""
        return cls(adapter, list(state.float().unbind(1)), **kwargs)

    def state(self) -> torch.Tensor:
        """The current state, stacked: [B, layers, r, r]."""
        return torch.stack(self.states, dim=1)

    def write_sparsity(self, target: float) -> torch.Tensor:
        """The release's optional regulariser per row [rows], (mean β − target)², the mean over every
        gate the row's writes used (all layers, written tokens, state rows): weighted and added to the
        loss, it pushes toward rare, small writes. Per row, so a datum's term does not depend on which
        others share its batch."""
        mean = torch.as_tensor(self._gate_sum) / torch.clamp(torch.as_tensor(self._gate_count), min=1)
        return (mean - target) ** 2

    def add(self, out: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """`out` [batch, T, width] with the correction [rows, T, width] added to this run's rows only."""
        correction = correction.to(out.dtype)
        return out + correction if self.rows is None else out.index_add(0, self.rows, correction)

    def read_and_write(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Reads m [rows, T, r] of this run's rows of the batch's tokens x [batch, T, d] from the layer's
        state, which advances past them."""
        weights = self.adapter.layer(layer)
        state = self.states[layer]
        if self.write_mask is not None and self.write_mask.shape != x.shape[:2]:
            raise ValueError(
                f"delta_mem write_mask {tuple(self.write_mask.shape)} does not match this call's tokens "
                f"{tuple(x.shape[:2])}: set it (or None) before every forward"
            )
        write = self.write_mask
        if self.rows is not None:
            x = x[self.rows]
            write = None if write is None else write[self.rows]
        if not self.writes:
            return torch.einsum("bik,btk->bti", state, weights.memory_query(x))
        q, k, v, beta = weights.memory_inputs(x, write)
        self._gate_sum = self._gate_sum + beta.sum(dim=(1, 2))
        written = write.sum(dim=1) if write is not None else torch.full((len(beta),), beta.shape[1])
        self._gate_count = self._gate_count + written.to(beta.device) * beta.shape[2]
        if x.shape[1] == 1:  # decode: the one-token step of the same update
            read, self.states[layer] = step(state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0])
            return read.unsqueeze(1)
        read, self.states[layer] = chunked_scan(state, q, k, v, beta, self.chunk)
        return read
