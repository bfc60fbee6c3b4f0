"""Adapter weights held in numbered slots. Slot 0 is the base model (no adapter).

Every adapter keeps its own tensors at its exact rank: nothing is padded to a maximum rank, a snapshot
is a copy of these tensors only, and a step on one adapter cannot reach another's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, Field, model_validator

from mintd.engine.families import LINEAR_KINDS, TargetKind
from mintd.engine.lora import LoraTarget

BASE_SLOT = 0


class LoraSpec(BaseModel):
    """Tinker's LoRA config plus the scale. The LoRA output is scaled by alpha / rank (alpha 32 by
    default, as in Tinker's docs); PEFT export writes the same `lora_alpha`, so outputs match."""

    rank: int = Field(32, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    # Only these linear modules (leaf names such as q_proj, v_proj), each of an enabled kind; None: all of
    # them. What most PEFT adapters use. Fused MoE experts follow train_mlp alone.
    target_modules: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _some_target(self) -> LoraSpec:
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
        if self.target_modules is not None:
            unknown = [m for m in self.target_modules if m not in LINEAR_KINDS]
            if unknown or not self.target_modules:
                raise ValueError(
                    f"lora_config.target_modules: {unknown or '[]'} not among {sorted(LINEAR_KINDS)}"
                )
            off = [m for m in self.target_modules if LINEAR_KINDS[m] not in self.kinds]
            if off:
                raise ValueError(
                    f"lora_config.target_modules: {off[0]} is a {LINEAR_KINDS[off[0]]} module, "
                    f"but train_{LINEAR_KINDS[off[0]]} is false"
                )
            self.target_modules = tuple(sorted(set(self.target_modules)))
            # attention and unembedding have no other modules: the list decides them. (train_mlp stays as
            # given: fused MoE experts, which the list does not name, follow it.)
            listed = {LINEAR_KINDS[m] for m in self.target_modules}
            self.train_attn, self.train_unembed = "attn" in listed, "unembed" in listed
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kinds(self) -> frozenset[TargetKind]:
        flags: dict[TargetKind, bool] = {
            "attn": self.train_attn,
            "mlp": self.train_mlp,
            "unembed": self.train_unembed,
        }
        return frozenset(k for k, on in flags.items() if on)

    @property
    def target_set(self) -> tuple:
        """What decides which modules an adapter adapts: adapters alike here batch together."""
        return tuple(sorted(self.kinds)), self.target_modules or ()  # () means all: never a real subset

    def adapts(self, target: LoraTarget) -> bool:
        if target.kind not in self.kinds:
            return False
        leaf = target.name.rpartition(".")[2]
        return self.target_modules is None or bool(target.num_experts) or leaf in self.target_modules


@dataclass
class Adapter:
    spec: LoraSpec
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # target name -> (A, B)
    trainable: bool = True
    params: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [t for pair in self.weights.values() for t in pair]
        for t in self.params:
            t.requires_grad_(self.trainable)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors named `<target>.lora_A` / `<target>.lora_B` (detached, same storage)."""
        out = {}
        for name, (a, b) in self.weights.items():
            out[f"{name}.lora_A"] = a.detach()
            out[f"{name}.lora_B"] = b.detach()
        return out


class AdapterSlots:
    """Slot table: allocation, initialisation, snapshots and flat-tensor import."""

    def __init__(self, targets: dict[str, LoraTarget], device: torch.device) -> None:
        self.targets = targets
        self.device = device
        self._slots: dict[int, Adapter] = {}
        self._next = BASE_SLOT + 1

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

    def create(self, spec: LoraSpec) -> int:
        """New trainable adapter: A ~ Kaiming-uniform (as PEFT), B = 0, so it starts as the base model."""
        gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else torch.seed())
        weights = {}
        for t in self.targets_for(spec):
            a_shape, b_shape = t.shapes(spec.rank)
            bound = 1.0 / math.sqrt(t.in_features)  # kaiming_uniform_(a=sqrt(5)) on an [r, in] matrix
            a = (torch.rand(a_shape, generator=gen) * 2 - 1) * bound
            weights[t.name] = (a.to(self.device), torch.zeros(b_shape, device=self.device))
        return self.add(Adapter(spec, weights))

    def snapshot(self, slot: int) -> int:
        """Frozen copy of an adapter's tensors: later training of the source does not reach it."""
        src = self[slot]
        weights = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in src.weights.items()}
        return self.add(Adapter(src.spec, weights, trainable=False))

    def check(self, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> list[str]:
        """The target names, after checking `tensors` hold exactly this spec's targets at this base
        model's shapes (ValueError naming the first mismatch). Reads no slot, so any thread may call it."""
        expected = {t.name: t for t in self.targets_for(spec)}
        for name, target in expected.items():
            for suffix, shape in zip(("lora_A", "lora_B"), target.shapes(spec.rank), strict=True):
                key = f"{name}.{suffix}"
                if key not in tensors:
                    raise ValueError(f"adapter tensors: missing {key}")
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(
                        f"adapter tensors: {key} has shape {tuple(tensors[key].shape)}, expected {shape}"
                    )
        extra = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lora_A", ".lora_B"))} - set(expected)
        if extra:
            raise ValueError(
                f"adapter tensors: unknown target {sorted(extra)[0]} for this base model / config"
            )
        return list(expected)

    def load(
        self, spec: LoraSpec, tensors: dict[str, torch.Tensor], trainable: bool = True, copy: bool = True
    ) -> int:
        """Import flat tensors (as produced by `Adapter.state_dict`) into a new slot, checking shapes.

        By default each tensor is cloned, so the slot owns its memory whatever the caller does next.
        `copy=False` adopts the tensors as they are (a packed load hands over views of one buffer it
        just allocated): the caller guarantees they are private to this slot, float32 and on the device.
        """

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(self.device, torch.float32).clone() if copy else t.detach()

        weights = {
            name: (own(tensors[f"{name}.lora_A"]), own(tensors[f"{name}.lora_B"]))
            for name in self.check(spec, tensors)
        }
        return self.add(Adapter(spec, weights, trainable=trainable))
