"""Where δ-mem enters a model: forward hooks on each attention layer's q_proj and o_proj.

Hooks, not replaced modules: they add to whatever q_proj/o_proj return, so a LoRA wrapper on the same
linear (`MultiLoraLinear`) keeps working and both deltas add up, and the model's own attention code
(q_norm, RoPE, GQA, sdpa) runs unchanged. The q_proj input is the attention input x (after
input_layernorm): the q_proj hook runs the scan from each row's state, adds s·U_q m to the query (before
q_norm and RoPE) and keeps m for the o_proj hook, which adds s·U_o m to the attention output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mintd.engine.delta_mem.adapter import DeltaMemAdapter
from mintd.engine.delta_mem.run import MemoryRun
from mintd.engine.packed import dense_weight
from mintd.lora_config import DeltaMemSpec

# Families whose attention is q_proj -> (q_norm, RoPE, GQA) -> o_proj in every decoder layer.
SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "qwen3_moe")


def attention_projections(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(q_proj, o_proj) of every decoder layer, in order; refuses layouts δ-mem has no hook for (MLA's
    low-rank q, linear-attention layers, fused qkv) instead of adapting some layers silently."""
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ValueError(f"delta_mem supports {supported} attention, not {model_type!r}")
    return [(layer.self_attn.q_proj, layer.self_attn.o_proj) for layer in model.model.layers]


def _linear(module: nn.Module) -> nn.Linear:
    """The base nn.Linear, under a LoRA wrapper or not."""
    return getattr(module, "base", module)


def _shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    return {
        i: (_linear(q).in_features, _linear(q).out_features)
        for i, (q, _) in enumerate(attention_projections(model))
    }


def blank_adapter(model: nn.Module, spec: DeltaMemSpec) -> DeltaMemAdapter:
    """δ-mem weights of the right shapes for `model` (fp32, on its device), uninitialised: to load into."""
    return DeltaMemAdapter(spec, _shapes(model)).to(next(model.parameters()).device)


def create_adapter(model: nn.Module, spec: DeltaMemSpec) -> DeltaMemAdapter:
    """Fresh δ-mem weights for every attention layer of `model` (fp32, on the model's device)."""
    adapter = DeltaMemAdapter(spec, _shapes(model))
    generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else torch.seed())
    for i, (q, o) in enumerate(attention_projections(model)):
        adapter.layer(i).reset(
            generator, dense_weight(_linear(q)), dense_weight(_linear(o)), spec.readout_init
        )
    return adapter.to(next(model.parameters()).device)


class DeltaMemContext:
    """The δ-mem hooks of one model and the runs of the forward in progress.

    The hooks are on the model only inside `use` (registered on entry, removed on exit): a forward
    without δ-mem rows, e.g. a step-engine batch of base and LoRA rows, runs the model's modules with no
    hook at all, not even an empty loop. Several runs share a batch when its rows use different δ-mem
    adapters; a run is a `DeltaMemRun` (rows of a [batch, T] forward) or a `flat.FlatDeltaMemRun`
    (spans of the step engine's flat row). Rows or tokens no run names (base or LoRA-only ones) get no
    correction at all, so their outputs are exactly those of the model alone."""

    def __init__(self) -> None:
        self.runs: tuple[MemoryRun, ...] = ()
        self._hooks: list[tuple[nn.Module, Callable]] = []  # (q_proj or o_proj, its hook)

    @property
    def installed(self) -> bool:
        """Whether `install_delta_mem` gave it a model's hooks."""
        return bool(self._hooks)

    @contextmanager
    def use(self, *runs: MemoryRun) -> Iterator[MemoryRun]:
        """Yields the first run (the usual case is one)."""
        if not self.installed:
            raise ValueError("delta_mem: install_delta_mem(model, ctx) first")
        self.runs = runs
        handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
        try:
            yield runs[0]
        finally:
            for handle in handles:
                handle.remove()
            for run in runs:
                run._reads.clear()
            self.runs = ()


def install_delta_mem(model: nn.Module, ctx: DeltaMemContext) -> None:
    """Give `ctx` the hooks of every attention layer's q_proj and o_proj (they run inside `ctx.use`)."""
    for layer, (q_proj, o_proj) in enumerate(attention_projections(model)):

        def on_q(module, args, out, layer=layer):
            for run in ctx.runs:
                read = run.read_and_write(layer, args[0])
                run._reads[layer] = read
                out = run.add(out, run.adapter.layer(layer).correction(read, "q"))
            return out

        def on_o(module, args, out, layer=layer):
            for run in ctx.runs:
                read = run._reads.pop(layer)
                out = run.add(out, run.adapter.layer(layer).correction(read, "o"))
            return out

        ctx._hooks += [(q_proj, on_q), (o_proj, on_o)]
