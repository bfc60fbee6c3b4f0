"""Tinker's built-in losses, per datum, under the token-sum contract: no normalisation anywhere.

`lp` is the learner's log-probability of each target token ([T], or [T, K] for several candidate
targets per position). Every loss returns a scalar; the engine sums them over datums, so splitting a
batch into micro-batches changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Inputs = dict[str, torch.Tensor]
Config = dict[str, float]

# Ratio clip bounds for ppo and cispo (Tinker: "epsilon fixed at 0.2"), and DRO's quadratic penalty.
DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
DEFAULT_DRO_BETA = 0.05


def _ratio(lp: torch.Tensor, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, adv = inputs["logprobs"], inputs["advantages"]
    return torch.exp(lp - q), q, adv


def _clip_bounds(inputs: Inputs, config: Config) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Per-token thresholds (0.38 loss_fn_inputs) win over scalar config, which wins over defaults."""
    low = inputs.get("clip_low_threshold", config.get("clip_low_threshold", DEFAULT_CLIP_LOW))
    high = inputs.get("clip_high_threshold", config.get("clip_high_threshold", DEFAULT_CLIP_HIGH))
    return low, high


def cross_entropy(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """Σ −w·lp; any real weights (forward_backward_custom sends w = −∂C/∂lp)."""
    weights = inputs.get("weights")
    return -(lp if weights is None else weights * lp).sum()


def importance_sampling(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """Σ −r·A with r = exp(lp − q); the gradient flows through r."""
    ratio, _, adv = _ratio(lp, inputs)
    return -(ratio * adv).sum()


def ppo(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """Σ −min(r·A, clip(r, lo, hi)·A)."""
    ratio, _, adv = _ratio(lp, inputs)
    low, high = _clip_bounds(inputs, config)
    clipped = torch.clamp(ratio, low, high)
    return -torch.minimum(ratio * adv, clipped * adv).sum()


def cispo(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """Σ −sg(clip(r, lo, hi))·lp·A: the clipped ratio only weights a REINFORCE term."""
    ratio, _, adv = _ratio(lp, inputs)
    low, high = _clip_bounds(inputs, config)
    return -(torch.clamp(ratio, low, high).detach() * lp * adv).sum()


def dro(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """Σ −(lp·A − ½·β·(lp − q)²)."""
    _, q, adv = _ratio(lp, inputs)
    beta = config.get("beta", DEFAULT_DRO_BETA)
    return -(lp * adv - 0.5 * beta * (lp - q) ** 2).sum()


LossFn = Callable[[torch.Tensor, Inputs, Config], torch.Tensor]
_RL_INPUTS = ("logprobs", "advantages")

# name -> (function, loss_fn_inputs it needs besides target_tokens)
LOSSES: dict[str, tuple[LossFn, tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ()),
    "importance_sampling": (importance_sampling, _RL_INPUTS),
    "ppo": (ppo, _RL_INPUTS),
    "cispo": (cispo, _RL_INPUTS),
    "dro": (dro, _RL_INPUTS),
}


def get_loss(name: str) -> tuple[LossFn, tuple[str, ...]]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss_fn: unknown loss {name!r}; supported: {', '.join(LOSSES)}") from None
