"""A batch's adapter plan: which slot each row uses, and the stacked weights the wrappers apply.

Rows are ordered so that rows whose adapters share a rank and target set sit next to each other; each
such group costs two batched matmuls per layer, whatever the number of adapters in it. A group holding
one adapter uses plain matmuls with the adapter's own tensors (no copy). Adapters of different ranks
fall in different groups, so nothing is padded to the batch's largest rank. Rows on slot 0 (the base)
get no delta at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mintd.engine.adapters import BASE_SLOT, AdapterSlots


@dataclass(frozen=True)
class _Group:
    start: int
    end: int
    slots: tuple[int, ...]  # distinct slots in the group, in row order
    counts: tuple[int, ...]  # rows of each slot (a slot's rows are adjacent)
    targets: frozenset[str]


def group_key(slot: int, table: AdapterSlots) -> tuple:
    """Adapters with equal keys batch together: same rank and target set (the base, and adapters with no
    LoRA matrices such as a δ-mem adapter alone: the group that gets no LoRA delta)."""
    if slot == BASE_SLOT or not table[slot].weights:
        return ()
    spec = table[slot].spec
    return (spec.rank, spec.target_set)


def expert_delta(
    table: AdapterSlots, name: str, expert: int, x: torch.Tensor, slots: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """Per-token LoRA for one expert: the tokens routed here (`slots` each) span many adapters."""
    for slot in slots.unique().tolist():
        if slot == BASE_SLOT or name not in table[slot].weights:
            continue
        adapter = table[slot]
        sel = (slots == slot).nonzero().squeeze(1)
        a, b = adapter.weights[name]
        delta = (x[sel] @ a[expert].t().to(x.dtype)) @ b[expert].t().to(x.dtype) * adapter.spec.scale
        h = h.index_add(0, sel, delta)
    return h


def padding_index(lengths: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For segments of unequal `lengths` (tokens in a row, in order): where each token sits in the
    [segments, longest] padded layout (padding repeats a segment's first token), and where each token
    comes back from; None when all lengths are equal (the flat tokens already are that layout)."""
    if len(set(lengths)) == 1:
        return None
    longest = max(lengths)
    gather, scatter, offset = [], [], 0
    for i, length in enumerate(lengths):
        gather.extend(range(offset, offset + length))
        gather.extend([offset] * (longest - length))  # padding rows: computed, never read back
        scatter.extend(range(i * longest, i * longest + length))
        offset += length
    return torch.tensor(gather, device=device), torch.tensor(scatter, device=device)


def segment_bmm(
    x: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    padding: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """(x_i Aᵢᵀ) Bᵢᵀ for consecutive segments x_i of the flat tokens `x` [tokens, in], with stacked
    `a_t` [segments, in, r] and `b_t` [segments, r, out]: two `bmm` calls in all."""
    k = len(a_t)
    if padding is None:
        return torch.bmm(torch.bmm(x.view(k, -1, x.shape[-1]), a_t), b_t).view(len(x), -1)
    gather, scatter = padding
    out = torch.bmm(torch.bmm(x[gather].view(k, -1, x.shape[-1]), a_t), b_t)
    return out.view(-1, out.shape[-1])[scatter]


def row_order(
    slots: list[int],
    table: AdapterSlots,
    tokens: list[int] | None = None,
    position: dict[int, int] | None = None,
) -> list[int]:
    """Permutation of rows that puts rows of the same group (and the same slot) next to each other.

    With `tokens` (each row's tokens in a flat step), a group's slots go by their step's token count,
    so segments of equal length (decodes, chunks alike) are adjacent and each length is one run of
    views for `lora_flat` rather than a gather of tokens and weights at every layer. Where `position`
    is given (each slot's row in its group's weight bank), a group's slots go by it instead."""
    per_slot: dict[int, int] = {}
    if tokens is not None:
        for s, n in zip(slots, tokens, strict=True):
            per_slot[s] = per_slot.get(s, 0) + n

    def key(i: int) -> tuple:
        s = slots[i]
        if s == BASE_SLOT or not table[s].weights:
            return (0, 0, ((), ()), 0, s)
        spec = table[s].spec
        return (1, spec.rank, spec.target_set, *((position[s],) if position else (per_slot.get(s, 0), s)))

    return sorted(range(len(slots)), key=key)


class LoraBatch:
    """Built once per forward (training) or per generation (sampling); rows must be in `row_order`."""

    def __init__(self, row_slots: list[int], table: AdapterSlots, device: torch.device) -> None:
        self.row_slots = list(row_slots)
        self.table = table
        self.device = device
        self.groups = self._group(row_slots)
        self._weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._padding: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._token_slots: torch.Tensor | None = None

    def _group(self, row_slots: list[int]) -> list[_Group]:
        groups: list[_Group] = []
        start = 0
        while start < len(row_slots):
            slot = row_slots[start]
            key = self._group_key(slot)
            end = start + 1
            while end < len(row_slots) and self._group_key(row_slots[end]) == key:
                end += 1
            if key != ():
                members = row_slots[start:end]
                distinct = tuple(dict.fromkeys(members))
                counts = tuple(members.count(s) for s in distinct)
                targets = frozenset(self.table[slot].weights)
                groups.append(_Group(start, end, distinct, counts, targets))
            start = end
        return groups

    def _group_key(self, slot: int) -> tuple:
        return group_key(slot, self.table)

    def _group_weights(self, name: str, gi: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T, B^T·scale) for the group: 2-D for one adapter, stacked 3-D (one per slot) for several."""
        cached = self._weights.get((name, gi))
        if cached is not None:
            return cached
        group = self.groups[gi]
        pairs = [(self.table[s].weights[name], self.table[s].spec.scale) for s in group.slots]
        if len(group.slots) == 1:
            (a, b), scale = pairs[0]
            weights = (a.t().to(dtype), (b * scale).t().to(dtype))
        else:
            # A^T as a transposed view, B^T stored contiguous: the layouts CPU bmm runs fastest
            a = torch.stack([a for (a, _), _ in pairs]).transpose(1, 2)
            b = torch.stack([b.t() for (_, b), _ in pairs])
            scales = torch.tensor([scale for _, scale in pairs], dtype=b.dtype, device=b.device)
            b = b * scales.view(-1, 1, 1)  # one product per group, not one per adapter (and its backward)
            weights = (a.to(dtype), b.to(dtype))
        self._weights[(name, gi)] = weights
        return weights

    def _delta(self, name: str, gi: int, xs: torch.Tensor) -> torch.Tensor:
        """scale · (xs Aᵀ) Bᵀ for the rows `xs` of group `gi`: one segment of tokens per slot (its rows),
        so rows sharing an adapter share its weights, never a copy per row."""
        a_t, b_t = self._group_weights(name, gi, xs.dtype)
        if a_t.dim() == 2:
            return (xs @ a_t) @ b_t
        # [rows, tokens, in], [rows, in] (one token per row) or [rows, ..., in] (MLA's kv_b_proj)
        flat = xs.reshape(-1, xs.shape[-1])
        per_row = len(flat) // len(xs)
        lengths = tuple(c * per_row for c in self.groups[gi].counts)
        if (gi, per_row) not in self._padding:
            self._padding[gi, per_row] = padding_index(lengths, xs.device)
        out = segment_bmm(flat, a_t, b_t, self._padding[gi, per_row])
        return out.view(*xs.shape[:-1], -1)

    def add_linear_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y[rows] += scale · (x[rows] Aᵀ) Bᵀ for each group that adapts `name`.

        Without autograd the deltas are added in place. Under autograd, an in-place add into a row
        slice of `y` makes backward clone the whole output gradient once per group (CopySlices), so
        there the deltas are concatenated (zeros for rows no group adapts) and added once: same values.

        Activations flattened to [rows * tokens, features] (Qwen3-Next's shared expert) are viewed as rows.
        """
        groups = [(gi, g) for gi, g in enumerate(self.groups) if name in g.targets]
        if not groups:
            return y
        rows = len(self.row_slots)
        if len(x) != rows:
            shape = y.shape
            x, y = x.view(rows, -1, x.shape[-1]), y.view(rows, -1, y.shape[-1])
            return self.add_linear_delta(name, x, y).view(shape)
        if not torch.is_grad_enabled():
            for gi, group in groups:
                y[group.start : group.end] += self._delta(name, gi, x[group.start : group.end])
            return y
        # One split of x (its backward is one cat), not a slice per group: a slice's backward writes its
        # gradient into a zero-filled copy of all of x, once per group and target.
        sizes, spans, pos = [], [], 0
        for gi, group in groups:
            if group.start > pos:
                sizes.append(group.start - pos)
                spans.append(None)
            sizes.append(group.end - group.start)
            spans.append(gi)
            pos = group.end
        if pos < rows:
            sizes.append(rows - pos)
            spans.append(None)
        parts = x.split(sizes) if len(sizes) > 1 else (x,)
        pieces = [
            torch.zeros_like(y[: len(xs)]) if gi is None else self._delta(name, gi, xs).to(y.dtype)
            for gi, xs in zip(spans, parts, strict=True)
        ]
        return y + (pieces[0] if len(pieces) == 1 else torch.cat(pieces))

    def token_slots(self, num_tokens: int) -> torch.Tensor:
        """Slot of every token of the flattened [rows * seq] activations (MoE experts need this)."""
        if self._token_slots is None or len(self._token_slots) != num_tokens:
            per_row = num_tokens // len(self.row_slots)
            rows = torch.tensor(self.row_slots, device=self.device)
            self._token_slots = rows.repeat_interleave(per_row)
        return self._token_slots

    def add_expert_delta(
        self, name: str, expert: int, x: torch.Tensor, slots: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        return expert_delta(self.table, name, expert, x, slots, h)
