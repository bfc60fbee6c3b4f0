"""The engine: one resident base model, many adapters in numbered slots. It knows slots, not names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mintd.config import EngineSettings
from mintd.engine import distill, sampling, train
from mintd.engine.adapters import BASE_SLOT, AdapterSlots, LoraSpec
from mintd.engine.distill import KLGroup, KLOutput
from mintd.engine.families import adapted_names, classify, display_name
from mintd.engine.lora import LoraContext, install_lora
from mintd.engine.model import fingerprint, load_base_model, pick_device, pick_dtype
from mintd.engine.optim import AdamParams, AdapterOptimizer
from mintd.engine.sampling import SampleRequest, SampleResult
from mintd.engine.train import TrainGroup, TrainOutput


class Engine:
    def __init__(self, model_dir: Path | str, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.model_dir = Path(model_dir)
        self.device = pick_device(self.settings.device)
        self.dtype = pick_dtype(self.device, self.settings.dtype)
        self.model, self.tokenizer, self.family = load_base_model(
            self.model_dir, self.device, self.dtype, self.settings.attn_implementation
        )
        self.fingerprint = fingerprint(self.model_dir)
        self.ctx = LoraContext()
        self.weights = classify(self.model, self.family)  # before wrapping: the model's own layers
        self.slots = AdapterSlots(install_lora(self.model, self.ctx, self.weights), self.device)
        self._optimizers: dict[int, AdapterOptimizer] = {}
        config = self.model.config
        self.vocab_size = self.model.get_output_embeddings().base.out_features
        self.max_len = getattr(config, "max_position_embeddings", 2048)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)

    # what LoRA adapts ---------------------------------------------------------------------------

    def coverage(self) -> dict[str, Any]:
        """The family contract as applied to this model: adapted names per switch, excluded ones by rule."""
        out: dict[str, Any] = {
            "family": self.family.label,
            "attn_implementation": self.model.config._attn_implementation,
        }
        for kind in ("attn", "mlp", "unembed"):
            out[kind] = sorted({display_name(f.module, f.param) for f in self.weights if f.kind == kind})
        out["excluded"] = {display_name(f.module, f.param): f.rule for f in self.weights if f.kind is None}
        return out

    def adapted(self, spec: LoraSpec) -> dict[str, list[str]]:
        """What an adapter of `spec` adapts here, per switch (recorded in every revision's provenance)."""
        return adapted_names((t.name, t.kind, bool(t.num_experts)) for t in self.slots.targets_for(spec))

    def lora_provenance(self, spec: LoraSpec) -> dict[str, Any]:
        """A revision's `lora_config`: the spec, what it adapts here, and the base's model type (which tells
        a later PEFT export what PEFT can express)."""
        return {
            **spec.model_dump(),
            "adapted": self.adapted(spec),
            "base_model_type": self.model.config.model_type,
        }

    # adapters -----------------------------------------------------------------------------------

    def create_adapter(self, spec: LoraSpec) -> int:
        slot = self.slots.create(spec)
        self._attach_optimizer(slot)
        return slot

    def _attach_optimizer(self, slot: int) -> AdapterOptimizer:
        named = self.slots[slot].state_dict()
        params = {name: t for name, t in zip(named, self.slots[slot].params, strict=True)}
        self._optimizers[slot] = AdapterOptimizer(params)
        return self._optimizers[slot]

    def snapshot(self, slot: int) -> int:
        """A frozen copy for sampling; later training of `slot` does not reach it."""
        return self.slots.snapshot(slot)

    def drop(self, slot: int) -> None:
        self.slots.free(slot)
        self._optimizers.pop(slot, None)

    def export_adapter(
        self, slot: int, with_optimizer: bool = False
    ) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
        """The adapter as flat tensors (cloned to CPU), optionally with its optimizer state."""
        adapter = self.slots[slot]
        tensors = dict(adapter.state_dict())
        if with_optimizer and slot in self._optimizers:
            tensors.update(self._optimizers[slot].state_dict())
        return adapter.spec, {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    def check_adapter(self, spec: LoraSpec, tensors: dict[str, torch.Tensor]) -> None:
        """ValueError unless the tensors fit this base model (safe from any thread: reads no slot)."""
        self.slots.check(spec, tensors)

    def load_adapter(
        self, spec: LoraSpec, tensors: dict[str, torch.Tensor], trainable: bool = True, copy: bool = True
    ) -> int:
        """Load flat tensors into a new slot; optimizer entries, when present, restore the optimizer.
        `copy=False`: adopt the weight tensors without cloning (see `AdapterSlots.load`)."""
        weights = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
        slot = self.slots.load(spec, weights, trainable=trainable, copy=copy)
        if trainable:
            try:
                self._attach_optimizer(slot).load_state_dict(tensors)
            except ValueError:
                self.drop(slot)
                raise
        return slot

    # work ---------------------------------------------------------------------------------------

    def check_train(self, group: TrainGroup, forward_only: bool = False) -> None:
        """Raise ValueError naming the bad field; nothing runs."""
        train.check_slot(group.slot, self.slots, train=not forward_only)
        train.validate(group, self.vocab_size, self.max_len)

    def check_sample(self, request: SampleRequest) -> None:
        """Raise ValueError naming the bad field; nothing runs."""
        if request.slot != BASE_SLOT and request.slot not in self.slots:
            raise ValueError(f"sampler: no adapter in slot {request.slot}")
        sampling.validate(request, self.vocab_size, self.max_len)

    def forward_backward(self, groups: list[TrainGroup], forward_only: bool = False) -> list[TrainOutput]:
        """All groups are checked before any compute, so a bad group leaves no partial gradient."""
        for g in groups:
            self.check_train(g, forward_only)
        return train.forward_backward(
            self.model,
            self.ctx,
            self.slots,
            groups,
            self.pad_id,
            self.settings.micro_batch_tokens,
            forward_only,
        )

    def reverse_kl(self, group: KLGroup) -> KLOutput:
        """Reverse-KL distillation of adapter `group.slot` toward `group.reference_slot`; gradients
        accumulate like forward_backward's."""
        train.check_slot(group.slot, self.slots, train=True)
        train.check_slot(group.reference_slot, self.slots, train=False)
        distill.validate(group, self.vocab_size, self.max_len)
        return distill.reverse_kl(
            self.model, self.ctx, self.slots, group, self.pad_id, self.settings.micro_batch_tokens
        )

    def optim_step(self, slot: int, params: AdamParams) -> dict[str, float]:
        if slot not in self._optimizers:
            raise ValueError(f"model: slot {slot} has no optimizer (not a trainable adapter)")
        return self._optimizers[slot].step(params)

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult]:
        for r in requests:
            self.check_sample(r)
        return sampling.generate(
            self.model, self.ctx, self.slots, self.tokenizer, requests, self.eos_ids, self.pad_id
        )
