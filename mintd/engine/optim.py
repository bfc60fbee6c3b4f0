"""Per-adapter AdamW: each adapter owns its optimizer, so a step (weight decay and gradient clipping
included) touches that adapter's tensors and state only."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field


class AdamParams(BaseModel):
    """Tinker's `adam_params`; defaults are the SDK's. `grad_clip_norm` 0 means no clipping."""

    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)


class AdapterOptimizer:
    """torch.optim.AdamW (decoupled weight decay) over one adapter's named tensors."""

    def __init__(self, named_params: dict[str, torch.Tensor]) -> None:
        self.named_params = named_params
        self.params = list(named_params.values())
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self, hp: AdamParams) -> dict[str, float]:
        for p in self.params:
            if p.grad is None:  # no forward_backward since the last step: a zero gradient
                p.grad = torch.zeros_like(p)
        max_norm = hp.grad_clip_norm if hp.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        for group in self.opt.param_groups:
            group.update(
                lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay
            )
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "learning_rate": hp.learning_rate}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors `<param>.exp_avg`, `<param>.exp_avg_sq` and `<param>.step`."""
        out = {}
        for name, p in self.named_params.items():
            for key, value in self.opt.state.get(p, {}).items():
                out[f"{name}.{key}"] = value.detach()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.named_params.items():
            keys = ("step", "exp_avg", "exp_avg_sq")
            present = [f"{name}.{k}" in tensors for k in keys]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"optimizer state: incomplete entries for {name}")
            state = {k: tensors[f"{name}.{k}"].detach().clone() for k in keys}
            for k in ("exp_avg", "exp_avg_sq"):
                if state[k].shape != p.shape:
                    raise ValueError(f"optimizer state: {name}.{k} has shape {tuple(state[k].shape)}")
                state[k] = state[k].to(p.device, p.dtype)
            state["step"] = state["step"].to(torch.float32).cpu()
            self.opt.state[p] = state
