"""Where δ-mem enters a model: forward hooks on each attention layer's q_proj and o_proj.

Hooks, not replaced modules: they add to whatever q_proj/o_proj return, so a LoRA wrapper on the same
linear (`MultiLoraLinear`) keeps working and both deltas add up, and the model's own attention code
(q_norm, RoPE, GQA, sdpa) runs unchanged. The q_proj input is the attention input x (after
input_layernorm): the q_proj hook runs the scan from each row's state, adds s·U_q m to the query (before
q_norm and RoPE) and keeps m for the o_proj hook, which adds s·U_o m to the attention output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mintd.engine.delta_mem.adapter import DeltaMemAdapter, DeltaMemSpec
from mintd.engine.delta_mem.scan import DEFAULT_CHUNK, chunked_scan, step

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


def create_adapter(model: nn.Module, spec: DeltaMemSpec) -> DeltaMemAdapter:
    """Fresh δ-mem weights for every attention layer of `model` (fp32, on the model's device)."""
    projections = attention_projections(model)
    shapes = {i: (_linear(q).in_features, _linear(q).out_features) for i, (q, _) in enumerate(projections)}
    adapter = DeltaMemAdapter(spec, shapes)
    generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else torch.seed())
    for i, (q, o) in enumerate(projections):
        adapter.layer(i).reset(generator, _linear(q).weight, _linear(o).weight, spec.readout_init)
    return adapter.to(next(model.parameters()).device)


@dataclass
class DeltaMemRun:
    """One sequence batch under a δ-mem adapter: each row's state, carried across forward calls (a
    prefill, then decode steps), and which tokens of the next call write.

    `states` holds one [B, r, r] fp32 tensor per layer, replaced (never modified in place) by every
    call, so autograd reaches through all calls into the initial state and the weights."""

    adapter: DeltaMemAdapter
    states: list[torch.Tensor]
    writes: bool = True  # False: read-only, every token reads the fixed state
    write_mask: torch.Tensor | None = None  # [B, T] for the next call; None: every token writes
    chunk: int = DEFAULT_CHUNK
    _reads: dict[int, torch.Tensor] = field(default_factory=dict)
    _gate_sum: torch.Tensor | float = 0.0  # Σβ over every written token, layer and state row so far
    _gate_count: int = 0

    @classmethod
    def start(cls, adapter: DeltaMemAdapter, state: torch.Tensor, **kwargs) -> DeltaMemRun:
        """From a stacked state [B, layers, r, r]."""
        return cls(adapter, list(state.float().unbind(1)), **kwargs)

    def state(self) -> torch.Tensor:
        """The current state, stacked: [B, layers, r, r]."""
        return torch.stack(self.states, dim=1)

    def write_sparsity(self, target: float) -> torch.Tensor:
        """The release's optional regulariser, (mean β − target)², the mean over every gate this run's
        writes used (all layers, written tokens, state rows): weighted and added to the loss, it pushes
        toward rare, small writes."""
        mean = self._gate_sum / max(self._gate_count, 1)
        return (torch.as_tensor(mean) - target) ** 2

    def read_and_write(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Reads m [B, T, r] of the tokens x [B, T, d] from the layer's state, which advances past them."""
        weights = self.adapter.layer(layer)
        state = self.states[layer]
        if not self.writes:
            return torch.einsum("bik,btk->bti", state, weights.memory_query(x))
        if self.write_mask is not None and self.write_mask.shape != x.shape[:2]:
            raise ValueError(
                f"delta_mem write_mask {tuple(self.write_mask.shape)} does not match this call's tokens "
                f"{tuple(x.shape[:2])}: set it (or None) before every forward"
            )
        q, k, v, beta = weights.memory_inputs(x, self.write_mask)
        self._gate_sum = self._gate_sum + beta.sum()
        written = beta.shape[0] * beta.shape[1] if self.write_mask is None else int(self.write_mask.sum())
        self._gate_count += written * beta.shape[2]
        if x.shape[1] == 1:  # decode: the one-token step of the same update
            read, self.states[layer] = step(state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0])
            return read.unsqueeze(1)
        read, self.states[layer] = chunked_scan(state, q, k, v, beta, self.chunk)
        return read


class DeltaMemContext:
    """Shared by the hooks of one model: the run in progress, or None (the hooks then do nothing)."""

    def __init__(self) -> None:
        self.run: DeltaMemRun | None = None

    @contextmanager
    def use(self, run: DeltaMemRun) -> Iterator[DeltaMemRun]:
        self.run = run
        try:
            yield run
        finally:
            run._reads.clear()
            self.run = None


def install_delta_mem(model: nn.Module, ctx: DeltaMemContext) -> list[RemovableHandle]:
    """Hook every attention layer's q_proj and o_proj; the handles remove the hooks again."""
    handles = []
    for layer, (q_proj, o_proj) in enumerate(attention_projections(model)):

        def on_q(module, args, out, layer=layer):
            run = ctx.run
            if run is None:
                return out
            read = run.read_and_write(layer, args[0])
            run._reads[layer] = read
            return out + run.adapter.layer(layer).correction(read, "q").to(out.dtype)

        def on_o(module, args, out, layer=layer):
            run = ctx.run
            if run is None:
                return out
            read = run._reads.pop(layer)
            return out + run.adapter.layer(layer).correction(read, "o").to(out.dtype)

        handles.append(q_proj.register_forward_hook(on_q))
        handles.append(o_proj.register_forward_hook(on_o))
    return handles


def segment_attention(
    segment_ids: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal attention by segment (sessions of one episode, in order in each row):
    (an additive 4D mask [B, 1, T, T] of 0 and dtype's min, position ids restarting at every segment).

    Only attention is cut: the δ-mem state still flows through the row's tokens in order, so a later
    segment can learn from an earlier one only through the state."""
    if segment_ids.shape[1] > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1])[valid[:, 1:]].any()):
        raise ValueError("segment_ids must not decrease along a row: segments are consecutive runs")
    t = segment_ids.shape[1]
    index = torch.arange(t, device=segment_ids.device)
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    allowed = same & (index.unsqueeze(-1) >= index) & valid.unsqueeze(-2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=-1).values
    return mask, index - first
