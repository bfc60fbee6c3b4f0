"""δ-mem over a flat step: the step engine lays every sequence's tokens out as one row [1, N], so a
run here serves spans of that row, one per sequence, each from its own state.

One `FlatDeltaMemRun` per δ-mem adapter of the step. Spans of one token (decode, or a one-token prompt
chunk) are batched into one `step` over their states [D, r, r]; longer spans (prompt chunks) are gathered
into a padded [P, longest] layout and run the chunked scan from each sequence's state (padding writes
nothing and its reads are dropped). Tokens of other sequences get no correction at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mintd.engine.delta_mem.adapter import DeltaMemAdapter
from mintd.engine.delta_mem.scan import DEFAULT_CHUNK, chunked_scan, step
from mintd.engine.lora_batch import padding_index


@dataclass(frozen=True)
class FlatSpan:
    """One sequence's tokens [offset, offset + len(writes)) of the flat row, its state [layers, r, r]
    and which of its tokens write (the others read the state as it is)."""

    offset: int
    writes: list[bool]
    state: torch.Tensor


@dataclass
class FlatDeltaMemRun:
    """One adapter's spans of a flat step. Same interface as `DeltaMemRun` for the hooks
    (`read_and_write`, `add`); `states()` gives each span's state after the step, in span order."""

    adapter: DeltaMemAdapter
    decode_tokens: torch.Tensor  # [D] flat positions of the one-token spans
    decode_writes: torch.Tensor  # [D, 1]
    decode_states: list[torch.Tensor]  # per layer [D, r, r]
    prefill_gather: torch.Tensor  # [P * longest] flat positions in the padded layout
    prefill_writes: torch.Tensor  # [P, longest], False on padding
    prefill_keep: torch.Tensor | None  # where the real tokens sit in the padded layout (None: no padding)
    prefill_states: list[torch.Tensor]  # per layer [P, r, r]
    tokens: torch.Tensor  # the flat positions this run corrects, in the order of its reads
    order: torch.Tensor  # span i's state is row order[i] of cat(decode, prefill)
    chunk: int = DEFAULT_CHUNK
    _reads: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def plan(cls, adapter: DeltaMemAdapter, spans: list[FlatSpan], device: torch.device) -> FlatDeltaMemRun:
        decode = [i for i, s in enumerate(spans) if len(s.writes) == 1]
        prefill = [i for i, s in enumerate(spans) if len(s.writes) > 1]
        lengths = tuple(len(spans[i].writes) for i in prefill)
        longest = max(lengths, default=0)
        positions = [
            p for i in prefill for p in range(spans[i].offset, spans[i].offset + len(spans[i].writes))
        ]
        padding = padding_index(lengths, device) if prefill else None
        gather = torch.tensor(positions, dtype=torch.long, device=device)
        if padding is not None:
            gather = gather[padding[0]]
        writes = [spans[i].writes + [False] * (longest - len(spans[i].writes)) for i in prefill]
        decode_at = [spans[i].offset for i in decode]
        rank = {span: row for row, span in enumerate(decode + prefill)}
        return cls(
            adapter,
            torch.tensor(decode_at, dtype=torch.long, device=device),
            torch.tensor([spans[i].writes for i in decode], dtype=torch.bool, device=device).view(-1, 1),
            _per_layer([spans[i].state for i in decode], adapter, device),
            gather,
            torch.tensor(writes, dtype=torch.bool, device=device).view(len(prefill), longest),
            None if padding is None else padding[1],
            _per_layer([spans[i].state for i in prefill], adapter, device),
            torch.tensor(decode_at + positions, dtype=torch.long, device=device),
            torch.tensor([rank[i] for i in range(len(spans))], dtype=torch.long, device=device),
        )

    def read_and_write(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Reads [tokens, r] of this run's tokens of the flat row x [1, N, d]; each span's state
        advances past its tokens that write."""
        weights = self.adapter.layer(layer)
        x = x.reshape(-1, x.shape[-1])
        reads = []
        if len(self.decode_tokens):
            q, k, v, beta = weights.memory_inputs(x[self.decode_tokens].unsqueeze(1), self.decode_writes)
            read, self.decode_states[layer] = step(
                self.decode_states[layer], q[:, 0], k[:, 0], v[:, 0], beta[:, 0]
            )
            reads.append(read)
        if len(self.prefill_writes):
            shape = (*self.prefill_writes.shape, x.shape[-1])
            q, k, v, beta = weights.memory_inputs(x[self.prefill_gather].view(shape), self.prefill_writes)
            read, self.prefill_states[layer] = chunked_scan(
                self.prefill_states[layer], q, k, v, beta, self.chunk
            )
            read = read.reshape(-1, read.shape[-1])
            reads.append(read if self.prefill_keep is None else read[self.prefill_keep])
        return reads[0] if len(reads) == 1 else torch.cat(reads)

    def add(self, out: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        """`out` [1, N, width] with the correction [tokens, width] added at this run's tokens only."""
        flat = out.view(-1, out.shape[-1])
        return flat.index_add(0, self.tokens, correction.to(out.dtype)).view(out.shape)

    def states(self) -> torch.Tensor:
        """Each span's state after the step, in span order: [spans, layers, r, r]."""
        layers = [torch.cat(pair) for pair in zip(self.decode_states, self.prefill_states, strict=True)]
        return torch.stack(layers, dim=1)[self.order]


def _per_layer(
    states: list[torch.Tensor], adapter: DeltaMemAdapter, device: torch.device
) -> list[torch.Tensor]:
    """Per layer [rows, r, r] from the rows' states [layers, r, r]."""
    if not states:
        r = adapter.spec.rank
        return [torch.zeros(0, r, r, device=device) for _ in adapter.layers]
    return list(torch.stack(states).unbind(1))
