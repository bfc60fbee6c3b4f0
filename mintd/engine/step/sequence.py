"""What the step engine tracks: a request (its prompt, its n samples, its results) and each sequence.

A request starts as one prefill sequence over its prompt. When the prompt is done, that sequence's last
logits give every sample its first token and the sequence forks into n sample sequences that share the
prompt's cached keys and values; each then decodes on its own until it stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mintd.engine.stream import TokenStream


@dataclass(eq=False)
class Sequence:
    request: RequestState
    sample_index: int  # -1: the request's shared prefill
    tokens: list[int]  # prompt, then what this sample generated
    num_cached: int = 0  # leading tokens whose keys and values are in the cache
    logprobs: list[float] = field(default_factory=list)  # one per generated token
    kv: Any = None  # the runner's cache state for this sequence (a block table, or a per-sequence cache)
    stop_reason: str | None = None
    # δ-mem: the state [layers, r, r] fp32 after the tokens already fed (num_cached); None for other slots.
    # Replaced, never modified in place, so forked samples may start from one tensor.
    memory: torch.Tensor | None = None

    @property
    def slot(self) -> int:
        return self.request.slot

    @property
    def params(self) -> Any:
        return self.request.request.params

    @property
    def generator(self) -> torch.Generator:
        return self.request.generator

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.request.prompt_len :]

    @property
    def prefill(self) -> bool:
        return self.sample_index < 0

    def memory_writes(self, start: int, end: int) -> list[bool]:
        """Which of positions [start, end) write the δ-mem state: prompt tokens from `written` on (the
        ones before are already in it: they only read), generated ones if `write_generated`."""
        memory = self.request.request.memory
        prompt_len = self.request.prompt_len
        return [memory.written <= p if p < prompt_len else memory.write_generated for p in range(start, end)]


@dataclass(eq=False)
class RequestState:
    """One SampleRequest inside the step engine. `result` is set once `done`."""

    request: Any  # sampling.SampleRequest (kept untyped here: sampling imports this module)
    priority: int
    generator: torch.Generator
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    reserved_blocks: int
    blocks_taken: int = 0
    sequences: list[Sequence] = field(default_factory=list)  # running: the prefill, or the live samples
    finished: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    done: bool = False
    result: Any = None  # sampling.SampleResult

    @property
    def slot(self) -> int:
        return self.request.slot

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def stream(self) -> TokenStream | None:
        return self.request.stream

    @property
    def wants_prompt_logprobs(self) -> bool:
        return bool(self.request.prompt_logprobs or self.request.topk_prompt_logprobs)
