"""Runs one step's work through the model and returns the logits each sequence asked for.

`FlatRunner` (the fast path: Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE) lays every sequence's tokens out
as one flat row with a per-token adapter index, over the paged cache. `SequenceRunner` is the fallback
for any other causal LM (sliding windows, attention sinks, linear attention, latent attention): each
sequence keeps a transformers `DynamicCache` and runs its own forward, which is correct for every layer
kind the library defines, and slower.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from mintd.engine.adapters import AdapterSlots
from mintd.engine.delta_mem.flat import FlatDeltaMemRun, FlatSpan
from mintd.engine.delta_mem.hooks import DeltaMemContext
from mintd.engine.kernels import CpuKernels
from mintd.engine.lora import LoraContext
from mintd.engine.lora_batch import LoraBatch
from mintd.engine.lora_flat import FlatLoraBatch, RowKernelBackend, TorchBackend, WeightCache, merge_segments
from mintd.engine.step.attention import NAME, Chunk, StepCache, decode_batches
from mintd.engine.step.kv_cache import BlockPool, BlockTable
from mintd.engine.step.scheduler import Work
from mintd.engine.step.sequence import Sequence


class Runner(Protocol):
    def start(self, seq: Sequence) -> None: ...
    def fork(self, parent: Sequence, child: Sequence) -> None: ...
    def free(self, seq: Sequence) -> None: ...
    def order(self, work: list[Work]) -> list[Work]: ...
    def run(self, work: list[Work]) -> list[torch.Tensor]: ...


class FlatRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        ctx: LoraContext,
        table: AdapterSlots,
        pool: BlockPool,
        lora_dtype: torch.dtype | None,
        delta_ctx: DeltaMemContext,
        kernels: CpuKernels | None = None,
    ) -> None:
        self.model = model
        # mintd's CPU kernels for decode attention and decode LoRA; None: the torch paths
        self.decode_kernel = kernels.paged_decode if kernels is not None else None
        self.ctx = ctx
        self.delta_ctx = delta_ctx
        self.table = table
        self.pool = pool
        self.device = pool.device
        self.weights = WeightCache(table)
        self.backend = RowKernelBackend(kernels.lora_rows) if kernels is not None else TorchBackend()
        self.lora_dtype = lora_dtype or pool.dtype  # the LoRA products' (and the weight banks') dtype

    def start(self, seq: Sequence) -> None:
        seq.kv = BlockTable(self.pool)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        before = self.pool.reserved
        child.kv = parent.kv.fork(parent.num_cached)
        child.request.blocks_taken += before - self.pool.reserved

    def free(self, seq: Sequence) -> None:
        if seq.kv is not None:
            seq.kv.free()
            seq.kv = None

    def order(self, work: list[Work]) -> list[Work]:
        """The order `run` needs: a slot's tokens together, its group's slots adjacent, each group a view
        of its weight bank (`WeightCache.order`)."""
        order = self.weights.order([w.seq.slot for w in work], [w.num_tokens for w in work], self.lora_dtype)
        return [work[i] for i in order]

    def run(self, work: list[Work]) -> list[torch.Tensor]:
        """`work` must be in `order`'s order."""
        ids: list[int] = []
        positions: list[int] = []
        write: list[int] = []
        keep: list[int] = []
        decode_q: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        chunks: list[Chunk] = []
        memory: dict[int, list[tuple[Sequence, FlatSpan]]] = {}  # δ-mem slot -> its sequences' spans
        for w in work:
            table: BlockTable = w.seq.kv
            before = self.pool.reserved
            table.ensure(w.end)
            w.seq.request.blocks_taken += before - self.pool.reserved
            offset = len(ids)
            ids.extend(w.seq.tokens[w.start : w.end])
            positions.extend(range(w.start, w.end))
            write.extend(table.rows(w.start, w.end))
            if w.seq.memory is not None:
                span = FlatSpan(offset, w.seq.memory_writes(w.start, w.end), w.seq.memory)
                memory.setdefault(w.seq.slot, []).append((w.seq, span))
            keep.extend(range(offset + w.keep_from - w.start, offset + w.num_tokens))
            if w.num_tokens == 1:
                decode_q.append(offset)
                decode_tables.append(table.blocks)
                decode_lengths.append(w.end)
            else:
                q_pos = torch.arange(w.start, w.end, device=self.device)
                mask = torch.arange(w.end, device=self.device).unsqueeze(0) <= q_pos.unsqueeze(1)
                chunks.append(Chunk(offset, offset + w.num_tokens, table.row_tensor(w.end), mask))
        decodes = decode_batches(
            decode_q,
            decode_tables,
            decode_lengths,
            self.pool.block_size,
            self.device,
            split=self.decode_kernel is None,  # the kernel reads no padding
        )
        cache = StepCache(self.pool, self._t(write), decodes, chunks, self.decode_kernel)
        slots = [w.seq.slot for w in work]
        batch = FlatLoraBatch(
            merge_segments(slots, [w.num_tokens for w in work]),
            merge_segments(slots, [w.num_kept for w in work]),
            self.table,
            self.weights,
            self.backend,
            self.lora_dtype,
            self.device,
        )
        runs = [
            FlatDeltaMemRun.plan(self.table[slot].delta_mem, [span for _, span in spans], self.device)
            for slot, spans in memory.items()
        ]
        logits = self._forward(self._t([ids]), self._t([positions]), cache, batch, self._t(keep), runs)
        self.weights.sweep()
        for run, spans in zip(runs, memory.values(), strict=True):
            for (seq, _), state in zip(spans, run.states(), strict=True):
                seq.memory = state
        return list(logits.split([w.num_kept for w in work]))

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StepCache,
        batch: FlatLoraBatch,
        keep: torch.Tensor,
        runs: list[FlatDeltaMemRun],
    ) -> torch.Tensor:
        config = self.model.config
        configured = config._attn_implementation
        config._attn_implementation_internal = NAME  # this step's attention; the worker thread alone runs it
        try:
            with self.ctx.use(batch), self.delta_ctx.use(*runs) if runs else nullcontext():
                out = self.model(
                    input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep
                )
        finally:
            config._attn_implementation_internal = configured
        return out.logits[0].float()

    def _t(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


class SequenceRunner:
    def __init__(self, model: PreTrainedModel, ctx: LoraContext, table: AdapterSlots) -> None:
        self.model = model
        self.ctx = ctx
        self.table = table
        self.device = next(model.parameters()).device

    def start(self, seq: Sequence) -> None:
        if seq.memory is not None:  # Engine.check_sample refuses these first
            raise ValueError("sampler: delta_mem adapters run on the flat step path only")
        seq.kv = DynamicCache(config=self.model.config)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.kv = copy.deepcopy(parent.kv)

    def free(self, seq: Sequence) -> None:
        seq.kv = None

    def order(self, work: list[Work]) -> list[Work]:
        return work  # each sequence runs alone

    def run(self, work: list[Work]) -> list[torch.Tensor]:
        out = []
        for w in work:
            ids = torch.tensor([w.seq.tokens[w.start : w.end]], device=self.device)
            positions = torch.arange(w.start, w.end, device=self.device).unsqueeze(0)
            with self.ctx.use(LoraBatch([w.seq.slot], self.table, self.device)):
                logits = self.model(
                    input_ids=ids,
                    position_ids=positions,
                    cache=w.seq.kv,
                    use_cache=True,
                    logits_to_keep=max(w.num_kept, 1),
                ).logits[0]
            out.append(logits[logits.shape[0] - w.num_kept :].float())
        return out
