"""Sampling behind the Tinker API: sampling sessions (samplers) and their samples. A part of
`TinkerService` (see service/tinker), in a file of its own; a sample names its adapter by key (a saved
revision, a run's snapshot, or none for the base) and the worker admits it once residency has it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mintd.catalog import Revision
from mintd.engine import sampling
from mintd.engine.adapters import BASE_SLOT
from mintd.engine.sampling import SampleRequest, SampleResult, SamplingParams
from mintd.service.errors import Busy
from mintd.service.futures import Future
from mintd.service.memory import USER_SUFFIX, Binding, is_delta_mem, refuse_state
from mintd.service.scheduler import Priority, SampleOp
from mintd.service.sessions import Sampler

if TYPE_CHECKING:
    from mintd.service.tinker import BaseModelHandle

log = logging.getLogger(__name__)


class Sampling:
    """TinkerService's sampling operations (it supplies models, registry, futures, lookups)."""

    def create_sampling_session(
        self, owner: str, session_id: str, seq: int, base_model: str | None, model_path: str | None
    ) -> str:
        self.session(session_id, owner, live=True)
        sampler_id = f"{session_id}:sample:{seq}"
        if model_path is not None:  # any ref: tinker:// path, name@N, name:alias (pinned here)
            ref, _, instance = model_path.partition(USER_SUFFIX)  # ref#user=<instance>: a δ-mem instance
            rev = self.revision(owner, ref, "model_path")
            refuse_state(rev, "model_path")
            if instance and not is_delta_mem(rev):
                raise ValueError(
                    f"model_path: {USER_SUFFIX} binds a δ-mem instance, and {rev.ref} is not δ-mem"
                )
            handle = self.base_of(rev, "model_path")
            backlog = handle.worker.residency.load_backlog(rev)
            if backlog is not None and backlog < self.settings.max_load_queue:  # likely sampled soon
                handle.worker.residency.prefetch(rev, Priority.INTERACTIVE)
            sampler = Sampler(sampler_id, owner, session_id, handle.name, model_path, rev, instance or None)
        else:
            handle = self.base(base_model)
            sampler = Sampler(sampler_id, owner, session_id, handle.name, None)
        return self.registry.add_sampler(sampler).id

    def get_sampler(self, owner: str, sampler_id: str) -> dict[str, Any]:
        s = self.sampler(sampler_id, owner)
        return {"sampler_id": s.id, "base_model": s.base_model, "model_path": s.model_path}

    def sample(
        self,
        owner: str,
        sampler_id: str,
        seq_id: int,
        tokens: list[int],
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        prompt_logprobs_last_n: int | None,
        record_stability_info: bool = False,
    ) -> tuple[Future, list[str]]:
        """Queue a sample; answers its future and the sequence ids (one per sample, minted now, so a
        retried request gets the same ones). With `record_stability_info` the sequences are recorded
        for stable_reinforce."""
        sampler = self.sampler(sampler_id, owner)
        handle = self.models[sampler.base_model]
        request = SampleRequest(BASE_SLOT, tokens, params, num_samples, prompt_logprobs, topk_prompt_logprobs)
        sampling.validate(request, handle.engine.vocab_size, handle.engine.max_len)
        handle.engine.steps.check(request)  # fits the KV cache at all (reads only its fixed size)
        sequence_ids = [f"{sampler_id}:{seq_id}:{i}" for i in range(num_samples)]
        key = ("sample", sampler_id, seq_id)
        memory: Binding | None = None
        if isinstance(sampler.adapter, Revision) and not self.futures.known(key):
            admit_cold(handle, sampler.adapter, self.settings.max_load_queue, "model_path")
            if is_delta_mem(sampler.adapter):
                if sampler.instance is not None and num_samples != 1:
                    raise ValueError("num_samples: a δ-mem instance writes one continuation; use 1")
                memory = self.memories.bind(owner, sampler.adapter, handle.engine, sampler.instance, tokens)
                request.memory = memory.input()
        fut, created = self.futures.create("Sample", owner, key, sampler.session_id)
        if memory is not None:  # the lease ends with the sample, however it ends
            self.futures.on_done(fut, lambda _: memory.release())
        if created:

            def finish(result: SampleResult) -> SampleResult:
                if memory is not None:  # on the engine thread, so the next sample sees the new state
                    try:
                        memory.commit(result)
                    except Exception:  # noqa: BLE001 - the sample stands; `live` keeps the state before it
                        log.exception("δ-mem commit failed for %s", sampler.instance)
                if record_stability_info:
                    self.sequences.record(sampler.session_id, sequence_ids, tokens, result.sequences)
                if prompt_logprobs_last_n is not None and result.prompt_logprobs is not None:
                    keep = len(result.prompt_logprobs) - prompt_logprobs_last_n
                    result.prompt_logprobs = [
                        None if i < keep else v for i, v in enumerate(result.prompt_logprobs)
                    ]
                return result

            handle.worker.submit_sample(fut, SampleOp(request, finish, sampler_id, sampler.adapter))
        return fut, sequence_ids


def admit_cold(handle: BaseModelHandle, rev: Revision, max_load_queue: int, field: str) -> None:
    """Busy (429) when `rev` needs a cold load and `max_load_queue` loads already wait on its base."""
    backlog = handle.worker.residency.load_backlog(rev)
    if backlog is not None and backlog >= max_load_queue:
        raise Busy(
            f"{field}: {backlog} adapter loads are waiting on base model {handle.name!r}, the most this "
            "server queues (MINTD_MAX_LOAD_QUEUE); retry shortly"
        )
