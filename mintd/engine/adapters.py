"""Adapter weights held in numbered slots. Slot 0 is the base model (no adapter).

Every adapter keeps its own tensors at its exact rank: nothing is padded to a maximum rank, a snapshot
is a copy of these tensors only, and a step on one adapter cannot reach another's memory. An adapter
may carry δ-mem weights (`engine/delta_mem`), alone or beside its LoRA matrices; they train, snapshot,
park and export with it, as flat tensors named `delta_mem.<parameter>`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mintd.engine.delta_mem import DeltaMemAdapter
from mintd.engine.lora import LoraTarget
from mintd.lora_config import DELTA_MEM_TENSOR_PREFIX, LoraSpec

BASE_SLOT = 0
_AB = ("lora_A", "lora_B")


class Piece(NamedTuple):
    """Where one matrix lies in a flat buffer: its group, element offset, shape and size."""

    group: str
    offset: int
    shape: tuple[int, ...]
    numel: int


class BufferWeights(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """A frozen slot's (A, B) by target as views of flat buffers (a packed adapter's groups), made at
    each lookup and not kept. A slot holding its own views is dozens of tensors and containers that
    Python's full collections scan (with a thousand adapters resident, each pass stalled every request
    for 60-150 ms); this is a handful. `pieces` is shared by every adapter of one layout."""

    def __init__(self, groups: dict[str, torch.Tensor], pieces: dict[str, tuple[Piece, Piece]]) -> None:
        self.groups = groups
        self.pieces = pieces

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.pieces[name]
        return self._view(a), self._view(b)

    def _view(self, piece: Piece) -> torch.Tensor:
        return self.groups[piece.group].narrow(0, piece.offset, piece.numel).view(piece.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.pieces

    def __iter__(self) -> Iterator[str]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def nbytes(self) -> int:
        return sum(
            p.numel * self.groups[p.group].element_size() for pair in self.pieces.values() for p in pair
        )


@dataclass
class Adapter:
    spec: LoraSpec
    # target name -> (A, B); {}: no LoRA. A frozen slot adopted from a buffer holds `BufferWeights`.
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    trainable: bool = True
    delta_mem: DeltaMemAdapter | None = None  # fp32 whatever the slot's dtype
    params: list[torch.Tensor] = field(init=False)  # the tensors it owns, in `state_dict` order

    def __post_init__(self) -> None:
        owned = not isinstance(self.weights, BufferWeights)  # buffer views are frozen as made
        self.params = [t for pair in self.weights.values() for t in pair] if owned else []
        if self.delta_mem is not None:
            self.params += list(self.delta_mem.parameters())
        for t in self.params:
            if t.requires_grad != self.trainable:  # a torch call each, so only where needed (cold loads)
                t.requires_grad_(self.trainable)

    @property
    def nbytes(self) -> int:
        owned = sum(t.numel() * t.element_size() for t in self.params)
        return owned + (self.weights.nbytes if isinstance(self.weights, BufferWeights) else 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors named `<target>.lora_A` / `<target>.lora_B`, then `delta_mem.<parameter>`
        (detached, same storage)."""
        out = {}
        for name, (a, b) in self.weights.items():
            out[f"{name}.lora_A"] = a.detach()
            out[f"{name}.lora_B"] = b.detach()
        if self.delta_mem is not None:
            for name, p in self.delta_mem.named_parameters():
                out[DELTA_MEM_TENSOR_PREFIX + name] = p.detach()
        return out


class AdapterSlots:
    """Slot table: allocation, initialisation, snapshots and flat-tensor import.

    A trainable slot holds float32 masters; a frozen one (a saved revision being served, a snapshot)
    holds `frozen_dtype`, the dtype the LoRA products run in on this device."""

    def __init__(
        self, targets: dict[str, LoraTarget], device: torch.device, frozen_dtype: torch.dtype = torch.float32
    ) -> None:
        self.targets = targets
        self.device = device
        self.frozen_dtype = frozen_dtype
        self._slots: dict[int, Adapter] = {}
        self._next = BASE_SLOT + 1
        self._expected: dict[tuple, tuple[list[str], dict[str, tuple[int, ...]]]] = {}  # by lora_shapes
        self._adoptable: dict[tuple, dict] = {}  # by adopt: the pieces last checked, by target set and rank

    def __getitem__(self, slot: int) -> Adapter:
        try:
            return self._slots[slot]
        except KeyError:
            raise KeyError(f"no adapter in slot {slot}") from None

    def __contains__(self, slot: int) -> bool:
        return slot in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def targets_for(self, spec: LoraSpec) -> list[LoraTarget]:
        targets = [t for t in self.targets.values() if spec.adapts(t)]
        if not targets:
            raise ValueError("lora_config: no module of this base model matches the LoRA targets")
        return targets

    def add(self, adapter: Adapter) -> int:
        slot = self._next
        self._next += 1
        self._slots[slot] = adapter
        return slot

    def free(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def create(self, spec: LoraSpec, delta_mem: DeltaMemAdapter | None = None) -> int:
        """New trainable adapter: A ~ Kaiming-uniform (as PEFT), B = 0, so it starts as the base model;
        with `delta_mem`'s fresh weights, if given."""
        gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else torch.seed())
        weights = {}
        for t in self.targets_for(spec) if _has_lora(delta_mem) else []:
            a_shape, b_shape = t.shapes(spec.rank)
            bound = 1.0 / math.sqrt(t.in_features)  # kaiming_uniform_(a=sqrt(5)) on an [r, in] matrix
            a = (torch.rand(a_shape, generator=gen) * 2 - 1) * bound
            weights[t.name] = (a.to(self.device), torch.zeros(b_shape, device=self.device))
        return self.add(Adapter(spec, weights, delta_mem=delta_mem))

    def snapshot(self, slot: int) -> int:
        """Frozen copy of an adapter's tensors: later training of the source does not reach it."""
        src = self[slot]
        dtype = self.frozen_dtype
        weights = {
            n: (a.detach().to(dtype, copy=True), b.detach().to(dtype, copy=True))
            for n, (a, b) in src.weights.items()
        }
        delta_mem = None if src.delta_mem is None else src.delta_mem.frozen_copy()
        return self.add(Adapter(src.spec, weights, trainable=False, delta_mem=delta_mem))

    def check(
        self, spec: LoraSpec, tensors: dict[str, torch.Tensor], delta_mem: DeltaMemAdapter | None = None
    ) -> list[str]:
        """The target names, after checking `tensors` hold exactly this spec's targets at this base
        model's shapes, and `delta_mem`'s parameters if given (ValueError naming the first mismatch).
        Reads no slot, so any thread may call it."""
        _check_delta_mem(tensors, delta_mem)
        names, shapes = self.lora_shapes(spec) if _has_lora(delta_mem) else ([], {})
        _check_shapes(tensors, shapes)
        delta_mem_count = 0 if delta_mem is None else sum(1 for _ in delta_mem.parameters())
        if len(tensors) != len(shapes) + delta_mem_count:  # more than expected: find what
            lora = {k.rpartition(".")[0] for k in tensors if k.endswith((".lora_A", ".lora_B"))}
            if extra := lora - set(names):
                raise ValueError(
                    f"adapter tensors: unknown target {sorted(extra)[0]} for this base model / config"
                )
        return names

    def lora_shapes(self, spec: LoraSpec) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """The targets `spec` adapts on this base model, and `<target>.lora_A` / `.lora_B` -> shape. The
        same for all adapters of one target set and rank, so made once (each cold load checks against it)."""
        key = (spec.target_set, spec.rank)
        if key not in self._expected:
            targets = self.targets_for(spec)
            shapes = {
                f"{t.name}.{suffix}": shape
                for t in targets
                for suffix, shape in zip(("lora_A", "lora_B"), t.shapes(spec.rank), strict=True)
            }
            self._expected[key] = [t.name for t in targets], shapes
        names, shapes = self._expected[key]
        return list(names), shapes

    def adopt(self, spec: LoraSpec, weights: BufferWeights) -> Adapter:
        """A frozen adapter of buffer views, for `add`, after checking the buffer holds exactly this
        spec's targets at this base model's shapes (ValueError naming the first mismatch). The caller
        guarantees the buffer's dtype (`frozen_dtype`) and device, and that nobody writes to it. Reads
        no slot, so any thread may call it."""
        key = (spec.target_set, spec.rank)
        if self._adoptable.get(key) is not weights.pieces:  # adapters of one layout share their pieces
            names, shapes = self.lora_shapes(spec)
            pieces = {
                f"{n}.{ab}": p for n, pair in weights.pieces.items() for ab, p in zip(_AB, pair, strict=True)
            }
            _check_shapes(pieces, shapes)
            if len(pieces) != len(shapes):
                extra = sorted(set(weights.pieces) - set(names))[0]
                raise ValueError(f"adapter tensors: unknown target {extra} for this base model / config")
            self._adoptable[key] = weights.pieces
        return Adapter(spec, weights, trainable=False)

    def build(
        self,
        spec: LoraSpec,
        tensors: dict[str, torch.Tensor],
        trainable: bool = True,
        copy: bool = True,
        delta_mem: DeltaMemAdapter | None = None,
    ) -> Adapter:
        """An adapter of flat tensors (as `Adapter.state_dict` makes them), shapes checked, for `add`;
        `delta_mem`, a δ-mem adapter of the right shapes, takes the `delta_mem.` tensors (copied). Reads
        no slot, so any thread may call it (the loader thread builds frozen adapters that need no copy,
        and the engine thread only adds them).

        By default each tensor is copied (float32 for a trainable slot, `frozen_dtype` for a frozen
        one), so the slot owns its memory whatever the caller does next. `copy=False` adopts the tensors
        as they are (a packed load hands over views of one buffer): the caller guarantees that dtype,
        the device, and that they are private to this slot or, for a frozen slot, never written by anyone.
        """
        dtype = torch.float32 if trainable else self.frozen_dtype

        def own(t: torch.Tensor) -> torch.Tensor:
            if copy:
                return t.detach().to(self.device, dtype, copy=True)
            return t.detach() if t.requires_grad else t  # a view with no autograd history is kept as is

        weights = {
            name: (own(tensors[f"{name}.lora_A"]), own(tensors[f"{name}.lora_B"]))
            for name in self.check(spec, tensors, delta_mem)
        }
        if delta_mem is not None:
            with torch.no_grad():
                for name, p in delta_mem.named_parameters():
                    p.copy_(tensors[DELTA_MEM_TENSOR_PREFIX + name])
        return Adapter(spec, weights, trainable=trainable, delta_mem=delta_mem)


def _has_lora(delta_mem: DeltaMemAdapter | None) -> bool:
    """Whether an adapter has LoRA matrices: always, unless it is a δ-mem adapter without them."""
    return delta_mem is None or delta_mem.spec.lora


def _check_delta_mem(tensors: dict[str, torch.Tensor], delta_mem: DeltaMemAdapter | None) -> None:
    """`tensors` hold exactly `delta_mem`'s parameters at its shapes (none when it is None)."""
    expected = {} if delta_mem is None else dict(delta_mem.named_parameters())
    _check_shapes(tensors, {DELTA_MEM_TENSOR_PREFIX + name: tuple(p.shape) for name, p in expected.items()})
    extra = sorted(
        k
        for k in tensors
        if k.startswith(DELTA_MEM_TENSOR_PREFIX) and k[len(DELTA_MEM_TENSOR_PREFIX) :] not in expected
    )
    if extra:
        raise ValueError(f"adapter tensors: unexpected {extra[0]} for this base model / config")


def _check_shapes(tensors: Mapping[str, torch.Tensor | Piece], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every key of `shapes` is in `tensors` with that shape (ValueError naming the first that is not)."""
    for key, shape in shapes.items():
        if key not in tensors:
            raise ValueError(f"adapter tensors: missing {key}")
        if tuple(tensors[key].shape) != shape:
            got = tuple(tensors[key].shape)
            raise ValueError(f"adapter tensors: {key} has shape {got}, expected {shape}")
