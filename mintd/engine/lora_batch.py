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
    # per row: index into `slots`; None when the group has one slot, or one row per slot in order
    row_index: torch.Tensor | None
    targets: frozenset[str]


def row_order(slots: list[int], table: AdapterSlots) -> list[int]:
    """Permutation of rows that puts rows of the same group (and the same slot) next to each other."""

    def key(i: int) -> tuple:
        s = slots[i]
        if s == BASE_SLOT:
            return (0, 0, ((), ()), 0)
        spec = table[s].spec
        return (1, spec.rank, spec.target_set, s)

    return sorted(range(len(slots)), key=key)


class LoraBatch:
    """Built once per forward (training) or per generation (sampling); rows must be in `row_order`."""

    def __init__(self, row_slots: list[int], table: AdapterSlots, device: torch.device) -> None:
        self.row_slots = list(row_slots)
        self.table = table
        self.device = device
        self.groups = self._group(row_slots)
        self._weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
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
            if slot != BASE_SLOT:
                members = row_slots[start:end]
                distinct = tuple(dict.fromkeys(members))
                index = None
                if 1 < len(distinct) < len(members):
                    pos = {s: i for i, s in enumerate(distinct)}
                    index = torch.tensor([pos[s] for s in members], device=self.device)
                targets = frozenset(self.table[slot].weights)
                groups.append(_Group(start, end, distinct, index, targets))
            start = end
        return groups

    def _group_key(self, slot: int) -> tuple:
        if slot == BASE_SLOT:
            return ()
        spec = self.table[slot].spec
        return (spec.rank, spec.target_set)

    def select(self, rows: list[int]) -> LoraBatch:
        """The plan for a subset of rows (finished sequences leave a generation)."""
        return LoraBatch([self.row_slots[i] for i in rows], self.table, self.device)

    def _group_weights(self, name: str, gi: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T, B^T·scale) for the group: 2-D for one adapter, per-row 3-D for several."""
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
            b = torch.stack([(b * scale).t() for (_, b), scale in pairs])
            if group.row_index is not None:  # rows sharing a slot: repeat its weights per row
                a, b = a[group.row_index], b[group.row_index]
            weights = (a.to(dtype), b.to(dtype))
        self._weights[(name, gi)] = weights
        return weights

    def _delta(self, name: str, gi: int, xs: torch.Tensor) -> torch.Tensor:
        """scale · (xs Aᵀ) Bᵀ for the rows `xs` of group `gi`."""
        a_t, b_t = self._group_weights(name, gi, xs.dtype)
        if a_t.dim() == 2:
            return (xs @ a_t) @ b_t
        if xs.dim() == 3:  # [rows, tokens, in]: bmm directly, sparing matmul's expand/reshape per call
            return torch.bmm(torch.bmm(xs, a_t), b_t)
        # [rows, in] (one token per row) or [rows, ..., in] (MLA's kv_b_proj sees [rows, 1, tokens, in])
        flat = xs.reshape(len(xs), -1, xs.shape[-1])
        return torch.bmm(torch.bmm(flat, a_t), b_t).reshape(*xs.shape[:-1], -1)

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
        pieces, pos = [], 0
        for gi, group in groups:
            if group.start > pos:
                pieces.append(torch.zeros_like(y[pos : group.start]))
            pieces.append(self._delta(name, gi, x[group.start : group.end]).to(y.dtype))
            pos = group.end
        if pos < len(y):
            pieces.append(torch.zeros_like(y[pos:]))
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
        """Per-token LoRA for one expert: the tokens routed here (`slots` each) span many adapters."""
        for slot in slots.unique().tolist():
            if slot == BASE_SLOT or name not in self.table[slot].weights:
                continue
            adapter = self.table[slot]
            sel = (slots == slot).nonzero().squeeze(1)
            a, b = adapter.weights[name]
            delta = (x[sel] @ a[expert].t().to(x.dtype)) @ b[expert].t().to(x.dtype) * adapter.spec.scale
            h = h.index_add(0, sel, delta)
        return h
