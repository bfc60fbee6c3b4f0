"""The control plane behind the Tinker API: sessions, training runs, samplers, checkpoints, futures.

It knows names (model ids, sampler ids, tinker:// paths) and maps them to engine slots; the engine
only ever sees slots. Methods raise ValueError for bad input (HTTP 400) and NotFound for unknown or
foreign objects (HTTP 404, so other owners' objects do not leak). Engine work is queued on the base
model's worker and answered through futures. Sessions end when finished or idle (`reap`), and what
they held in memory is freed.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mintd.catalog import Provenance, Revision
from mintd.catalog import validate as catalog_validate
from mintd.catalog.errors import CatalogNotFound
from mintd.config import ServeSettings
from mintd.engine import distill, sampling, train
from mintd.engine.adapters import BASE_SLOT, LoraSpec
from mintd.engine.distill import KLDatum, KLGroup, KLOutput
from mintd.engine.engine import Engine
from mintd.engine.optim import AdamParams
from mintd.engine.sampling import SampleRequest, SampleResult, SamplingParams
from mintd.engine.train import TrainGroup, TrainOutput
from mintd.residency import Residency
from mintd.service import interpolate, provenance, wire
from mintd.service.checkpoints import (
    CHECKPOINT_TYPES,
    Checkpoints,
    TinkerPath,
    check_name,
    run_adapter_name,
)
from mintd.service.errors import Gone, NotFound
from mintd.service.futures import Future, FutureStore, RequestError
from mintd.service.provenance import SequenceRecords
from mintd.service.runs import RunElsewhere, RunRecords
from mintd.service.scheduler import CallOp, EngineWorker, SampleOp, SchedulerLimits, TrainOp
from mintd.service.sessions import Quotas, Registry, Run, Sampler, Session
from mintd.store.packed import pack, split_state
from mintd.store.peft import load_peft_folder, untar_peft

__all__ = ["Gone", "NotFound", "RunElsewhere", "TinkerService"]
log = logging.getLogger(__name__)


@dataclass
class BaseModelHandle:
    name: str
    model_dir: Path
    engine: Engine
    worker: EngineWorker


class TinkerService:
    def __init__(
        self,
        models: dict[str, Engine],
        checkpoints: Checkpoints,
        runs: RunRecords,
        futures: FutureStore,
        settings: ServeSettings,
    ) -> None:
        limits = SchedulerLimits(
            max_train_tokens=settings.max_train_tokens,
            max_sample_rows=settings.max_sample_rows,
            seq_gap_timeout_s=settings.seq_gap_timeout_s,
        )
        budget = int(settings.adapter_device_budget)
        self.models = {
            name: BaseModelHandle(
                name, e.model_dir, e, EngineWorker(e, futures, limits, name, Residency(e, self._load, budget))
            )
            for name, e in models.items()
        }
        self.checkpoints = checkpoints
        self.catalog = checkpoints.catalog
        self.runs = runs
        self.futures = futures
        self.settings = settings
        quotas = Quotas(
            settings.max_sessions_per_owner, settings.max_runs_per_owner, settings.max_samplers_per_owner
        )
        self.registry = Registry(quotas)
        self.sequences = SequenceRecords(settings.sequence_ttl_s, settings.max_recorded_sequences)
        self._sample_seq = itertools.count()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="mintd-reaper", daemon=True)
        self._reaper.start()

    def _load(self, engine: Engine, rev: Revision) -> int:
        """Residency's loader: a saved adapter into a new slot, for sampling (verified, base checked)."""
        return self.checkpoints.load_into(engine, rev, trainable=False, optimizer=False, field="model_path")

    def residency(self) -> dict[str, Any]:
        return {name: h.worker.residency.stats() for name, h in self.models.items()}

    def close(self) -> None:
        self._closed.set()
        self._reaper.join(timeout=10)
        self.runs.stop()
        for handle in self.models.values():
            handle.worker.stop()

    # lookups ------------------------------------------------------------------------------------

    def base(self, name: str | None, field_name: str = "base_model") -> BaseModelHandle:
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        handle = self.models.get(name.split(":", 1)[0] if name else "")
        if handle is None:
            raise ValueError(
                f"{field_name}: unknown base model {name!r}; this server has {sorted(self.models)}"
            )
        return handle

    def session(self, session_id: str, owner: str, live: bool = False) -> Session:
        return self.registry.session(session_id, owner, live)

    def run(self, model_id: str, owner: str) -> Run:
        try:
            return self.registry.run(model_id, owner)
        except NotFound:  # not here: maybe another replica holds it (409 naming it)
            elsewhere = self.runs.elsewhere(model_id, owner)
            if elsewhere is not None:
                raise elsewhere from None
            raise

    def sampler(self, sampler_id: str, owner: str) -> Sampler:
        return self.registry.sampler(sampler_id, owner)

    def run_record(self, owner: str, run_id: str) -> dict[str, Any]:
        """A training run of this owner, live or from an earlier server process."""
        record = self.runs.read(run_id)
        if record is None or record["owner"] != owner:
            raise NotFound(f"training run {run_id} not found")
        return record

    def revision(self, owner: str, ref: str, field_name: str = "path") -> Revision:
        """Any ref (tinker:// path, name, name@N, name:alias) to this owner's live revision, or 404."""
        return self.catalog.resolve(owner, ref, field=field_name)

    def base_of(self, rev: Revision, field_name: str = "path") -> BaseModelHandle:
        """The served base model a revision was trained on (matched by fingerprint, not by name)."""
        for handle in self.models.values():
            if handle.engine.fingerprint == rev.provenance.base_fingerprint:
                return handle
        raise ValueError(
            f"{field_name}: {rev.ref} was trained on base model {rev.provenance.base_model!r}, which this "
            f"server does not serve (it serves {sorted(self.models)})"
        )

    # sessions -----------------------------------------------------------------------------------

    def create_session(self, owner: str, tags: list[str], user_metadata: dict[str, Any]) -> str:
        return self.registry.create_session(owner, tags, user_metadata).id

    def heartbeat(self, session_id: str, owner: str) -> None:
        self.session(session_id, owner)  # a lookup is a sign of life

    def finish_session(self, session_id: str, owner: str, reason: str) -> None:
        """The session takes no new work; once its queued work is done `reap` frees what it held."""
        s = self.session(session_id, owner)
        s.finished = s.finished or reason  # first wins

    def reap(self) -> list[str]:
        """End finished sessions and idle ones (none with work in flight); free their runs' adapters,
        optimizer state, snapshots and loaded samplers. The ended session ids."""
        due = self.registry.due(self.settings.session_idle_timeout_s, self.futures.busy_sessions())
        for session, why in due:
            ended = self.registry.end(session, why)
            for run in ended.runs:
                worker = self.models[run.base_model].worker
                worker.remove_run(run.model_id)
                self.runs.release(run.model_id)
                worker.post(lambda e, slots=(run.slot, *run.ephemeral.values()): _drop(e, slots))
            log.info(
                "session %s of %s closed (%s): freed %d training runs, %d samplers",
                session.id,
                session.owner,
                why,
                len(ended.runs),
                len(ended.samplers),
            )
        return [session.id for session, _ in due]

    def _reap_loop(self) -> None:
        while not self._closed.wait(self.settings.reap_interval_s):
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - the reaper must outlive a bug in one pass
                log.exception("reaping sessions failed")

    # training runs ------------------------------------------------------------------------------

    def _submit_direct(
        self, handle: BaseModelHandle, owner: str, session_id: str, key: tuple, kind: str, fn
    ) -> Future:
        fut, created = self.futures.create(kind, owner, key, session_id)
        if created:
            handle.worker.submit_call(fut, CallOp(fn))
        return fut

    def create_model(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora_config: dict[str, Any],
        user_metadata: dict[str, Any],
    ) -> Future:
        self.session(session_id, owner, live=True)
        handle = self.base(base_model)
        spec = LoraSpec(**lora_config)
        self.registry.check_run_quota(owner)
        model_id = f"{session_id}:train:{model_seq_id}"
        adapter = _adapter_name(user_metadata, model_id)

        def create(engine: Engine) -> dict[str, Any]:
            slot = engine.create_adapter(spec)
            run = Run(model_id, session_id, owner, handle.name, spec, user_metadata, adapter, slot)
            self._register_run(engine, run)
            return {"model_id": model_id, "type": "create_model"}

        key = ("model", session_id, model_seq_id)
        return self._submit_direct(handle, owner, session_id, key, "CreateModel", create)

    def _register_run(self, engine: Engine, run: Run) -> None:
        """On the worker, once the run's slot exists; a session that ended meanwhile gets its slot back."""
        try:
            self.registry.add_run(run)
        except Exception:
            engine.drop(run.slot)
            raise
        self.models[run.base_model].worker.add_run(run.model_id)
        self.runs.write(run.model_id, self._run_record(run))

    def _run_record(self, run: Run) -> dict[str, Any]:
        return {
            "training_run_id": run.model_id,
            "owner": run.owner,
            "base_model": run.base_model,
            "lora": run.spec.model_dump(),
            "user_metadata": run.user_metadata,
            "session_id": run.session_id,
            "adapter": run.adapter,
        }

    def get_info(self, model_id: str, owner: str) -> dict[str, Any]:
        run = self.run(model_id, owner)
        handle = self.models[run.base_model]
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {
                "arch": handle.engine.model.config.model_type,
                "model_name": run.base_model,
                "tokenizer_id": str(handle.model_dir.resolve()),
            },
            "is_lora": True,
            "lora_rank": run.spec.rank,
            "lora_adapted": handle.engine.adapted(run.spec),  # per switch, the family's names
            "model_name": run.base_model,
        }

    def _run_op(self, owner: str, model_id: str, seq_id: int, kind: str, op_factory) -> Future:
        """Queue a run op in seq order; a repeated (model_id, seq_id) gets the first future back.

        Any refusal here (bad input, or a bug) still consumes the seq_id, as a failed future, so that the
        run's queue does not stall; it is then raised for an immediate 4xx."""
        run = self.run(model_id, owner)
        if not isinstance(seq_id, int) or seq_id < 1:
            raise ValueError("seq_id: must be an integer >= 1")
        fut, created = self.futures.create(kind, owner, ("run", model_id, seq_id), run.session_id)
        if not created:
            return fut
        worker = self.models[run.base_model].worker
        try:
            op = op_factory(run)
        except Exception as exc:
            error = _refusal(exc)
            worker.submit_run_op(model_id, seq_id, fut, CallOp(lambda _e, error=error: _raise(error)))
            raise
        run.last_request_time = time.time()
        worker.submit_run_op(model_id, seq_id, fut, op)
        return fut

    def refuse(self, owner: str, model_id: str, seq_id: int, error: ValueError) -> None:
        """A run op refused before it could be read (an undecodable body) still takes its seq_id, so the
        run goes on; raises `error` (or NotFound for a run the caller does not have)."""

        def refused(_run: Run) -> TrainOp:
            raise error

        self._run_op(owner, model_id, seq_id, "ForwardBackward", refused)

    def forward_backward(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        data: list[Any],
        loss_fn: str,
        loss_fn_config: dict[str, Any] | None,
        forward_only: bool,
    ) -> Future:
        def make(run: Run) -> TrainOp:
            handle = self.models[run.base_model]
            config = {k: float(v) for k, v in (loss_fn_config or {}).items() if isinstance(v, (int, float))}
            cap = self.settings.max_tensor_elements
            datums = [wire.datum(d, i, cap) for i, d in enumerate(data)]
            provenance.apply(loss_fn, data, datums, self.sequences, run.session_id)
            group = TrainGroup(run.slot, datums, loss_fn, config)
            train.validate(group, handle.engine.vocab_size, handle.engine.max_len)

            def result(out: TrainOutput) -> dict[str, Any]:
                if not forward_only:
                    run.loss_fn = loss_fn
                return _forward_result(out)

            return TrainOp(group, forward_only, result, slot=lambda: run.slot)

        return self._run_op(owner, model_id, seq_id, "Forward" if forward_only else "ForwardBackward", make)

    def optim_step(self, owner: str, model_id: str, seq_id: int, params: dict[str, Any]) -> Future:
        def make(run: Run) -> CallOp:
            hp = dict(params)
            kind = hp.pop("type", "adam")
            if kind not in ("adam", "adamw"):
                raise ValueError(f"optimizer_params.type: {kind!r} is not supported; use adam")
            adam = AdamParams(**hp)

            def step(engine: Engine) -> dict[str, Any]:
                metrics = engine.optim_step(run.slot, adam)
                run.step, run.optimizer = run.step + 1, {"type": kind, **adam.model_dump()}
                return {"metrics": metrics, "type": "optim_step"}

            return CallOp(step)

        return self._run_op(owner, model_id, seq_id, "OptimStep", make)

    def save_weights(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, Any] | None = None,
    ) -> Future:
        """save_state: weights and optimizer state, loadable for training (a `state` revision)."""

        def make(run: Run) -> CallOp:
            path = TinkerPath(model_id, "weights", check_name(name))
            catalog_validate.ttl(ttl_seconds)
            return CallOp(
                lambda e: self._save(e, run, path, ttl_seconds, overwrite, user_metadata, "save_weights")
            )

        return self._run_op(owner, model_id, seq_id, "SaveWeights", make)

    def save_weights_for_sampler(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str | None,
        ttl_seconds: int | None,
        sampling_session_seq_id: int | None,
        user_metadata: dict[str, Any] | None = None,
    ) -> Future:
        def make(run: Run) -> CallOp:
            if name is None:  # ephemeral: a snapshot slot and a sampler, no disk round trip, no revision
                if sampling_session_seq_id is not None:  # the session's counter, as the SDK numbers it
                    sampler_id = f"{run.session_id}:sample:{sampling_session_seq_id}"
                else:  # a client that sent none: a server-side number that cannot collide with those
                    sampler_id = f"{run.session_id}:sample:server-{next(self._sample_seq)}"
                return CallOp(lambda e: self._ephemeral_sampler(e, run, sampler_id))
            path = TinkerPath(model_id, "sampler_weights", check_name(name))
            catalog_validate.ttl(ttl_seconds)
            kind = "save_weights_for_sampler"
            return CallOp(lambda e: self._save(e, run, path, ttl_seconds, True, user_metadata, kind))

        return self._run_op(owner, model_id, seq_id, "SaveWeightsForSampler", make)

    def save_weights_external(
        self, owner: str, model_id: str, seq_id: int, name: str, ttl_seconds: int | None
    ) -> Future:
        """0.38: weights for use outside mintd; downloadable as a PEFT folder (`external_weights_urls`)."""

        def make(run: Run) -> CallOp:
            path = TinkerPath(model_id, "external_weights", check_name(name))
            catalog_validate.ttl(ttl_seconds)
            kind = "save_weights_external"
            return CallOp(lambda e: self._save(e, run, path, ttl_seconds, True, None, kind))

        return self._run_op(owner, model_id, seq_id, "SaveWeightsExternal", make)

    def _save(
        self,
        engine: Engine,
        run: Run,
        path: TinkerPath,
        ttl: int | None,
        overwrite: bool,
        user_metadata: dict[str, Any] | None,
        result_type: str,
    ) -> dict[str, Any]:
        """Runs on the worker, after every earlier op of the run: pack, store, register, acknowledge."""
        with_optimizer = path.kind == "weights"
        spec, tensors = engine.export_adapter(run.slot, with_optimizer=with_optimizer)
        weights, optimizer = split_state(tensors)
        data = pack(spec, weights, engine.fingerprint, optimizer if with_optimizer else None)
        metadata = dict(user_metadata or {})
        data_fingerprint = metadata.get("data_fingerprint")
        provenance = Provenance(
            base_fingerprint=engine.fingerprint,
            base_model=run.base_model,
            lora_config=engine.lora_provenance(spec),
            training_run_id=run.model_id,
            step=run.step,
            loss_fn=run.loss_fn,
            optimizer=run.optimizer,
            data_fingerprint=data_fingerprint if isinstance(data_fingerprint, str) else None,
        )
        rev = self.checkpoints.add(
            run.owner,
            run.adapter,
            data,
            catalog_validate.TINKER_KINDS[path.kind],
            provenance,
            tinker_path=str(path),
            parents=(run.parent,) if run.parent else (),
            ttl_seconds=ttl,
            overwrite=overwrite,
            metadata=metadata,
        )
        run.parent = rev.ref
        return {"path": str(path), "size_bytes": len(data), "revision": rev.ref, "type": result_type}

    def _ephemeral_sampler(self, engine: Engine, run: Run, sampler_id: str) -> dict[str, Any]:
        slot = engine.snapshot(run.slot)
        sampler = Sampler(sampler_id, run.owner, run.session_id, run.base_model, None, slot, ephemeral=True)
        try:
            self.registry.add_sampler(sampler)
        except Exception:  # the session ended meanwhile
            engine.drop(slot)
            raise
        run.ephemeral[sampler_id] = slot
        while len(run.ephemeral) > self.settings.ephemeral_samplers_per_run:  # the oldest snapshots go
            old_id, old_slot = run.ephemeral.popitem(last=False)
            self.registry.drop_sampler(old_id)
            engine.drop(old_slot)
        return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    def load_weights(self, owner: str, model_id: str, seq_id: int, path: str, optimizer: bool) -> Future:
        """Legacy load_state: replace a run's adapter (and optionally optimizer) from a revision."""

        def make(run: Run) -> CallOp:
            rev = self.revision(owner, path)

            def load(engine: Engine) -> dict[str, Any]:
                slot = self.checkpoints.load_into(engine, rev, trainable=True, optimizer=optimizer)
                engine.drop(run.slot)
                run.slot, run.spec = slot, engine.slots[slot].spec
                run.continue_from(rev)
                return {"path": path, "model_id": model_id, "type": "load_weights"}

            return CallOp(load)

        return self._run_op(owner, model_id, seq_id, "LoadWeights", make)

    def create_model_from_state(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int,
        path: str,
        optimizer: bool,
        user_metadata: dict[str, Any],
    ) -> Future:
        """0.38 create-via-load: a new run whose adapter (and optimizer) come from a revision. It
        continues that revision's adapter (its saves are the adapter's next revisions, the state their
        parent) unless `user_metadata["adapter_name"]` names another."""
        self.session(session_id, owner, live=True)
        rev = self.revision(owner, path)
        handle = self.base_of(rev)
        self.registry.check_run_quota(owner)
        model_id = f"{session_id}:train:{model_seq_id}"
        adapter = _adapter_name(user_metadata, model_id, default=rev.adapter)

        def create(engine: Engine) -> dict[str, Any]:
            slot = self.checkpoints.load_into(engine, rev, trainable=True, optimizer=optimizer)
            spec = engine.slots[slot].spec
            run = Run(model_id, session_id, owner, handle.name, spec, user_metadata, adapter, slot)
            run.continue_from(rev)
            self._register_run(engine, run)
            return {"model_id": model_id, "path": path, "type": "load_weights"}

        key = ("model", session_id, model_seq_id)
        return self._submit_direct(handle, owner, session_id, key, "LoadWeights", create)

    def weights_info(self, owner: str, path: str) -> dict[str, Any]:
        rev = self.revision(owner, path, "tinker_path")
        lora = rev.provenance.lora_config
        return {
            "base_model": rev.provenance.base_model,
            "is_lora": True,
            "lora_rank": lora["rank"],
            "train_attn": lora["train_attn"],
            "train_mlp": lora["train_mlp"],
            "train_unembed": lora["train_unembed"],
        }

    def unload_model(self, owner: str, model_id: str) -> Future:
        run = self.run(model_id, owner)
        handle = self.models[run.base_model]

        def unload(engine: Engine) -> dict[str, Any]:
            handle.worker.remove_run(model_id)
            _drop(engine, (run.slot, *run.ephemeral.values()))
            self.registry.remove_run(run)
            self.runs.release(model_id)
            return {"model_id": model_id, "type": "unload_model"}

        return self._submit_direct(handle, owner, run.session_id, ("unload", model_id), "UnloadModel", unload)

    # sampling -----------------------------------------------------------------------------------

    def create_sampling_session(
        self, owner: str, session_id: str, seq: int, base_model: str | None, model_path: str | None
    ) -> str:
        self.session(session_id, owner, live=True)
        sampler_id = f"{session_id}:sample:{seq}"
        if model_path is not None:  # any ref: tinker:// path, name@N, name:alias (pinned here)
            rev = self.revision(owner, model_path, "model_path")
            handle = self.base_of(rev, "model_path")
            sampler = Sampler(sampler_id, owner, session_id, handle.name, model_path, None, rev)
        else:
            handle = self.base(base_model)
            sampler = Sampler(sampler_id, owner, session_id, handle.name, None, BASE_SLOT)
        return self.registry.add_sampler(sampler).id

    def get_sampler(self, owner: str, sampler_id: str) -> dict[str, Any]:
        s = self.sampler(sampler_id, owner)
        return {"sampler_id": s.id, "base_model": s.base_model, "model_path": s.model_path}

    def sample(
        self,
        owner: str,
        sampler_id: str,
        seq_id: int,
        prompt: Any,
        num_samples: int,
        sampling_params: dict[str, Any],
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
        tokens = wire.tokens(prompt, "prompt").tolist()
        params = SamplingParams(**{k: v for k, v in sampling_params.items() if v is not None or k == "stop"})
        request = SampleRequest(BASE_SLOT, tokens, params, num_samples, prompt_logprobs, topk_prompt_logprobs)
        sampling.validate(request, handle.engine.vocab_size, handle.engine.max_len)
        sequence_ids = [f"{sampler_id}:{seq_id}:{i}" for i in range(num_samples)]
        key = ("sample", sampler_id, seq_id)
        fut, created = self.futures.create("Sample", owner, key, sampler.session_id)
        if created:
            if sampler.revision is None:  # the base, or a training run's snapshot
                request.slot = sampler.slot

            def finish(result: SampleResult) -> SampleResult:
                if record_stability_info:
                    self.sequences.record(sampler.session_id, sequence_ids, tokens, result.sequences)
                if prompt_logprobs_last_n is not None and result.prompt_logprobs is not None:
                    keep = len(result.prompt_logprobs) - prompt_logprobs_last_n
                    result.prompt_logprobs = [
                        None if i < keep else v for i, v in enumerate(result.prompt_logprobs)
                    ]
                return result

            handle.worker.submit_sample(fut, SampleOp(request, finish, sampler_id, sampler.revision))
        return fut, sequence_ids

    # MinT extensions ------------------------------------------------------------------------------

    def interpolate_checkpoints(
        self,
        owner: str,
        source_paths: list[str],
        coefficients: list[float],
        output_path: str | None,
        rank: int | None = None,
    ) -> Future:
        """A sampler revision Σ cᵢ·Δᵢ (see service/interpolate); done before answering, so bad input is
        an immediate 4xx, and the SDK's future resolves on its first poll."""
        result = interpolate.interpolate(
            self.checkpoints, owner, source_paths, coefficients, interpolate.output_adapter(output_path), rank
        )
        fut, _ = self.futures.create("MintInterpolateCheckpoints", owner)
        self.futures.resolve(
            fut,
            {
                "type": "mint_interpolate_checkpoints",
                "path": result.path,
                "checkpoint_type": "sampler",
                "source_paths": source_paths,
                "coefficients": coefficients,
                "has_rank_shards": False,
                "revision": result.revision.ref,
                "rank": result.rank,
                "truncation_error": result.truncation_error,
            },
        )
        return fut

    def forward_backward_reverse_kl(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        reference_model_path: str,
        data: list[Any],
        temperature: float,
    ) -> Future:
        """MinT's reverse-KL distillation step (engine/distill): the run's adapter is the student; the
        reference is any revision of the same base, or the base model itself (named as the run's base
        model). Without a seq_id it runs after the run's work already submitted."""
        run = self.run(model_id, owner)
        handle = self.models[run.base_model]
        if reference_model_path == run.base_model:
            reference = None
        else:
            reference = self.revision(owner, reference_model_path, "reference_model_path")
            if reference.provenance.base_fingerprint != handle.engine.fingerprint:
                raise ValueError(
                    f"reference_model_path: {reference.ref} was trained on base model "
                    f"{reference.provenance.base_model!r}, not this run's {run.base_model!r}"
                )
        group = KLGroup(
            BASE_SLOT,
            BASE_SLOT,
            [distill_datum(d, i, self.settings.max_tensor_elements) for i, d in enumerate(data)],
            temperature,
        )
        distill.validate(group, handle.engine.vocab_size, handle.engine.max_len)

        residency = handle.worker.residency

        def step(engine: Engine) -> dict[str, Any]:
            group.slot = run.slot
            if reference is not None:  # a resident copy, shared with samplers and kept between steps
                group.reference_slot = residency.acquire(reference)
            try:
                out = engine.reverse_kl(group)
            finally:
                if reference is not None:
                    residency.release(reference)
            run.loss_fn = "reverse_kl"
            return _reverse_kl_result(out)

        if seq_id is not None:
            return self._run_op(
                owner, model_id, seq_id, "MintForwardBackwardReverseKL", lambda _r: CallOp(step)
            )
        fut, _ = self.futures.create("MintForwardBackwardReverseKL", owner, session_id=run.session_id)
        run.last_request_time = time.time()
        handle.worker.submit_after_run(model_id, fut, CallOp(step))
        return fut

    # REST views ---------------------------------------------------------------------------------

    def list_checkpoints(self, owner: str, run_id: str) -> list[dict[str, Any]]:
        self.run_record(owner, run_id)
        return [_checkpoint_view(rev) for rev in self.catalog.tinker_checkpoints(owner, run_id)]

    def checkpoint(self, owner: str, run_id: str, checkpoint_id: str) -> Revision:
        """The revision a REST path's `<run>/checkpoints/<kind>/<name>` names."""
        return self.revision(owner, f"tinker://{run_id}/{checkpoint_id}", "checkpoint_id")

    def delete_checkpoint(self, owner: str, run_id: str, checkpoint_id: str) -> None:
        self.catalog.delete_revision(owner, self.checkpoint(owner, run_id, checkpoint_id).ref)

    def set_checkpoint_ttl(
        self, owner: str, run_id: str, checkpoint_id: str, ttl_seconds: int | None
    ) -> None:
        rev = self.checkpoint(owner, run_id, checkpoint_id)
        self.catalog.set_ttl(owner, rev.ref, ttl_seconds)

    def import_peft_archive(
        self,
        owner: str,
        adapter: str,
        archive: bytes,
        base_model: str | None,
        metadata: dict[str, Any] | None = None,
    ) -> Revision:
        """A PEFT folder archive (.tar/.tar.gz) -> the next `external` revision of `adapter`, after
        checking it fits the named base model; a bad archive stores nothing."""
        catalog_validate.name(adapter, "name")
        handle = self.base(base_model)
        with tempfile.TemporaryDirectory(prefix="mintd-import-") as tmp:
            try:
                untar_peft(archive, tmp)
                spec, tensors = load_peft_folder(tmp)
                handle.engine.check_adapter(spec, tensors)
            except ValueError as exc:  # name the archive, not our temporary folder
                raise ValueError(str(exc).replace(tmp + "/", "archive: ").replace(tmp, "archive")) from None
        fingerprint = handle.engine.fingerprint
        provenance = Provenance(
            base_fingerprint=fingerprint,
            base_model=handle.name,
            lora_config=handle.engine.lora_provenance(spec),
        )
        data = pack(spec, tensors, fingerprint)
        return self.checkpoints.add(owner, adapter, data, "external", provenance, metadata=metadata)

    def peft_files(self, owner: str, ref: str) -> dict[str, bytes]:
        """A revision as PEFT folder files, for the export downloads."""
        return self.checkpoints.peft_files(self.revision(owner, ref, "ref"))

    def training_run(self, owner: str, run_id: str) -> dict[str, Any]:
        record = self.run_record(owner, run_id)
        latest: dict[str, dict[str, Any] | None] = {kind: None for kind in CHECKPOINT_TYPES.values()}
        for rev in self.catalog.tinker_checkpoints(owner, run_id):
            view = _checkpoint_view(rev)
            latest[view["checkpoint_type"]] = view
        live = self.registry.live_run(run_id)
        return {
            "training_run_id": run_id,
            "base_model": record["base_model"],
            "model_owner": owner,
            "is_lora": True,
            "corrupted": False,
            "lora_rank": record["lora"]["rank"],
            "last_request_time": _iso(live.last_request_time if live else time.time()),
            "last_checkpoint": latest["training"],
            "last_sampler_checkpoint": latest["sampler"],
            "user_metadata": record.get("user_metadata") or None,
        }

    def training_runs(self, owner: str) -> list[dict[str, Any]]:
        return [self.training_run(owner, r) for r in self.runs.ids(owner)]

    def session_view(self, owner: str, session_id: str) -> dict[str, Any]:
        s = self.session(session_id, owner)
        return {"training_run_ids": s.run_ids, "sampler_ids": s.sampler_ids, "user_metadata": s.user_metadata}

    def session_ids(self, owner: str) -> list[str]:
        return [s.id for s in self.registry.owner_sessions(owner)]

    def capabilities(self) -> list[dict[str, Any]]:
        return [
            {
                "model_name": h.name,
                "max_context_length": h.engine.max_len,
                "trainable": True,
                "sampleable": True,
                "lora": h.engine.coverage(),  # what train_attn / train_mlp / train_unembed adapt here
            }
            for h in self.models.values()
        ]


def _raise(exc: Exception) -> None:
    raise exc


def _drop(engine: Engine, slots: tuple[int | None, ...]) -> None:
    for slot in slots:
        if slot not in (None, BASE_SLOT) and slot in engine.slots:
            engine.drop(slot)


def _refusal(exc: Exception) -> RequestError:
    """What a later poll of a refused request's future reports."""
    if isinstance(exc, (ValueError, NotFound, Gone, CatalogNotFound)):
        return RequestError(str(exc), "user")
    return RequestError(f"internal error: {type(exc).__name__}", "server")


def _adapter_name(user_metadata: dict[str, Any] | None, run_id: str, default: str | None = None) -> str:
    """The catalog adapter a run saves into: `user_metadata["adapter_name"]` (several runs may continue
    one adapter), else `default` (a resumed state's own adapter), else one named after the run."""
    name = (user_metadata or {}).get("adapter_name")
    if name is None:
        return default or run_adapter_name(run_id)
    return catalog_validate.name(name, "user_metadata.adapter_name")


def distill_datum(value: Any, index: int, max_elements: int) -> KLDatum:
    """A `ReverseKLDatum` {student_input, reference_input, target_tokens, weights} to the engine's."""
    where = f"data[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a ReverseKLDatum object")
    for name in ("target_tokens", "weights"):
        if value.get(name) is None:
            raise ValueError(f"{where}.{name}: missing")
    return KLDatum(
        torch.from_numpy(wire.tokens(value.get("student_input"), f"{where}.student_input")),
        torch.from_numpy(wire.tokens(value.get("reference_input"), f"{where}.reference_input")),
        wire.tensor(value["target_tokens"], f"{where}.target_tokens", max_elements).long().reshape(-1),
        wire.tensor(value["weights"], f"{where}.weights", max_elements).float().reshape(-1),
    )


def _reverse_kl_result(out: KLOutput) -> dict[str, Any]:
    weight = out.weight or 1.0
    return {
        "type": "mint_forward_backward_reverse_kl",
        "outputs": [
            {"loss": {"data": lp.tolist(), "shape": [len(lp)], "dtype": "float32"}} for lp in out.losses
        ],
        "metrics": {
            "loss:sum": out.loss,
            "reverse_kl:mean": out.loss / weight,  # exact, per unit of weight
            "sampled_kl:sum": out.sampled_kl,  # log π_student(y) − log π_reference(y) at the targets
            "sampled_kl:mean": out.sampled_kl / weight,
            "weight:sum": out.weight,
        },
    }


def _forward_result(out: TrainOutput) -> dict[str, Any]:
    return {"loss_fn_outputs": [{"logprobs": lp} for lp in out.logprobs], "metrics": {"loss:sum": out.loss}}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _checkpoint_view(rev: Revision) -> dict[str, Any]:
    path = TinkerPath.parse(rev.tinker_path)
    return {
        "checkpoint_id": path.checkpoint_id,
        "checkpoint_type": CHECKPOINT_TYPES[path.kind],
        "time": _iso(rev.created_at),
        "tinker_path": rev.tinker_path,
        "size_bytes": rev.size_bytes,
        "public": False,
        "user_metadata": rev.metadata or None,
        "expires_at": None if rev.expires_at is None else _iso(rev.expires_at),
        "revision": rev.ref,
    }
