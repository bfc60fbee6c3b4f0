"""LoRA over a flat token batch: a per-token adapter index, applied segment by segment.

The step engine lays a step's tokens out as one flat batch ([1, tokens, features]) in which the tokens
of each slot are contiguous and slots of one rank and target set are adjacent (vLLM's token → LoRA
mapping, Punica's segments). Each such group costs one shrink and one expand per layer, whatever its
number of adapters, and nothing is padded to a larger rank. The weights a group needs are stacked once
and kept while the group's composition stays the same (across steps), never copied per row: the n
samples of one prompt are one segment of one adapter.

The math sits behind `LoraBackend`; `TorchBackend` is plain torch (CPU and CUDA). A fused kernel
(SGMV/BGMV style) would be another backend with the same `delta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mintd.engine.adapters import BASE_SLOT, AdapterSlots
from mintd.engine.lora_batch import expert_delta, group_key, padding_index, segment_bmm


@dataclass(frozen=True)
class SegmentGroup:
    """Consecutive tokens [start, end) of adapters alike in rank and targets, one segment per slot."""

    start: int
    end: int
    slots: tuple[int, ...]
    lengths: tuple[int, ...]  # tokens per slot, in order
    targets: frozenset[str]
    # when lengths differ: where each token sits in the [slots, longest] padded layout, and back
    padding: tuple[torch.Tensor, torch.Tensor] | None = None


Weights = tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]


class LoraBackend(Protocol):
    def delta(self, x: torch.Tensor, group: SegmentGroup, weights: Weights) -> torch.Tensor:
        """scale · (x Aᵀ) Bᵀ for the group's tokens `x` [tokens, in], each with its own slot's weights:
        (Aᵀ [in, r], Bᵀ [r, out]) for one slot, the same stacked ([slots, in, r], [slots, r, out]) for
        several, or a list of per-slot pairs (a composition not stacked yet)."""
        ...


class TorchBackend:
    """Segment GEMMs with torch: plain matmuls for one adapter or per segment, two `bmm` over
    [slots, tokens, in] for stacked weights (a view when every segment has the same length, the usual
    decode and GRPO case)."""

    def delta(self, x: torch.Tensor, group: SegmentGroup, weights: Weights) -> torch.Tensor:
        if isinstance(weights, list):
            pieces, pos = [], 0
            for (a_t, b_t), n in zip(weights, group.lengths, strict=True):
                pieces.append((x[pos : pos + n] @ a_t) @ b_t)
                pos += n
            return torch.cat(pieces)
        a_t, b_t = weights
        if a_t.dim() == 2:
            return (x @ a_t) @ b_t
        return segment_bmm(x, a_t, b_t, group.padding)


class WeightCache:
    """Weights ready for the backend, in the compute dtype: (Aᵀ, Bᵀ·scale) per slot, and stacked per
    composition of a group. Frozen adapters' entries (sampling snapshots, loaded revisions) are kept
    across steps; an entry no step used since the previous `sweep` is dropped, so an adapter that left
    or was freed costs nothing. A composition is stacked from the second step in a row that runs it:
    its first step (a request just joined or left) runs per-segment products instead of copying every
    adapter of the group for one step."""

    def __init__(self, table: AdapterSlots) -> None:
        self.table = table
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._used: set[tuple] = set()
        self._seen: set[tuple] = set()  # compositions the previous step ran
        self._seen_now: set[tuple] = set()

    def get(self, name: str, slots: tuple[int, ...], dtype: torch.dtype) -> Weights:
        if len(slots) == 1:
            return self._cached((name, slots, dtype), lambda: self._single(name, slots[0], dtype), slots)
        key = (name, slots, dtype)
        self._seen_now.add(key)
        if key in self._entries or key in self._seen:
            return self._cached(key, lambda: self._stack(name, slots, dtype), slots)
        return [self.get(name, (s,), dtype) for s in slots]

    def _cached(self, key: tuple, make, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._entries.get(key)
        if cached is None:
            with torch.no_grad():
                cached = make()
            if any(self.table[s].trainable for s in slots):  # a trainable adapter changes every step
                return cached
            self._entries[key] = cached
        self._used.add(key)
        return cached

    def _single(self, name: str, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self.table[slot]
        a, b = adapter.weights[name]
        return a.t().to(dtype), (b * adapter.spec.scale).t().to(dtype)

    def _stack(
        self, name: str, slots: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aᵀ as a transposed view of stacked A ([slots, r, in] in memory) and Bᵀ contiguous: the layouts
        CPU `bmm` runs fastest on (a token's dot products run along contiguous rows of A)."""
        adapters = [self.table[s] for s in slots]
        a = torch.stack([ad.weights[name][0] for ad in adapters]).transpose(1, 2)
        b = torch.stack([(ad.weights[name][1] * ad.spec.scale).t() for ad in adapters])
        return a.to(dtype), b.to(dtype)

    def sweep(self) -> None:
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._used = set()
        self._seen, self._seen_now = self._seen_now, set()


def merge_segments(slots: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """(slot, tokens) runs, adjacent equal slots merged."""
    out: list[tuple[int, int]] = []
    for slot, n in zip(slots, lengths, strict=True):
        if n == 0:
            continue
        if out and out[-1][0] == slot:
            out[-1] = (slot, out[-1][1] + n)
        else:
            out.append((slot, n))
    return out


def plan_groups(
    segments: list[tuple[int, int]], table: AdapterSlots, device: torch.device
) -> list[SegmentGroup]:
    """Groups over (slot, tokens) segments in flat order, in which each slot appears once and alike slots
    are adjacent (ordered by `lora_batch.row_order`)."""
    groups: list[SegmentGroup] = []
    i, pos = 0, 0
    while i < len(segments):
        key = group_key(segments[i][0], table)
        j = i
        while j < len(segments) and group_key(segments[j][0], table) == key:
            j += 1
        slots = tuple(s for s, _ in segments[i:j])
        lengths = tuple(n for _, n in segments[i:j])
        if slots[0] != BASE_SLOT:
            groups.append(_group(pos, pos + sum(lengths), slots, lengths, table, device))
        pos += sum(lengths)
        i = j
    return groups


def _group(
    start: int, end: int, slots: tuple[int, ...], lengths: tuple[int, ...], table: AdapterSlots, device
) -> SegmentGroup:
    targets = frozenset(table[slots[0]].weights)
    if len(slots) != len(set(slots)):
        raise ValueError("flat LoRA batch: a slot's tokens must be contiguous")
    padding = None if len(slots) == 1 else padding_index(lengths, device)
    return SegmentGroup(start, end, slots, lengths, targets, padding)


class FlatLoraBatch:
    """The LoRA plan of one flat step, from its (slot, tokens) segments. `kept` are the segments of the
    positions whose logits are computed (the LM head sees only those), in the same order."""

    def __init__(
        self,
        segments: list[tuple[int, int]],
        kept: list[tuple[int, int]],
        table: AdapterSlots,
        weights: WeightCache,
        backend: LoraBackend,
        compute_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        self.table = table
        self.weights = weights
        self.backend = backend
        self.compute_dtype = compute_dtype
        self.device = device
        self._segments = {sum(n for _, n in kept): kept, sum(n for _, n in segments): segments}
        self._plans = {n: plan_groups(segs, table, device) for n, segs in self._segments.items()}
        self._slot_tensors: dict[int, torch.Tensor] = {}

    def add_linear_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for group in self._plans[len(x2)]:
            if name not in group.targets:
                continue
            xs = x2[group.start : group.end]
            dtype = self.compute_dtype or xs.dtype
            delta = self.backend.delta(xs.to(dtype), group, self.weights.get(name, group.slots, dtype))
            y2[group.start : group.end] += delta.to(y2.dtype)
        return y

    def token_slots(self, num_tokens: int) -> torch.Tensor:
        if num_tokens not in self._slot_tensors:
            slots, lengths = zip(*self._segments[num_tokens], strict=True)
            self._slot_tensors[num_tokens] = torch.tensor(slots, device=self.device).repeat_interleave(
                torch.tensor(lengths, device=self.device)
            )
        return self._slot_tensors[num_tokens]

    def add_expert_delta(
        self, name: str, expert: int, x: torch.Tensor, slots: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        return expert_delta(self.table, name, expert, x, slots, h)
