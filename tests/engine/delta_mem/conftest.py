"""δ-mem test helpers: a tiny base model with δ-mem hooks, token rows, random states."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mintd.engine.delta_mem import (
    DeltaMemAdapter,
    DeltaMemContext,
    DeltaMemSpec,
    create_adapter,
    install_delta_mem,
)


def hooked(
    model_dir: Path, readout_init: str = "base_slice", attn: str = "sdpa"
) -> tuple[torch.nn.Module, DeltaMemContext, DeltaMemAdapter]:
    """A frozen fp32 base with δ-mem hooks, and fresh δ-mem weights for it (seed 0)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval().requires_grad_(False)
    ctx = DeltaMemContext()
    install_delta_mem(model, ctx)
    return model, ctx, create_adapter(model, DeltaMemSpec(readout_init=readout_init, seed=0))


def tokens(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))


def random_state(adapter: DeltaMemAdapter, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(adapter.empty_state(rows).shape, generator=g)
