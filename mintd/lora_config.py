"""The adapter configs every layer shares: Tinker's `lora_config` and the δ-mem spec (which the SDK asks
for through `user_metadata`). The engine builds adapters from them, the store packs and exports them,
the service validates requests with them. Imports no other layer."""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class DeltaMemSpec(BaseModel):
    """A δ-mem stateful adapter (the released variant: token writes, one state head, rank-wise gates,
    "standard" update, q and o readouts scaled by alpha / rank). `readout_init="zero"` starts exactly at
    the base model; "base_slice" starts the readouts from the base's own q/o weights (non-zero gradients
    for the write side from the first step, as the release does). `lora`: the adapter also carries the
    run's ordinary LoRA (its `lora_config`), trained with it; otherwise it has no LoRA matrices."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, le=64)
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False)
    readout_init: Literal["zero", "base_slice"] = "zero"
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    lora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# The Tinker SDK's `user_metadata` is string-valued, so a δ-mem adapter is asked for with these keys:
#   "mintd.adapter": "lora" (the default) | "delta_mem" | "delta_mem+lora"
#   "mintd.delta_mem.<field>": a DeltaMemSpec field other than `lora` (rank, alpha, readout_init, seed)
ADAPTER_KEY = "mintd.adapter"
DELTA_MEM_KEY_PREFIX = "mintd.delta_mem."
_ADAPTER_KINDS = {"lora": None, "delta_mem": False, "delta_mem+lora": True}  # -> DeltaMemSpec.lora


def delta_mem_from_metadata(user_metadata: dict[str, Any]) -> DeltaMemSpec | None:
    """The δ-mem spec a create request's `user_metadata` asks for (None: a plain LoRA), or ValueError
    naming the bad key. Keys outside the `mintd.` namespace are the user's own and not read."""
    ours = {k: v for k, v in user_metadata.items() if k.startswith("mintd.")}
    for key, value in ours.items():
        if not isinstance(value, str):
            raise ValueError(f'user_metadata["{key}"]: must be a string (got {type(value).__name__})')
    kind = ours.pop(ADAPTER_KEY, "lora")
    if kind not in _ADAPTER_KINDS:
        raise ValueError(f'user_metadata["{ADAPTER_KEY}"]: {kind!r} is not one of {sorted(_ADAPTER_KINDS)}')
    fields = {}
    for key, value in ours.items():
        name = key.removeprefix(DELTA_MEM_KEY_PREFIX)
        if (
            not key.startswith(DELTA_MEM_KEY_PREFIX)
            or name not in DeltaMemSpec.model_fields
            or name == "lora"
        ):
            raise ValueError(f'user_metadata["{key}"]: not a mintd setting')
        fields[name] = value
    with_lora = _ADAPTER_KINDS[kind]
    if with_lora is None:
        if fields:
            key = DELTA_MEM_KEY_PREFIX + next(iter(fields))
            raise ValueError(f'user_metadata["{key}"]: needs "{ADAPTER_KEY}": "delta_mem"')
        return None
    try:
        return DeltaMemSpec(**fields, lora=with_lora)
    except ValidationError as e:
        error = e.errors()[0]
        raise ValueError(
            f'user_metadata["{DELTA_MEM_KEY_PREFIX}{error["loc"][0]}"]: {error["msg"]}'
        ) from None


# Flat tensor names of an adapter's weights: `<target>.lora_A` / `.lora_B`, `delta_mem.<parameter>`;
# optimizer state adds `<weight>.exp_avg`, `.exp_avg_sq`, `.step`.
LORA_SUFFIXES = (".lora_A", ".lora_B")
DELTA_MEM_TENSOR_PREFIX = "delta_mem."
OPTIMIZER_SUFFIXES = (".exp_avg", ".exp_avg_sq", ".step")


def is_weight(name: str) -> bool:
    """Whether a flat tensor name is an adapter weight (not optimizer state)."""
    if name.startswith(DELTA_MEM_TENSOR_PREFIX):
        return not name.endswith(OPTIMIZER_SUFFIXES)
    return name.endswith(LORA_SUFFIXES)
