"""The step loop: admit, schedule, run one flat batch, sample, stream, retire.

`StepEngine.step()` runs one iteration. Requests added between steps join at the next one; a sequence
that stops leaves at once and returns its cache blocks; every sampled token is pushed to its request's
stream as soon as its step is done. One request's n samples share its prompt's prefill, and its prompt
logprobs come from that same prefill.
"""

from __future__ import annotations

from collections import deque

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mintd.config import EngineSettings
from mintd.engine.adapters import AdapterSlots
from mintd.engine.delta_mem.hooks import DeltaMemContext
from mintd.engine.kernels import cpu_kernels
from mintd.engine.lora import LoraContext
from mintd.engine.sampling import (
    SampledSequence,
    SampleRequest,
    SampleResult,
    choose,
    finish_reason,
    tempered_logprobs,
)
from mintd.engine.step.attention import supports_flat
from mintd.engine.step.kv_cache import BlockPool
from mintd.engine.step.runner import FlatRunner, Runner, SequenceRunner
from mintd.engine.step.scheduler import Work, schedule
from mintd.engine.step.sequence import RequestState, Sequence
from mintd.engine.stream import TokenEvent


class StepEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        ctx: LoraContext,
        table: AdapterSlots,
        tokenizer: PreTrainedTokenizerBase,
        settings: EngineSettings,
        delta_ctx: DeltaMemContext,
    ) -> None:
        self.table = table
        self.tokenizer = tokenizer
        self.settings = settings
        param = next(model.parameters())
        self.pool = BlockPool(
            max(1, settings.kv_cache_tokens // settings.kv_block_size),
            settings.kv_block_size,
            param.device,
            param.dtype,
        )
        self.flat = supports_flat(model)
        kernels = (
            cpu_kernels()
            if self.flat
            and settings.cpu_kernels
            and param.device.type == "cpu"
            and param.dtype in (torch.float32, torch.bfloat16)
            else None
        )
        # without the kernels, bf16/fp16 LoRA products on CPU are slow in small matmuls: compute them in
        # float32 there; the kernels read bf16 banks directly
        cpu_half = param.device.type == "cpu" and param.dtype != torch.float32
        lora_dtype = torch.float32 if cpu_half and kernels is None else None
        self.runner: Runner = (
            FlatRunner(model, ctx, table, self.pool, lora_dtype, delta_ctx, kernels)
            if self.flat
            else SequenceRunner(model, ctx, table)
        )
        self.pending: deque[RequestState] = deque()  # added, waiting for room
        self.running: list[RequestState] = []
        self.steps = 0

    # admission -----------------------------------------------------------------------------------

    def blocks_for(self, request: SampleRequest) -> int:
        return self.pool.blocks_for(len(request.prompt), request.params.max_tokens, request.num_samples)

    def check(self, request: SampleRequest) -> None:
        """ValueError when the request could never fit the cache, even alone."""
        if self.blocks_for(request) > self.pool.num_blocks:
            raise ValueError(
                f"max_tokens: prompt ({len(request.prompt)} tokens) + max_tokens "
                f"({request.params.max_tokens}) for {request.num_samples} samples needs more KV cache "
                f"than this server has "
                f"({self.settings.kv_cache_tokens} tokens, MINTD_KV_CACHE_TOKENS)"
            )

    @property
    def running_rows(self) -> int:
        return sum(max(len(r.sequences), r.request.num_samples) for r in self.running)

    def can_admit(self, request: SampleRequest, max_rows: int) -> bool:
        """Room for it now: its rows within `max_rows` (a request alone always fits) and its blocks."""
        if self.running and self.running_rows + request.num_samples > max_rows:
            return False
        return self.pool.can_reserve(self.blocks_for(request))

    def add(self, request: SampleRequest, eos_ids: frozenset[int], priority: int = 0) -> RequestState:
        """Queue a request (validated by the caller); it starts at the first step with room for it.
        `eos_ids` stop it when its `stop` is None."""
        stop = request.params.stop
        gen = torch.Generator()
        if request.params.seed is None:
            gen.seed()  # from the OS; torch.seed() would also reseed the global and every device RNG
        else:
            gen.manual_seed(request.params.seed)
        state = RequestState(
            request,
            priority,
            gen,
            eos_ids if stop is None else frozenset(s for s in stop if isinstance(s, int)),
            () if stop is None else tuple(s for s in stop if isinstance(s, str)),
            self.blocks_for(request),
        )
        self.pending.append(state)
        return state

    def _admit(self) -> None:
        for state in sorted(self.pending, key=lambda s: s.priority):
            if not self.can_admit(state.request, self.settings.max_running_rows):
                continue
            self.pending.remove(state)
            self.pool.reserve(state.reserved_blocks)
            memory = state.request.memory
            seq = Sequence(state, -1, list(state.request.prompt))
            if memory is not None:
                seq.memory = memory.state.to(self.pool.device, torch.float32)
            self.runner.start(seq)
            state.sequences.append(seq)
            if state.wants_prompt_logprobs:
                state.prompt_logprobs = [None]
                state.topk_prompt_logprobs = [None] if state.request.topk_prompt_logprobs else None
            self.running.append(state)

    # the step ------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.pending)

    def uses(self, slot: int) -> bool:
        return any(s.slot == slot for s in (*self.running, *self.pending))

    def step(self) -> list[RequestState]:
        """One iteration; the requests that finished in it."""
        self._admit()
        if not self.running:
            return []
        work = self.runner.order(schedule(self.running, self.settings.step_tokens))
        with torch.no_grad():
            logits = self.runner.run(work)
            due: list[tuple[Sequence, torch.Tensor]] = []
            for w, lg in zip(work, logits, strict=True):
                w.seq.num_cached = w.end
                if w.seq.prefill and w.seq.request.wants_prompt_logprobs:
                    self._prompt_logprobs(w, lg)
                if w.seq.num_cached == len(w.seq.tokens):
                    due.extend(self._due(w.seq, lg[-1]))
            if due:
                self._sample(due)
        self.steps += 1
        done = [r for r in self.running if not r.sequences]
        for r in done:
            self._finish(r)
        return done

    def _due(self, seq: Sequence, last: torch.Tensor) -> list[tuple[Sequence, torch.Tensor]]:
        """Sequences whose next token these logits choose: a finished prefill forks into the samples."""
        if not seq.prefill:
            return [(seq, last)]
        req = seq.request
        children = [
            Sequence(req, i, list(seq.tokens), seq.num_cached, memory=seq.memory)
            for i in range(req.request.num_samples)
        ]
        for child in children:
            self.runner.fork(seq, child)
        self.runner.free(seq)
        req.sequences = children
        return [(c, last) for c in children]

    def _sample(self, due: list[tuple[Sequence, torch.Tensor]]) -> None:
        seqs = [s for s, _ in due]
        logits = torch.stack([lg for _, lg in due])
        tokens = choose(logits, seqs)
        chosen = tempered_logprobs(logits, seqs).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        scores = _scores(logits, tokens, seqs)
        for i, (seq, tok, lp) in enumerate(zip(seqs, tokens.tolist(), chosen.tolist(), strict=True)):
            req = seq.request
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            seq.stop_reason = finish_reason(
                seq.generated, seq.params, req.stop_ids, req.stop_strings, self.tokenizer
            )
            if req.stream is not None:
                req.stream.push(TokenEvent(seq.sample_index, tok, lp, seq.stop_reason, *scores.get(i, ())))
                if req.stream.cancelled and seq.stop_reason is None:
                    seq.stop_reason = "cancelled"  # its reader is gone: stop spending steps on it
            if seq.stop_reason is not None:
                self.runner.free(seq)
                req.sequences.remove(seq)
                req.finished.append(seq)

    def _prompt_logprobs(self, w: Work, logits: torch.Tensor) -> None:
        """Positions keep_from .. end-1 predict the prompt's next tokens (the last one predicts the first
        sample, which is not a prompt token)."""
        req = w.seq.request
        prompt = req.request.prompt
        n = min(w.end, len(prompt) - 1) - w.keep_from
        if n <= 0:
            return
        targets = torch.tensor(prompt[w.keep_from + 1 : w.keep_from + 1 + n], device=logits.device)
        chosen, top = _score(logits[:n], targets, req.request.topk_prompt_logprobs)
        if req.request.prompt_logprobs:
            req.prompt_logprobs.extend(chosen)
        if req.request.topk_prompt_logprobs:
            req.topk_prompt_logprobs.extend(top)

    def _finish(self, req: RequestState) -> None:
        self.running.remove(req)
        self.pool.unreserve(req.reserved_blocks - req.blocks_taken)
        samples = sorted(req.finished, key=lambda s: s.sample_index)
        req.result = SampleResult(
            [
                SampledSequence(
                    s.generated,
                    s.logprobs,
                    s.stop_reason or "length",
                    None if s.memory is None else s.memory.to("cpu", copy=True),
                )
                for s in samples
            ],
            req.prompt_logprobs if req.request.prompt_logprobs else None,
            req.topk_prompt_logprobs,
        )
        req.done = True
        if req.stream is not None:
            req.stream.close()

    def abort(self) -> list[RequestState]:
        """Drop every request (after a failed step): free their blocks, close their streams."""
        dropped = [*self.running, *self.pending]
        for req in self.running:
            for seq in req.sequences:
                self.runner.free(seq)
            req.sequences = []
            self.pool.unreserve(req.reserved_blocks - req.blocks_taken)
        self.running, self.pending = [], deque()
        for req in dropped:
            if req.stream is not None:
                req.stream.close()
        return dropped


def _score(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each row's logprob of its target at temperature 1, and its `k` most likely tokens (none for 0)."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
    if not k:
        return chosen, [[] for _ in chosen]
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]


def _scores(
    logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
) -> dict[int, tuple[float, tuple[tuple[int, float], ...]]]:
    """Row -> (the chosen token's logprob at temperature 1, the top alternatives) for the rows whose
    stream asks for scores: from the logits that chose the token, so a streamed answer with logprobs
    needs no second pass over prompt + answer."""
    streams = [s.request.stream for s in seqs]
    tops = {i: st.score_top for i, st in enumerate(streams) if st is not None and st.score_top is not None}
    if not tops:
        return {}
    rows = list(tops)
    chosen, top = _score(logits[rows], tokens[rows], max(tops.values()))
    return {i: (chosen[j], tuple(top[j][: tops[i]])) for j, i in enumerate(rows)}
