"""Tinker's built-in losses, per datum, under the token-sum contract: no normalisation anywhere.

`lp` is the learner's log-probability of each target token ([T], or [T, K] for several candidate
targets per position). Every loss returns a scalar; the engine sums them over datums, so splitting a
batch into micro-batches changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Inputs = dict[str, torch.Tensor]
Config = dict[str, float]

# Ratio clip bounds for ppo and cispo (Tinker: "epsilon fixed at 0.2"), and DRO's quadratic penalty.
DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
DEFAULT_DRO_BETA = 0.05
# GSPO's sequence-ratio bounds: the GSPO paper's ε_low = 3e-4, ε_high = 4e-4 (a geometric-mean ratio
# moves far less than a token ratio, so ppo's 0.8/1.2 would almost never clip).
GSPO_CLIP_LOW = 1 - 3e-4
GSPO_CLIP_HIGH = 1 + 4e-4
# mintd's stable_reinforce: importance weights truncated at this cap, and no KL term unless asked.
DEFAULT_IS_CAP = 1.0
DEFAULT_KL_COEFF = 0.0


def _ratio(lp: torch.Tensor, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, adv = inputs["logprobs"], inputs["advantages"]
    return torch.exp(lp - q), q, adv


def _clip_bounds(
    inputs: Inputs, config: Config, low: float = DEFAULT_CLIP_LOW, high: float = DEFAULT_CLIP_HIGH
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Per-token thresholds (0.38 loss_fn_inputs) win over scalar config, which wins over defaults."""
    low = inputs.get("clip_low_threshold", config.get("clip_low_threshold", low))
    high = inputs.get("clip_high_threshold", config.get("clip_high_threshold", high))
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


def gspo(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """GSPO-token: s_t = exp(ℓ + lp_t − sg(lp_t)) with ℓ the detached mean log-ratio over the rows
    `sequence_ratio_mask` selects; Σ over all rows of −min(s·A, clip(s, lo, hi)·A). One ratio value per
    datum, so clipping gates the whole datum (by the sign of each row's A)."""
    q, adv = inputs["logprobs"], inputs["advantages"]
    selected = inputs["sequence_ratio_mask"] != 0
    mean_log_ratio = (lp.detach() - q)[selected].mean()
    ratio = torch.exp(mean_log_ratio + lp - lp.detach())
    low, high = _clip_bounds(inputs, config, GSPO_CLIP_LOW, GSPO_CLIP_HIGH)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv).sum()


def stable_reinforce(lp: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    """mintd's stable off-policy REINFORCE (not necessarily the hosted service's formula), over the rows
    m_t = 1 that reproduce recorded sampled tokens, with q_t the sampler's recorded logprob:

        Σ_t m_t · [ −min(exp(sg(lp_t) − q_t), c) · A_t · lp_t  +  kl_coeff · (q_t − lp_t) ]

    The first term is REINFORCE with a truncated importance weight (c = `is_cap`, default 1): stale or
    numerically drifted samples can down-weight but never amplify an update. The second is the k1
    estimate of KL(sampler ‖ learner) on the sampler's own draws (gradient −kl_coeff·∇lp), a pull
    back toward what was sampled; kl_coeff defaults to 0."""
    q, adv, mask = inputs["logprobs"], inputs["advantages"], inputs["sampled_mask"]
    cap = config.get("is_cap", DEFAULT_IS_CAP)
    kl_coeff = config.get("kl_coeff", DEFAULT_KL_COEFF)
    weight = torch.clamp(torch.exp(lp.detach() - q), max=cap)
    return (mask * (-weight * adv * lp + kl_coeff * (q - lp))).sum()


# δ-mem's optional write-sparsity regulariser (any loss): weight · (mean write gate − target)² per datum
WRITE_SPARSITY = "delta_mem_write_sparsity"
WRITE_SPARSITY_TARGET = "delta_mem_write_sparsity_target"


def check_config(config: Config) -> None:
    """ValueError naming the bad `loss_fn_config` key, for the keys a loss reads."""
    target = config.get(WRITE_SPARSITY_TARGET)
    if target is not None and not 0 <= target <= 1:
        raise ValueError(
            f"loss_fn_config.{WRITE_SPARSITY_TARGET}: a write gate's mean, in [0, 1] (got {target})"
        )
    for key in ("kl_coeff", "is_cap", "beta", WRITE_SPARSITY):
        value = config.get(key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"loss_fn_config.{key}: must be a finite number >= 0 (got {value})")
    if config.get("is_cap") == 0:
        raise ValueError("loss_fn_config.is_cap: must be > 0")


LossFn = Callable[[torch.Tensor, Inputs, Config], torch.Tensor]
_RL_INPUTS = ("logprobs", "advantages")

# name -> (function, loss_fn_inputs it needs besides target_tokens)
LOSSES: dict[str, tuple[LossFn, tuple[str, ...]]] = {
    "cross_entropy": (cross_entropy, ()),
    "importance_sampling": (importance_sampling, _RL_INPUTS),
    "ppo": (ppo, _RL_INPUTS),
    "cispo": (cispo, _RL_INPUTS),
    "dro": (dro, _RL_INPUTS),
    "gspo": (gspo, (*_RL_INPUTS, "sequence_ratio_mask")),
    "stable_reinforce": (stable_reinforce, (*_RL_INPUTS, "sampled_mask")),
}


def get_loss(name: str) -> tuple[LossFn, tuple[str, ...]]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss_fn: unknown loss {name!r}; supported: {', '.join(LOSSES)}") from None
