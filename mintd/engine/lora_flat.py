"""LoRA over a flat token batch: a per-token adapter index, applied segment by segment.

The step engine lays a step's tokens out as one flat batch ([1, tokens, features]) in which the tokens
of each slot are contiguous and slots of one rank and target set are adjacent (vLLM's token → LoRA
mapping, Punica's segments), and a group's slots go by their tokens in the step. Each such group costs
one shrink and one expand per layer for its decodes and one per block of prompt chunks (`Run`),
whatever its number of adapters; nothing is padded to a larger rank or a longer segment, and nothing is
gathered: tokens and weights are views. Every adapter's weights sit in a row of a bank
per group key, kept so that a group's stack is a view of the bank (its rows consecutive, in order):
nothing is copied per step while the composition holds, and the bank is rewritten once when it
changes (requests joining and leaving under serving load); nothing is copied per row: the n samples
of one prompt are one segment of one adapter.

The math sits behind `LoraBackend`; `TorchBackend` is plain torch (CPU and CUDA); `RowKernelBackend`
runs a group's tokens through mintd's CPU kernel (BGMV style: each token's own adapter rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby
from typing import Protocol

import torch

from mintd.engine.adapters import BASE_SLOT, AdapterSlots
from mintd.engine.lora_batch import expert_delta, group_key, row_order

# at most this many A rows (segments x rank) in one block run (see `Run`): prompt chunks of 4 to 8
# adapters of rank 8 took 0.67-0.72x the time of one product pair per chunk (bf16 model, 2 cores)
BLOCK_COLUMNS = 64
# a block run of at most this many tokens (the decodes of a few popular adapters) multiplies in the
# weights' dtype, as decodes do: bf16 model, float32 weights, 8 to 32 tokens over 3-4 adapters: 14-43 us
# against 39-49 us in bf16 (whose small GEMMs cost more to set up); 100 tokens: 69-171 against 59-80 us
FEW_TOKENS = 48


@dataclass(frozen=True)
class Run:
    """Consecutive segments [first, last) among the group's slots, tokens [start, end) among its tokens.

    Without a `mask`, segments of one `length`: one `bmm` pair over views of the tokens ([segments,
    length, in]) and of the stacked weights. With one, single segments of differing lengths (prompt
    chunks): one product pair over their A rows side by side ([tokens, in] @ [in, segments · r]), each
    token keeping its own segment's r columns (`mask`), instead of a product pair per chunk."""

    length: int
    first: int
    last: int
    start: int
    end: int
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class SegmentGroup:
    """Consecutive tokens [start, end) of adapters alike in rank and targets, one segment per slot."""

    start: int
    end: int
    slots: tuple[int, ...]
    lengths: tuple[int, ...]  # tokens per slot, in order
    targets: frozenset[str]
    # the runs of equal lengths (decodes of one token each) and blocks of prompt chunks of their own
    # lengths: padding them all to the longest would multiply a step's LoRA work by its chunk size. The
    # step puts a group's one-token segments (decodes) first (`WeightCache.order`), so they are one run.
    runs: tuple[Run, ...]

    @cached_property
    def segment(self) -> torch.Tensor:
        """[tokens] each token's slot, as an index into `slots`, on the CPU: only `RowKernelBackend`
        (a CPU kernel) reads it, so a step on another backend never builds it."""
        return torch.arange(len(self.slots)).repeat_interleave(torch.tensor(self.lengths))


class LoraBackend(Protocol):
    def add_delta(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        group: SegmentGroup,
        weights: tuple[torch.Tensor, torch.Tensor],
        x_compute: torch.Tensor,
    ) -> None:
        """y += scale · (x Aᵀ) Bᵀ for the group's tokens `x` [tokens, in] (in the model's dtype;
        `x_compute`: the same in the weights' dtype) and outputs `y` [tokens, out], each with its own
        slot's weights: (Aᵀ [in, r], Bᵀ [r, out]) for one slot, the same stacked ([slots, in, r],
        [slots, r, out]) for several."""
        ...


class TorchBackend:
    """Segment GEMMs with torch: plain matmuls for one adapter; for stacked weights two `bmm` per run
    of equal-length segments, two matmuls per block run, over views of the flat tokens and of the
    weights (nothing gathered).

    With a bfloat16 model on CPU and float32 weights (2 cores with AVX512-BF16): segments of a few
    tokens (decodes) multiply in float32 and add their delta into y, 2-3x faster than a bfloat16
    `baddbmm_` into y (bfloat16 `bmm` is the slow one), and so do block runs of up to `FEW_TOKENS`;
    a block run of more tokens multiplies in y's dtype, 2-3x faster than in float32 (oneDNN's
    bfloat16 GEMM)."""

    def add_delta(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        group: SegmentGroup,
        weights: tuple[torch.Tensor, torch.Tensor],
        x_compute: torch.Tensor,
    ) -> None:
        a_t, b_t = weights
        if a_t.dim() == 2:
            y.add_((x_compute @ a_t) @ b_t)
            return
        for run in group.runs:
            ys = y[run.start : run.end]
            a, b = a_t[run.first : run.last], b_t[run.first : run.last]
            if run.mask is not None:
                xs = (x if run.end - run.start > FEW_TOKENS else x_compute)[run.start : run.end]
                rows = a.transpose(1, 2).reshape(-1, xs.shape[-1]).t().to(xs.dtype)
                shrunk = (xs @ rows).mul_(run.mask)
                if xs.dtype == y.dtype:
                    ys.addmm_(shrunk, b.reshape(-1, b.shape[-1]).to(y.dtype))
                else:
                    ys.add_(shrunk @ b.reshape(-1, b.shape[-1]))
                continue
            k = run.last - run.first
            xs = x_compute[run.start : run.end].view(k, run.length, -1)
            ys.view(k, run.length, -1).add_(torch.bmm(torch.bmm(xs, a), b))


class RowKernelBackend(TorchBackend):
    """mintd's CPU kernel (`kernels.CpuKernels.lora_rows`) for a group of several adapters: one call
    for all its tokens, each token's delta from its own adapter's bank rows, read in the banks' dtype,
    which is then the model's (bf16: half the bytes of float32). bf16, 2 cores, into 512 / 1,408
    outputs: 60 decodes 23 / 48 us against 67 / 121 us for the float32 `bmm` pair; 16 to 400 tokens of
    8 adapters 6-70 / 8-121 us against 42-130 / 51-193 us for the masked GEMM pair of a block run (which
    multiplies each token by all 8 adapters' columns). A lone adapter's tokens stay one GEMM pair."""

    def __init__(self, rows: Callable[..., None]) -> None:
        self.rows = rows

    def add_delta(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        group: SegmentGroup,
        weights: tuple[torch.Tensor, torch.Tensor],
        x_compute: torch.Tensor,
    ) -> None:
        a_t, b_t = weights
        if a_t.dim() == 2:
            super().add_delta(x, y, group, weights, x_compute)
        else:
            self.rows(x_compute, a_t.transpose(1, 2), b_t, group.segment, y)


class _Bank:
    """One tensor per target holding every slot's A ([rows, r, in]) and Bᵀ·scale ([rows, r, out]) of one
    group key, in the compute dtype; a slot's row is written when it first
    runs (a trainable slot's again at each step, its weights change) and given back once a step runs
    without it. (One tensor per target, not one for all: a block run's rows of A are then one
    [segments · r, in] view, not a copy.)"""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: dict[int, int] = {}  # slot -> row
        self.free: list[int] = []  # rows given back, highest first; rows 0 .. len(rows) + len(free) - 1 exist
        self.used: set[int] = set()  # slots a step ran since the last sweep
        self.fresh: set[int] = set()  # trainable slots written since the last sweep
        self.moved = 0  # rows `arrange` copied, in all (a measure of what composition changes cost)

    def place(self, slot: int, table: AdapterSlots) -> int:
        adapter = table[slot]
        row = self.rows.get(slot)
        write = row is None or (adapter.trainable and slot not in self.fresh)
        if row is None:
            row = self.free.pop() if self.free else len(self.rows)
            self.rows[slot] = row
        if write:
            self._write(row, adapter.weights, adapter.spec.scale)
            self.fresh.add(slot)
        self.used.add(slot)
        return row

    def _write(self, row: int, weights: dict, scale: float) -> None:
        with torch.no_grad():
            for name, (a, b) in weights.items():
                if a.dim() != 2:  # an MoE's per-expert weights: expert_delta reads the table's
                    continue
                bank = self.tensors.get(name)
                if bank is None or len(bank[0]) <= row:
                    rows = max(row + 1, 2 * len(bank[0]) if bank else 4)
                    grown = (
                        a.new_empty((rows, *a.shape), dtype=self.dtype),
                        b.new_empty((rows, *b.t().shape), dtype=self.dtype),
                    )
                    if bank is not None:
                        grown[0][: len(bank[0])] = bank[0]
                        grown[1][: len(bank[1])] = bank[1]
                    self.tensors[name] = bank = grown
                bank[0][row] = a
                bank[1][row] = b.t() * scale

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values()))[0].device

    def arrange(self, runs: list[list[int]]) -> list[int]:
        """Puts the placed slots of `runs` in rows 0 .. k-1, run after run (each run's slots in any
        order), and returns them in row order. Only the rows outside their run's range move: under
        serving load a few requests join and leave at each step, so a few rows move, where rewriting
        the bank in a fixed order would copy all of it at every step (every row after a leaver
        shifts)."""
        wanted = {s for run in runs for s in run}
        slot_at = {row: slot for slot, row in self.rows.items()}
        moves: dict[int, int] = {}  # slot -> its new row
        start = 0
        for run in runs:
            end = start + len(run)
            staying = {s for s in run if start <= self.rows[s] < end}
            holes = [r for r in range(start, end) if slot_at.get(r) not in staying]
            moves.update(zip([s for s in run if s not in staying], holes, strict=True))
            start = end
        # a slot this step does not run would give its row back at this step's sweep: one in the way
        # gives it back now, unmoved
        for row in moves.values():
            slot = slot_at.get(row)
            if slot is not None and slot not in wanted:
                del self.rows[slot]
                self.free.append(row)
        if moves:
            self._move(moves)
        return sorted(wanted, key=self.rows.__getitem__)

    def _move(self, moves: dict[int, int]) -> None:
        """Copies each moving slot's row to its new row (all of them read before any is written); the
        rows no slot holds after are free."""
        if self.tensors:  # (none while the group's adapters have only per-expert weights)
            old = torch.tensor([self.rows[s] for s in moves], device=self.device)
            new = torch.tensor(list(moves.values()), device=self.device)
            for a, b in self.tensors.values():
                a.index_copy_(0, new, a.index_select(0, old))
                b.index_copy_(0, new, b.index_select(0, old))
        capacity = len(self.rows) + len(self.free)
        self.rows.update(moves)
        self.free = sorted(set(range(capacity)) - set(self.rows.values()), reverse=True)
        self.moved += len(moves)

    def stack_index(self, slots: tuple[int, ...]) -> slice | torch.Tensor:
        """Where the placed `slots`' weights are, in order: a slice (a view of the bank) when their rows
        are consecutive, as `arrange` leaves a step's groups; else an index (their weights gathered)."""
        rows = [self.rows[s] for s in slots]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.device)

    def sweep(self) -> None:
        for slot in [s for s in self.rows if s not in self.used]:
            self.free.append(self.rows.pop(slot))
        self.free.sort(reverse=True)
        self.used, self.fresh = set(), set()


class WeightCache:
    """Weights ready for the backend: (Aᵀ, Bᵀ·scale) per slot in the compute dtype, kept in a bank per
    group key and dtype. `order` arranges each bank so that a step's group is a view of it (its rows
    consecutive, in the step's order), however often the composition changes (under serving load
    requests join and leave nearly every step).
    Frozen adapters (sampling snapshots, loaded revisions) are written into the bank once and kept
    while steps run them; a trainable adapter is written again at each step; an adapter no step ran
    since the previous `sweep` gives its row back (and an empty bank its memory)."""

    def __init__(self, table: AdapterSlots) -> None:
        self.table = table
        self._banks: dict[tuple, _Bank] = {}
        self._rows: dict[tuple, tuple[_Bank, slice | torch.Tensor | int]] = {}  # this step's compositions

    def order(self, slots: list[int], tokens: list[int], dtype: torch.dtype) -> list[int]:
        """The permutation of a step's rows: `lora_batch.row_order`'s groups, each group's slots in the
        order of their rows in the group's bank once `_Bank.arrange` has made them rows 0 .. k-1 of it:
        first the slots with one token in the step (one decode each: a single run of views for
        `TorchBackend`), then the others in any order (their segments, of mixed lengths, mostly go
        into block runs). Two ranges, not one per length: a slot that moves between lengths (a sample of
        several finishes, a prompt chunk joins its decodes) moves rows only across that one border."""
        per_slot: dict[int, int] = {}
        for s, n in zip(slots, tokens, strict=True):
            per_slot[s] = per_slot.get(s, 0) + n
        in_order = dict.fromkeys(slots[i] for i in row_order(slots, self.table, tokens))
        position: dict[int, int] = {}
        for key, members in groupby(in_order, lambda s: group_key(s, self.table)):
            if key == ():
                continue
            group = list(members)
            bank = self._bank(group[0], dtype)
            for s in group:
                bank.place(s, self.table)
            ones = [s for s in group if per_slot[s] == 1]
            runs = [run for run in (ones, [s for s in group if per_slot[s] != 1]) if run]
            position.update((s, i) for i, s in enumerate(bank.arrange(runs)))
        return row_order(slots, self.table, tokens, position)

    def get(self, name: str, slots: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bank, rows = self._placed(slots, dtype)
        a, b = bank.tensors[name]
        if isinstance(rows, int):
            return a[rows].t(), b[rows]
        if isinstance(rows, slice):
            return a[rows].transpose(1, 2), b[rows]
        return a.index_select(0, rows).transpose(1, 2), b.index_select(0, rows)

    def _bank(self, slot: int, dtype: torch.dtype) -> _Bank:
        key = (group_key(slot, self.table), dtype)
        bank = self._banks.get(key)
        if bank is None:
            bank = self._banks[key] = _Bank(dtype)
        return bank

    def _placed(self, slots: tuple[int, ...], dtype: torch.dtype) -> tuple[_Bank, slice | torch.Tensor | int]:
        key = (slots, dtype)
        placed = self._rows.get(key)
        if placed is None:
            bank = self._bank(slots[0], dtype)
            rows = [bank.place(s, self.table) for s in slots]
            index = rows[0] if len(rows) == 1 else bank.stack_index(slots)
            self._rows[key] = placed = (bank, index)
        return placed

    def sweep(self) -> None:
        """The step is over: rows of adapters it did not run are given back."""
        self._rows = {}
        for key, bank in list(self._banks.items()):
            bank.sweep()
            if not bank.rows:
                del self._banks[key]


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
    start: int,
    end: int,
    slots: tuple[int, ...],
    lengths: tuple[int, ...],
    table: AdapterSlots,
    device: torch.device,
) -> SegmentGroup:
    targets = frozenset(table[slots[0]].weights)
    if len(slots) != len(set(slots)):
        raise ValueError("flat LoRA batch: a slot's tokens must be contiguous")
    return SegmentGroup(
        start, end, slots, lengths, targets, _runs(lengths, table[slots[0]].spec.rank, device)
    )


def _runs(lengths: tuple[int, ...], rank: int, device: torch.device) -> tuple[Run, ...]:
    """The maximal runs of consecutive segments of equal length; then the segments of short runs
    longer than one token (prompt chunks, or an adapter's few decodes together) are joined into block
    runs of up to `BLOCK_COLUMNS` A rows."""
    runs: list[Run] = []
    first, start = 0, 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] != lengths[first]:
            end = start + lengths[first] * (i - first)
            runs.append(Run(lengths[first], first, i, start, end))
            first, start = i, end
    out: list[Run] = []
    block: list[Run] = []  # single segments
    for run in runs:
        if run.length == 1 or (run.last - run.first) * rank >= BLOCK_COLUMNS:
            out.extend([_joined(block, rank, device), run] if block else [run])
            block = []
            continue
        for i in range(run.first, run.last):
            if (len(block) + 1) * rank > BLOCK_COLUMNS:
                out.append(_joined(block, rank, device))
                block = []
            at = run.start + (i - run.first) * run.length
            block.append(Run(run.length, i, i + 1, at, at + run.length))
    return (*out, _joined(block, rank, device)) if block else tuple(out)


def _joined(segments: list[Run], rank: int, device: torch.device) -> Run:
    """Consecutive single `segments` as one block run (a lone one stays itself)."""
    if len(segments) == 1:
        return segments[0]
    start, end = segments[0].start, segments[-1].end
    mask = torch.zeros(end - start, len(segments) * rank, dtype=torch.bool, device=device)
    for i, seg in enumerate(segments):
        mask[seg.start - start : seg.end - start, i * rank : (i + 1) * rank] = True
    return Run(0, segments[0].first, segments[-1].last, start, end, mask)


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
        self._input: tuple[torch.Tensor, int, torch.Tensor] | None = None  # x, its version, converted

    def add_linear_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        groups = [g for g in self._plans[x.shape[:-1].numel()] if name in g.targets]
        if not groups:
            return y
        x2, y2, xc = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]), self._converted(x)
        for group in groups:
            weights = self.weights.get(name, group.slots, xc.dtype)
            span = slice(group.start, group.end)
            self.backend.add_delta(x2[span], y2[span], group, weights, xc[span])
        return y

    def _converted(self, x: torch.Tensor) -> torch.Tensor:
        """x as [tokens, in] in the compute dtype: converted once for the linears that read the same
        input in turn (q, k and v; gate and up), not once per linear."""
        x2 = x.reshape(-1, x.shape[-1])
        if self.compute_dtype in (None, x.dtype):
            return x2
        held = self._input
        if held is None or held[0] is not x or held[1] != x._version:
            self._input = held = (x, x._version, x2.to(self.compute_dtype))
        return held[2]

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
