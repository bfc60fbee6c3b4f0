"""Batched generation with a KV cache, each row on its own adapter slot (or the base).

Each sampled token's logprob is log softmax(z/τ) at that token: the distribution sampled from at
temperature τ (over the full vocabulary; top-k / top-p truncation is not renormalised into it), so an
importance-sampling ratio against it is exact at any τ. Greedy rows (τ = 0) report the model's own
logprob (τ = 1). Prompt logprobs are always the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field, field_validator
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from mintd.engine.adapters import AdapterSlots
from mintd.engine.forward import padded_forward
from mintd.engine.lora import LoraContext
from mintd.engine.lora_batch import LoraBatch, row_order


class SamplingParams(BaseModel):
    """Tinker's SamplingParams. `stop=None` stops on EOS; `stop=[]` never stops before max_tokens."""

    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    stop: list[str] | list[int] | None = None
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
class SampleRequest:
    slot: int
    prompt: list[int]
    params: SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" (stop token, stop string or EOS; included in tokens) or "length"


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # position 0 has no prediction: None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class _Row:
    request: int
    sample_index: int
    slot: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    generator: torch.Generator
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str | None = None

    def finish_reason(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        if self.tokens[-1] in self.stop_ids:
            return "stop"
        if self.stop_strings:
            window = max(len(s.encode()) for s in self.stop_strings) + 1
            tail = tokenizer.decode(self.tokens[-window:])
            if any(s in tail for s in self.stop_strings):
                return "stop"
        return "length" if len(self.tokens) >= self.params.max_tokens else None


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


def _prompt_logprobs(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    requests: list[SampleRequest],
    pad_id: int,
    results: list[SampleResult],
) -> None:
    wanted = [i for i, r in enumerate(requests) if r.prompt_logprobs or r.topk_prompt_logprobs]
    if not wanted:
        return
    order = [wanted[j] for j in row_order([requests[i].slot for i in wanted], table)]
    device = next(model.parameters()).device
    rows = [torch.tensor(requests[i].prompt, device=device) for i in order]
    logits = padded_forward(model, ctx, table, [requests[i].slot for i in order], rows, pad_id)
    for j, i in enumerate(order):
        req = requests[i]
        n = len(req.prompt)
        logp = torch.log_softmax(logits[j, : n - 1], dim=-1)
        if req.prompt_logprobs:
            chosen = logp.gather(-1, rows[j][1:].unsqueeze(-1)).squeeze(-1)
            results[i].prompt_logprobs = [None, *chosen.tolist()]
        if req.topk_prompt_logprobs:
            top = logp.topk(min(req.topk_prompt_logprobs, logp.shape[-1]), dim=-1)
            results[i].topk_prompt_logprobs = [None] + [
                list(zip(ids, lps, strict=True))
                for ids, lps in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]


def _temperatures(rows: list[_Row], device: torch.device) -> torch.Tensor:
    return torch.tensor([r.params.temperature for r in rows], device=device)


def _tempered_logprobs(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """log softmax(z/τ) per row; τ = 0 (greedy) keeps τ = 1."""
    temps = _temperatures(rows, logits.device)
    temps = torch.where(temps > 0, temps, torch.ones_like(temps))
    return torch.log_softmax(logits / temps.unsqueeze(-1), dim=-1)


def _choose(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
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
    probs = torch.softmax(scaled, dim=-1)
    picked = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    for i, row in enumerate(rows):
        picked[i] = torch.multinomial(probs[i], 1, generator=row.generator)[0]
    if order is not None:
        picked = order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    return torch.where(temps == 0, greedy, picked)


def generate(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[SampleRequest],
    eos_ids: frozenset[int],
    pad_id: int,
) -> list[SampleResult]:
    device = next(model.parameters()).device
    results = [SampleResult([]) for _ in requests]
    with torch.no_grad():
        _prompt_logprobs(model, ctx, table, requests, pad_id, results)
        rows = _expand(requests, eos_ids)
        rows = [rows[i] for i in row_order([r.slot for r in rows], table)]
        _decode(model, ctx, table, tokenizer, rows, pad_id, device)
    for req_index in range(len(requests)):
        mine = sorted((r for r in rows if r.request == req_index), key=lambda r: r.sample_index)
        results[req_index].sequences = [
            SampledSequence(r.tokens, r.logprobs, r.stop_reason or "length") for r in mine
        ]
    return results


def _expand(requests: list[SampleRequest], eos_ids: frozenset[int]) -> list[_Row]:
    rows = []
    for i, req in enumerate(requests):
        stop = req.params.stop
        stop_ids = eos_ids if stop is None else frozenset(s for s in stop if isinstance(s, int))
        stop_strings = () if stop is None else tuple(s for s in stop if isinstance(s, str))
        gen = torch.Generator()
        gen.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        for n in range(req.num_samples):
            rows.append(_Row(i, n, req.slot, req.prompt, req.params, stop_ids, stop_strings, gen, [], []))
    return rows


def _decode(
    model: PreTrainedModel,
    ctx: LoraContext,
    table: AdapterSlots,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[_Row],
    pad_id: int,
    device: torch.device,
) -> None:
    """Left-padded prefill, then one token per step; finished rows leave the batch and its cache."""
    width = max(len(r.prompt) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, device=device)
        mask[i, width - len(r.prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    batch = LoraBatch([r.slot for r in rows], table, device)
    active = list(range(len(rows)))
    with ctx.use(batch):
        logits = (
            model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
    while True:
        live = [rows[i] for i in active]
        tokens = _choose(logits, live)
        chosen_lp = _tempered_logprobs(logits, live).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        keep = []
        for j, (row, tok, lp) in enumerate(zip(live, tokens.tolist(), chosen_lp.tolist(), strict=True)):
            row.tokens.append(tok)
            row.logprobs.append(lp)
            row.stop_reason = row.finish_reason(tokenizer)
            if row.stop_reason is None:
                keep.append(j)
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.reorder_cache(index)  # every layer kind has it: KV, sliding window, linear-attention state
            batch = batch.select(keep)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        with ctx.use(batch):
            logits = (
                model(
                    input_ids=tokens.unsqueeze(-1),
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                )
                .logits[:, -1]
                .float()
            )
