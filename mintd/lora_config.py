"""The LoRA config every layer shares (Tinker's `lora_config`): the engine builds adapters from it, the
store packs and exports it, the service validates requests with it. Imports no other layer."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field, model_validator

from mintd.families import LINEAR_KINDS, TargetKind


class Target(Protocol):
    """A weight matrix LoRA may adapt (the engine's `LoraTarget`)."""

    name: str
    kind: TargetKind
    num_experts: int


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

    def adapts(self, target: Target) -> bool:
        if target.kind not in self.kinds:
            return False
        leaf = target.name.rpartition(".")[2]
        return self.target_modules is None or bool(target.num_experts) or leaf in self.target_modules
