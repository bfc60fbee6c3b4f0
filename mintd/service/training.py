"""Training runs behind the Tinker API: creating runs, their ordered ops (forward_backward, optim_step,
saves, loads, distillation steps) and unloading them. A part of `TinkerService` (see service/tinker),
in a file of its own; the run's adapter is always named by its `RunKey`, and residency gives the slot
when the op runs on the base model's worker."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from mintd.catalog import Provenance
from mintd.catalog import validate as catalog_validate
from mintd.catalog.errors import CatalogNotFound
from mintd.engine import distill, train
from mintd.engine.adapters import BASE_SLOT
from mintd.engine.distill import KLDatum, KLGroup, KLOutput
from mintd.engine.engine import Engine
from mintd.engine.optim import AdamParams
from mintd.engine.train import Datum, TrainGroup, TrainOutput
from mintd.lora_config import DeltaMemSpec, LoraSpec
from mintd.residency import Residency, RunKey, SnapshotKey
from mintd.service import provenance
from mintd.service.checkpoints import (
    TinkerPath,
    check_name,
    run_adapter_name,
)
from mintd.service.errors import Gone, NotFound
from mintd.service.futures import Future, RequestError
from mintd.service.provenance import DatumSpans
from mintd.service.scheduler import CallOp, Priority, TrainOp
from mintd.service.sessions import Run, Sampler
from mintd.store.packed import pack, split_state

if TYPE_CHECKING:
    from mintd.service.tinker import BaseModelHandle


class Training:
    """TinkerService's training-run operations (it supplies models, registry, futures, lookups)."""

    def _hold(self, run: Run) -> AbstractContextManager[int]:
        """The run's slot for one op on its worker (restored first if it was parked)."""
        return self.models[run.base_model].worker.residency.hold(RunKey(run.model_id))

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
        delta_mem: DeltaMemSpec | None = None,
    ) -> Future:
        """A run on a fresh adapter: a LoRA of `lora_config`, or a δ-mem adapter (seeded by
        `lora_config`'s seed unless its own is set)."""
        self.session(session_id, owner, live=True)
        handle = self.base(base_model)
        spec = LoraSpec(**lora_config)
        if delta_mem is not None and delta_mem.seed is None:
            delta_mem = delta_mem.model_copy(update={"seed": spec.seed})
        self.registry.check_run_quota(owner)
        model_id = f"{session_id}:train:{model_seq_id}"
        adapter = _adapter_name(user_metadata, model_id)

        def create(engine: Engine) -> dict[str, Any]:
            run = Run(model_id, session_id, owner, handle.name, spec, user_metadata, adapter)
            self._register_run(run, engine.create_adapter(spec, delta_mem))
            return {"model_id": model_id, "type": "create_model"}

        key = ("model", session_id, model_seq_id)
        return self._submit_direct(handle, owner, session_id, key, "CreateModel", create)

    def _register_run(self, run: Run, slot: int) -> None:
        """On the worker, once the run's slot exists: residency takes it (making room on the device),
        then the registry; a session that ended meanwhile gets the slot back."""
        residency = self.models[run.base_model].worker.residency
        residency.add_run(RunKey(run.model_id), slot)
        try:
            self.registry.add_run(run)
        except Exception:
            residency.drop(RunKey(run.model_id))
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
        data: list[Datum],
        spans: list[DatumSpans | None],
        loss_fn: str,
        loss_fn_config: dict[str, Any] | None,
        forward_only: bool,
    ) -> Future:
        """Queue a forward(_backward) of decoded data; its future answers the engine's TrainOutput."""

        def make(run: Run) -> TrainOp:
            handle = self.models[run.base_model]
            config = {k: float(v) for k, v in (loss_fn_config or {}).items() if isinstance(v, (int, float))}
            provenance.apply(loss_fn, data, spans, self.sequences, run.session_id)
            group = TrainGroup(BASE_SLOT, data, loss_fn, config)  # the run's slot when it runs
            train.validate(group, handle.engine.vocab_size, handle.engine.max_len)

            def result(out: TrainOutput) -> TrainOutput:
                if not forward_only:
                    run.loss_fn = loss_fn
                return out

            return TrainOp(RunKey(run.model_id), group, forward_only, result)

        return self._run_op(owner, model_id, seq_id, "Forward" if forward_only else "ForwardBackward", make)

    def optim_step(self, owner: str, model_id: str, seq_id: int, params: dict[str, Any]) -> Future:
        def make(run: Run) -> CallOp:
            hp = dict(params)
            kind = hp.pop("type", "adam")
            if kind not in ("adam", "adamw"):
                raise ValueError(f"optimizer_params.type: {kind!r} is not supported; use adam")
            adam = AdamParams(**hp)

            def step(engine: Engine) -> dict[str, Any]:
                with self._hold(run) as slot:
                    metrics = engine.optim_step(slot, adam)
                run.step, run.optimizer = run.step + 1, {"type": kind, **adam.model_dump()}
                self.training_steps[run.base_model] += 1
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
                return CallOp(lambda _e: self._ephemeral_sampler(run, sampler_id))
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
        with self._hold(run) as slot:
            spec, tensors = engine.export_adapter(slot, with_optimizer=with_optimizer)
            delta_mem = engine.delta_mem_spec(slot)
        weights, optimizer = split_state(tensors)
        data = pack(spec, weights, engine.fingerprint, optimizer if with_optimizer else None, delta_mem)
        metadata = dict(user_metadata or {})
        data_fingerprint = metadata.get("data_fingerprint")
        provenance = Provenance(
            base_fingerprint=engine.fingerprint,
            base_model=run.base_model,
            lora_config=engine.lora_provenance(spec, delta_mem),
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

    def _ephemeral_sampler(self, run: Run, sampler_id: str) -> dict[str, Any]:
        residency = self.models[run.base_model].worker.residency
        snapshot = SnapshotKey(sampler_id)
        residency.add_snapshot(RunKey(run.model_id), snapshot)
        sampler = Sampler(sampler_id, run.owner, run.session_id, run.base_model, None, snapshot)
        try:
            self.registry.add_sampler(sampler)
        except Exception:  # the session ended meanwhile
            residency.drop(snapshot)
            raise
        run.snapshots.append(sampler_id)
        while len(run.snapshots) > self.settings.ephemeral_samplers_per_run:  # the oldest snapshots go
            old_id = run.snapshots.pop(0)
            self.registry.drop_sampler(old_id)
            residency.drop(SnapshotKey(old_id))
        return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    def load_weights(self, owner: str, model_id: str, seq_id: int, path: str, optimizer: bool) -> Future:
        """Legacy load_state: replace a run's adapter (and optionally optimizer) from a revision."""

        def make(run: Run) -> CallOp:
            rev = self.revision(owner, path)

            def load(engine: Engine) -> dict[str, Any]:
                slot = self.checkpoints.load_into(engine, rev, trainable=True, optimizer=optimizer)
                run.spec = engine.slots[slot].spec
                self.models[run.base_model].worker.residency.add_run(RunKey(model_id), slot)  # replaces
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
            run = Run(model_id, session_id, owner, handle.name, spec, user_metadata, adapter)
            run.continue_from(rev)
            self._register_run(run, slot)
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

        def unload(_engine: Engine) -> dict[str, Any]:
            handle.worker.remove_run(model_id)
            forget_run(handle.worker.residency, run)
            self.registry.remove_run(run)
            self.runs.release(model_id)
            return {"model_id": model_id, "type": "unload_model"}

        return self._submit_direct(handle, owner, run.session_id, ("unload", model_id), "UnloadModel", unload)

    def forward_backward_reverse_kl(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        reference_model_path: str,
        data: list[KLDatum],
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
        group = KLGroup(BASE_SLOT, BASE_SLOT, data, temperature)
        distill.validate(group, handle.engine.vocab_size, handle.engine.max_len)

        residency = handle.worker.residency
        if reference is not None:
            residency.prefetch(reference, Priority.TRAINING)

        def step(engine: Engine) -> KLOutput:
            with self._hold(run) as group.slot:
                if reference is None:
                    out = engine.reverse_kl(group)
                else:  # a resident copy, shared with samplers and kept between steps
                    with residency.hold(reference) as group.reference_slot:
                        out = engine.reverse_kl(group)
            run.loss_fn = "reverse_kl"
            return out

        if seq_id is not None:
            return self._run_op(
                owner, model_id, seq_id, "MintForwardBackwardReverseKL", lambda _r: CallOp(step)
            )
        fut, _ = self.futures.create("MintForwardBackwardReverseKL", owner, session_id=run.session_id)
        run.last_request_time = time.time()
        handle.worker.submit_after_run(model_id, fut, CallOp(step))
        return fut


def _raise(exc: Exception) -> None:
    raise exc


def forget_run(residency: Residency, run: Run) -> None:
    """Free a run's adapter (on the device or parked), its optimizer state and its snapshots."""
    residency.drop(RunKey(run.model_id))
    for sampler_id in run.snapshots:
        residency.drop(SnapshotKey(sampler_id))


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
