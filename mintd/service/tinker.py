"""The control plane behind the Tinker API: sessions, training runs, samplers, checkpoints, futures.

It knows names (model ids, sampler ids, tinker:// paths) and turns them into adapter keys; residency
alone maps keys to engine slots, and the engine only ever sees slots. Methods raise ValueError for bad
input (HTTP 400) and NotFound for unknown or foreign objects (HTTP 404, so other owners' objects do
not leak). Engine work is queued on the base model's worker and answered through futures. Sessions
end when finished or idle (`reap`), and what they held in memory is freed.

This module holds the service's construction, lookups, sessions and REST views; the training-run ops
are in `service/training.py`, sampling in `service/sampling.py` (parts of this one class), the OpenAI
side in `service/serving.py`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mintd.catalog import Provenance, Revision
from mintd.catalog import validate as catalog_validate
from mintd.config import ServeSettings
from mintd.engine.engine import Engine
from mintd.residency import Residency
from mintd.service import interpolate
from mintd.service.checkpoints import (
    CHECKPOINT_TYPES,
    Checkpoints,
    TinkerPath,
)
from mintd.service.errors import Gone, NotFound
from mintd.service.evaluation import EvaluationRuns
from mintd.service.futures import Future, FutureStore
from mintd.service.memory import Memories
from mintd.service.provenance import SequenceRecords
from mintd.service.runs import RunElsewhere, RunRecords
from mintd.service.sampling import Sampling
from mintd.service.scheduler import EngineWorker, SchedulerLimits
from mintd.service.sessions import Quotas, Registry, Run, Sampler, Session
from mintd.service.training import Training, forget_run
from mintd.store.packed import PackedAdapter, pack
from mintd.store.peft import load_peft_folder, untar_peft

__all__ = ["Gone", "NotFound", "RunElsewhere", "TinkerService"]
log = logging.getLogger(__name__)


@dataclass
class BaseModelHandle:
    name: str
    model_dir: Path
    engine: Engine
    worker: EngineWorker


class TinkerService(Training, Sampling):
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
            heap_trim_interval_s=settings.heap_trim_interval_s,
            full_gc_interval_s=settings.full_gc_interval_s,
        )
        self.checkpoints = checkpoints
        self.settings = settings
        self.models = {
            name: BaseModelHandle(
                name, e.model_dir, e, EngineWorker(e, futures, limits, name, self._residency(e, name))
            )
            for name, e in models.items()
        }
        self.catalog = checkpoints.catalog
        self.memories = Memories(checkpoints)
        self.runs = runs
        self.futures = futures
        quotas = Quotas(
            settings.max_sessions_per_owner, settings.max_runs_per_owner, settings.max_samplers_per_owner
        )
        self.registry = Registry(quotas)
        self.sequences = SequenceRecords(settings.sequence_ttl_s, settings.max_recorded_sequences)
        self._sample_seq = itertools.count()
        self.evaluations = EvaluationRuns(
            self.catalog,
            futures,
            self.base_of,
            settings.data_dir,
            max_sample_rows=settings.max_sample_rows,
            retention_s=settings.future_retention_s,
            max_running_per_owner=settings.max_eval_runs_per_owner,
        )
        self.training_steps: collections.Counter[str] = collections.Counter()  # per base model, for /metrics
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="mintd-reaper", daemon=True)
        self._reaper.start()

    def _residency(self, engine: Engine, name: str) -> Residency:
        def read(rev: Revision) -> PackedAdapter:  # on the loader thread: fetch, verify, check the base
            return self.checkpoints.read_for(engine, rev, "model_path")

        return Residency(
            engine,
            read,
            int(self.settings.adapter_device_budget),
            int(self.settings.adapter_host_budget),
            name,
            self.settings.run_park_after_s,
        )

    def residency(self) -> dict[str, Any]:
        return {name: h.worker.residency.stats() for name, h in self.models.items()}

    def close(self) -> None:
        self._closed.set()
        self.evaluations.close()
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
                worker.post(lambda _e, w=worker, run=run: forget_run(w.residency, run))
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
