"""Sampling requests and results, and how a token is chosen (the step loop, `engine.step`, runs them).

Each sampled token's logprob is log softmax(z/τ) at that token: the distribution sampled from at
temperature τ (over the full vocabulary; top-k / top-p truncation is not renormalised into it), so an
importance-sampling ratio against it is exact at any τ. Greedy rows (τ = 0) report the model's own
logprob (τ = 1). Prompt logprobs are always the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, Field, field_validator
from transformers import PreTrainedTokenizerBase

from mintd.engine.stream import TokenStream


class SamplingParams(BaseModel):
    """Tinker's SamplingParams. `stop=None` stops on EOS; `stop=[]` never stops before max_tokens."""

    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    stop: list[str | int] | None = None  # strings and token ids may mix (the OpenAI endpoint adds EOS)
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_string(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("top_k")
    @classmethod
    def _nonzero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k: use -1 for no limit (0 would allow no token)")
        return v


@dataclass
class MemoryInput:
    """A δ-mem instance's state entering a request (`engine/delta_mem`). Write-once: the prompt's first
    `written` tokens are already in `state` (a client resent them), so they are read, not written again."""

    state: torch.Tensor  # [layers, r, r] fp32
    written: int = 0
    write_generated: bool = True  # generated tokens write as they go back through the model


@dataclass
class SampleRequest:
    slot: int
    prompt: list[int]
    params: SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    stream: TokenStream | None = None  # tokens as they are made, for a reader on another thread
    memory: MemoryInput | None = None  # required for a δ-mem adapter's slot, refused for any other


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" (stop token, stop string or EOS; included in tokens), "length", or
    # "cancelled" (its stream's reader went away)
    memory: torch.Tensor | None = None  # δ-mem: the state [layers, r, r] after every token that went
    # through the model (the prompt and each generated token but the last)


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # position 0 has no prediction: None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


def finish_reason(
    generated: list[int],
    params: SamplingParams,
    stop_ids: frozenset[int],
    stop_strings: tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase,
) -> str | None:
    """ "stop" (stop token, stop string or EOS: the last token completes it), "length", or None."""
    if generated[-1] in stop_ids:
        return "stop"
    if stop_strings:
        window = max(len(s.encode()) for s in stop_strings) + 1
        tail = tokenizer.decode(generated[-window:])
        if any(s in tail for s in stop_strings):
            return "stop"
    return "length" if len(generated) >= params.max_tokens else None


class _Row(Protocol):
    """What sampling needs of a sequence."""

    params: SamplingParams
    generator: torch.Generator


def validate(req: SampleRequest, vocab_size: int, max_len: int) -> None:
    """Raise ValueError naming the bad field. Pure: safe to call from any thread before queueing."""
    if not req.prompt:
        raise ValueError("prompt: must hold at least one token")
    if min(req.prompt) < 0 or max(req.prompt) >= vocab_size:
        raise ValueError(f"prompt: token ids must be in [0, {vocab_size})")
    if req.num_samples < 1:
        raise ValueError("num_samples: must be at least 1")
    if len(req.prompt) + req.params.max_tokens > max_len:
        raise ValueError(
            f"max_tokens: prompt ({len(req.prompt)}) + max_tokens ({req.params.max_tokens}) exceeds the "
            f"model's context of {max_len}"
        )
    if any(isinstance(s, int) and not 0 <= s < vocab_size for s in req.params.stop or []):
        raise ValueError(f"sampling_params.stop: token ids must be in [0, {vocab_size})")


def validate_memory(req: SampleRequest, shape: tuple[int, int, int] | None) -> None:
    """A δ-mem slot's request carries a state of the adapter's `shape` [layers, r, r]; any other slot's
    (shape None) carries none. ValueError naming `memory`."""
    memory = req.memory
    if shape is None:
        if memory is not None:
            raise ValueError(
                f"memory: slot {req.slot} is not a delta_mem adapter, so its requests carry no state"
            )
        return
    if memory is None:
        raise ValueError(
            f"memory: slot {req.slot} is a delta_mem adapter: its requests need a state "
            "(zeros for a new instance)"
        )
    state = memory.state
    if tuple(state.shape) != shape or state.dtype != torch.float32:
        raise ValueError(
            f"memory.state: {state.dtype} {tuple(state.shape)}, expected torch.float32 {shape} "
            "([layers, r, r])"
        )
    if not bool(torch.isfinite(state).all()):
        raise ValueError("memory.state: must be finite")
    if not 0 <= memory.written <= len(req.prompt):
        raise ValueError(
            f"memory.written: {memory.written}, must be in [0, {len(req.prompt)}] "
            "(the prompt's tokens already in the state)"
        )


def _temperatures(rows: list[_Row], device: torch.device) -> torch.Tensor:
    return torch.tensor([r.params.temperature for r in rows], device=device)


def tempered_logprobs(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """log softmax(z/τ) per row; τ = 0 (greedy) keeps τ = 1."""
    temps = _temperatures(rows, logits.device)
    temps = torch.where(temps > 0, temps, torch.ones_like(temps))
    return torch.log_softmax(logits / temps.unsqueeze(-1), dim=-1)


def choose(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """One token per row under its temperature / top-k / top-p and its request's generator."""
    temps = _temperatures(rows, logits.device)
    greedy = logits.argmax(dim=-1)
    if bool((temps == 0).all()):
        return greedy
    scaled = logits / temps.clamp(min=1e-6).unsqueeze(-1)
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    order = None
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        scaled, order = scaled.sort(dim=-1, descending=True)
        vocab = scaled.shape[-1]
        k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
        scaled = scaled.masked_fill(
            torch.arange(vocab, device=logits.device) >= k.unsqueeze(-1), float("-inf")
        )
        probs = torch.softmax(scaled, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each candidate
        p = torch.tensor(top_p, device=logits.device).unsqueeze(-1)
        scaled = scaled.masked_fill(before >= p, float("-inf"))
    uniforms = torch.cat([torch.rand(1, generator=r.generator) for r in rows])
    picked = draw(torch.softmax(scaled, dim=-1), uniforms.to(logits.device))
    if order is not None:
        picked = order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    return torch.where(temps == 0, greedy, picked)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative mass exceeds its uniform in [0, 1) times the row's
    mass (inverse CDF: one random number a row, where `multinomial` draws one per vocabulary entry; its
    exponentials took 80 µs a row over 4k tokens on CPU, and grow with the vocabulary). A token of zero
    mass is never chosen: its cumulative mass equals its predecessor's, and a draw that rounds up to
    the whole mass takes the last token with mass."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    picked = torch.searchsorted(cdf, uniforms.unsqueeze(-1) * total, right=True).squeeze(-1)
    return torch.minimum(picked, (cdf < total).sum(dim=-1))
