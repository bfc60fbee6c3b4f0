"""The engine: one resident base model, many adapters in numbered slots. It knows slots, not names."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mintd.config import EngineSettings
from mintd.engine import distill, packed, sampling, train
from mintd.engine.adapters import BASE_SLOT, Adapter, AdapterSlots, LoraSpec
from mintd.engine.delta_mem import DeltaMemAdapter, DeltaMemContext, blank_adapter, install_delta_mem
from mintd.engine.delta_mem import create_adapter as create_delta_mem
from mintd.engine.distill import KLGroup, KLOutput
from mintd.engine.lora import LoraContext, MultiLoraLinear, install_lora
from mintd.engine.model import fingerprint, load_base_model, pick_device, pick_dtype
from mintd.engine.optim import AdamParams, AdapterOptimizer
from mintd.engine.sampling import SampleRequest, SampleResult
from mintd.engine.step.loop import StepEngine
from mintd.engine.step.sequence import RequestState
from mintd.engine.train import TrainGroup, TrainOutput
from mintd.families import adapted_names, classify, display_name
from mintd.lora_config import DeltaMemSpec, is_weight


@dataclass
class Parked:
    """A training slot in host memory, with its optimizer: moved in place, so nothing is re-made."""

    adapter: Adapter
    optimizer: AdapterOptimizer | None

    def move(self, device: torch.device, pin: bool = False) -> None:
        for p in self.adapter.params:
            p.data = _moved(p.data, device, pin)
            if p.grad is not None:
                p.grad = _moved(p.grad, device, pin)
        if self.optimizer is not None:
            for state in self.optimizer.opt.state.values():
                for key, value in state.items():
                    if key != "step":  # AdamW keeps its step counter on the CPU
                        state[key] = _moved(value, device, pin)


def _moved(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    t = t.to(device)
    return t.pin_memory() if pin else t


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
        # Frozen adapters in the dtype their products run in: the base's on a GPU (bfloat16 halves
        # their bytes and skips a cast per use); float32 on the CPU, where LoRA products run in float32
        # and a frozen slot adopts the memory-mapped float32 blob without a copy.
        frozen_dtype = self.dtype if self.device.type != "cpu" else torch.float32
        self.slots = AdapterSlots(install_lora(self.model, self.ctx, self.weights), self.device, frozen_dtype)
        if self.settings.cpu_packed_linears and packed.available(self.device, self.dtype):
            readers = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
            for module in self.model.modules():
                if (
                    isinstance(module, MultiLoraLinear)
                    and module.base.weight.numel() >= self.settings.cpu_packed_min_weight
                ):  # a tied weight stays plain for its other reader
                    tied = readers[id(module.base.weight)] > 1
                    module.packed = packed.PackedLinear(module.base, pack=not tied)
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
        self.delta_ctx = DeltaMemContext()  # its hooks go on the model with the first δ-mem adapter
        self.steps = StepEngine(
            self.model, self.ctx, self.slots, self.tokenizer, self.settings, self.delta_ctx
        )
        self._dropped: set[int] = set()  # freed once no running sample uses them

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

    def lora_provenance(self, spec: LoraSpec, delta_mem: DeltaMemSpec | None = None) -> dict[str, Any]:
        """A revision's `lora_config`: the spec, what it adapts here, and the base's model type (which tells
        a later PEFT export what PEFT can express); for a δ-mem adapter, its spec under `delta_mem` (and
        nothing adapted by LoRA unless `delta_mem.lora`)."""
        out = {
            **spec.model_dump(),
            "adapted": self.adapted(spec),
            "base_model_type": self.model.config.model_type,
        }
        if delta_mem is not None:
            out["delta_mem"] = delta_mem.model_dump()
            if not delta_mem.lora:
                out["adapted"] = {}
        return out

    # adapters -----------------------------------------------------------------------------------

    def create_adapter(self, spec: LoraSpec, delta_mem: DeltaMemSpec | None = None) -> int:
        """A trainable adapter: a LoRA of `spec`, or a δ-mem adapter (with that LoRA if `delta_mem.lora`)."""
        fresh = None if delta_mem is None else create_delta_mem(self._delta_mem_model(), delta_mem)
        slot = self.slots.create(spec, fresh)
        self._attach_optimizer(slot)
        return slot

    def _delta_mem_model(self) -> torch.nn.Module:
        """The model, with the δ-mem hooks installed the first time (ValueError for a layout without)."""
        if not self.delta_ctx.installed:
            install_delta_mem(self.model, self.delta_ctx)
        return self.model

    def _blank_delta_mem(self, spec: DeltaMemSpec | None) -> DeltaMemAdapter | None:
        return None if spec is None else blank_adapter(self._delta_mem_model(), spec)

    def delta_mem_spec(self, slot: int) -> DeltaMemSpec | None:
        adapter = self.slots[slot].delta_mem
        return None if adapter is None else adapter.spec

    def _attach_optimizer(self, slot: int) -> AdapterOptimizer:
        named = self.slots[slot].state_dict()
        params = {name: t for name, t in zip(named, self.slots[slot].params, strict=True)}
        self._optimizers[slot] = AdapterOptimizer(params)
        return self._optimizers[slot]

    def snapshot(self, slot: int) -> int:
        """A frozen copy for sampling; later training of `slot` does not reach it."""
        return self.slots.snapshot(slot)

    def drop(self, slot: int) -> None:
        """Free a slot; one that running samples still read is freed when the last of them finishes."""
        self._optimizers.pop(slot, None)
        if self.steps.uses(slot):
            self._dropped.add(slot)
        else:
            self.slots.free(slot)

    def training_bytes(self, slot: int) -> int:
        """What a trainable slot occupies once training: weights, gradients and Adam's two moments."""
        return self.slots[slot].nbytes * (4 if slot in self._optimizers else 1)

    def park(self, slot: int) -> Parked:
        """Take a slot out, moved whole to host memory: its weights, gradients and optimizer state
        (the same tensors, so `unpark` resumes bit-exactly)."""
        parked = Parked(self.slots[slot], self._optimizers.pop(slot, None))
        self.slots.free(slot)
        parked.move(torch.device("cpu"), pin=self.device.type == "cuda")
        return parked

    def unpark(self, parked: Parked) -> int:
        parked.move(self.device)
        slot = self.slots.add(parked.adapter)
        if parked.optimizer is not None:
            self._optimizers[slot] = parked.optimizer
        return slot

    def export_adapter(
        self, slot: int, with_optimizer: bool = False
    ) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
        """The adapter as flat tensors (cloned to CPU), optionally with its optimizer state."""
        adapter = self.slots[slot]
        tensors = dict(adapter.state_dict())
        if with_optimizer and slot in self._optimizers:
            tensors.update(self._optimizers[slot].state_dict())
        return adapter.spec, {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    def check_adapter(
        self, spec: LoraSpec, tensors: dict[str, torch.Tensor], delta_mem: DeltaMemSpec | None = None
    ) -> None:
        """ValueError unless the tensors fit this base model (safe from any thread: reads no slot)."""
        self.slots.check(spec, tensors, self._blank_delta_mem(delta_mem))

    def load_adapter(
        self,
        spec: LoraSpec,
        tensors: dict[str, torch.Tensor],
        trainable: bool = True,
        copy: bool = True,
        delta_mem: DeltaMemSpec | None = None,
    ) -> int:
        """Load flat tensors into a new slot; optimizer entries, when present, restore the optimizer.
        `copy=False`: adopt the LoRA tensors without cloning (see `AdapterSlots.build`)."""
        weights = {k: v for k, v in tensors.items() if is_weight(k)}
        blank = self._blank_delta_mem(delta_mem)
        adapter = self.slots.build(spec, weights, trainable=trainable, copy=copy, delta_mem=blank)
        slot = self.slots.add(adapter)
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
        if request.slot != BASE_SLOT and (request.slot not in self.slots or request.slot in self._dropped):
            raise ValueError(f"sampler: no adapter in slot {request.slot}")
        sampling.validate(request, self.vocab_size, self.max_len)
        delta_mem = None if request.slot == BASE_SLOT else self.slots[request.slot].delta_mem
        if delta_mem is not None and not self.steps.flat:
            raise ValueError(
                f"sampler: delta_mem adapters run on the flat step path, which {self.family.label} is not on"
            )
        sampling.validate_memory(
            request,
            None if delta_mem is None else (len(delta_mem.layers), delta_mem.spec.rank, delta_mem.spec.rank),
        )
        self.steps.check(request)

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
            self.settings.merge_min_tokens,
            forward_only,
            self.delta_ctx,
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
        """Run `requests` to the end (with whatever else the step engine is running)."""
        for r in requests:
            self.check_sample(r)
        states = [self.submit(r) for r in requests]
        try:
            while not all(s.done for s in states):
                self.step()
        except BaseException:
            self.steps.abort()
            raise
        return [s.result for s in states]

    def submit(self, request: SampleRequest, priority: int = 0) -> RequestState:
        """Queue a checked request in the step engine; it joins at the next step with room for it."""
        return self.steps.add(request, self.eos_ids, priority)

    def step(self) -> list[RequestState]:
        """One step of the step engine (`StepEngine.step`); the requests it finished."""
        done = self.steps.step()
        for slot in [s for s in self._dropped if not self.steps.uses(s)]:
            self._dropped.discard(slot)
            self.slots.free(slot)
        return done
