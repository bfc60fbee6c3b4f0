"""Which tokens the next step runs, within a token budget.

Policy: every running sample decodes one token each step (decode is never delayed by prompts); what is
left of the budget goes to prompt chunks of admitted requests in admission order, so a long prompt is
cut into chunks (chunked prefill) and cannot hold up the decoding of others for more than one chunk.
Prompts always get at least a quarter of the budget, so a full batch of decoding cannot starve them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mintd.engine.step.sequence import RequestState, Sequence


@dataclass(eq=False)
class Work:
    """One sequence's share of a step: it feeds positions [start, end) and needs the logits of
    positions [keep_from, end) (none when keep_from == end)."""

    seq: Sequence
    start: int
    end: int
    keep_from: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def num_kept(self) -> int:
        return self.end - self.keep_from


def schedule(running: list[RequestState], budget: int) -> list[Work]:
    work: list[Work] = []
    for req in running:
        for seq in req.sequences:
            if not seq.prefill:
                n = len(seq.tokens)
                work.append(Work(seq, n - 1, n, n - 1))
    left = max(budget - len(work), budget // 4, 1)
    for req in running:
        if left <= 0:
            break
        for seq in req.sequences:
            if not seq.prefill:
                continue
            start = seq.num_cached
            end = min(len(seq.tokens), start + left)
            last = end - 1 if end == len(seq.tokens) else end  # the prompt's last logits start sampling
            keep_from = start if req.wants_prompt_logprobs else last
            work.append(Work(seq, start, end, keep_from))
            left -= end - start
    return work
