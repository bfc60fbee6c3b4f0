"""Who holds what: sessions and the training runs and samplers made in them, bound to their owner.

Every lookup takes the caller's owner; another owner's object is NotFound, worded like a missing one.
Session ids carry 128 random bits, and run and sampler ids start with their session's id, so none can
be guessed. Each owner may hold a bounded number of live sessions, runs and samplers (`QuotaExceeded`).

A session ends when its client finishes it or stops showing signs of life (no heartbeat and no request
for `session_idle_timeout_s`). The service then frees what the session held in memory and the registry
keeps a tombstone, so its ids answer `Gone` (HTTP 410, which also stops the SDK's heartbeat loop)
rather than a puzzling 404. Saved checkpoints are catalog revisions and are not affected.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from mintd.catalog import Revision
from mintd.lora_config import LoraSpec
from mintd.residency import SnapshotKey
from mintd.service.errors import Gone, NotFound, QuotaExceeded

Owned = TypeVar("Owned", "Session", "Run", "Sampler")
TOMBSTONES = 100_000  # ended sessions remembered for a clear 410; beyond this the oldest answer 404


@dataclass
class Session:
    id: str
    owner: str
    tags: list[str]
    user_metadata: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)  # heartbeat or any request naming it
    finished: str | None = None
    run_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)


@dataclass
class Run:
    model_id: str
    session_id: str
    owner: str
    base_model: str
    spec: LoraSpec
    user_metadata: dict[str, Any]
    adapter: str  # the catalog adapter its saves become revisions of
    snapshots: list[str] = field(default_factory=list)  # its sampling snapshots' sampler ids, oldest first
    last_request_time: float = field(default_factory=time.time)
    # provenance, kept current by the ops as the worker runs them (so a save sees exactly its past)
    step: int = 0
    loss_fn: str | None = None
    optimizer: dict[str, Any] | None = None
    parent: str | None = None  # ref of the revision this adapter last came from (saved or loaded)

    def continue_from(self, rev: Revision) -> None:
        p = rev.provenance
        self.step, self.loss_fn, self.optimizer, self.parent = p.step or 0, p.loss_fn, p.optimizer, rev.ref


@dataclass
class Sampler:
    id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str | None
    # what it samples: the base (None), the revision model_path resolved to when the sampler was made,
    # or a training run's snapshot (which the run owns and frees)
    adapter: Revision | SnapshotKey | None = None
    instance: str | None = None  # a δ-mem instance its samples read and write (`#user=` in model_path)

    @property
    def ephemeral(self) -> bool:
        return isinstance(self.adapter, SnapshotKey)


@dataclass(frozen=True)
class Quotas:
    sessions: int
    runs: int
    samplers: int


@dataclass
class Ended:
    session: Session
    runs: list[Run]
    samplers: list[Sampler]


class Registry:
    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._runs: dict[str, Run] = {}
        self._samplers: dict[str, Sampler] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # session id -> (owner, why)
        # what each owner holds, against its quotas: kept with the tables, so a check never scans them
        # (a busy server holds tens of thousands of samplers, and every new one is checked)
        self._held: dict[type, Counter[str]] = {Session: Counter(), Run: Counter(), Sampler: Counter()}

    # sessions -----------------------------------------------------------------------------------

    def create_session(self, owner: str, tags: list[str], user_metadata: dict[str, Any]) -> Session:
        with self._lock:
            advice = "finish some (ServiceClient.close) or wait for idle ones to be closed"
            live = self._held[Session][owner]
            _within_quota(live, self.quotas.sessions, "session", owner, "sessions", advice)
            session = Session(f"s-{secrets.token_hex(16)}", owner, tags, user_metadata)
            self._put(self._sessions, session.id, session)
            return session

    def session(self, session_id: str, owner: str, live: bool = False) -> Session:
        with self._lock:
            s = self._owned(self._sessions, session_id, owner, f"session {session_id}")
            s.last_seen = time.monotonic()
        if live and s.finished:
            raise ValueError(f"session_id: session {session_id} is finished ({s.finished})")
        return s

    def touch(self, session_id: str | None) -> None:
        with self._lock:
            s = self._sessions.get(session_id or "")
            if s is not None:
                s.last_seen = time.monotonic()

    def owner_sessions(self, owner: str) -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if s.owner == owner]

    # runs and samplers --------------------------------------------------------------------------

    def run(self, model_id: str, owner: str) -> Run:
        with self._lock:
            r = self._owned(self._runs, model_id, owner, f"model_id: training run {model_id}")
            self.touch(r.session_id)
            return r

    def live_run(self, model_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(model_id)

    def sampler(self, sampler_id: str, owner: str) -> Sampler:
        with self._lock:
            s = self._owned(self._samplers, sampler_id, owner, f"sampling_session_id: sampler {sampler_id}")
            self.touch(s.session_id)
            return s

    def check_run_quota(self, owner: str) -> None:
        with self._lock:
            held = self._held[Run][owner]
        advice = "unload some (unload_model) or finish their sessions"
        _within_quota(held, self.quotas.runs, "model", owner, "training runs", advice)

    def add_run(self, run: Run) -> None:
        """Register a run made in a live session (Gone if the session ended while it was being made)."""
        with self._lock:
            session = self._owned(self._sessions, run.session_id, run.owner, f"session {run.session_id}")
            self._put(self._runs, run.model_id, run)
            session.run_ids.append(run.model_id)

    def remove_run(self, run: Run) -> list[str]:
        """Forget a run and its snapshot samplers; their ids."""
        with self._lock:
            self._pop(self._runs, run.model_id)
            for sampler_id in run.snapshots:
                self._pop(self._samplers, sampler_id)
            return list(run.snapshots)

    def add_sampler(self, sampler: Sampler) -> Sampler:
        """Register `sampler`, or return the one already made under its id (a retried request)."""
        with self._lock:
            existing = self._samplers.get(sampler.id)
            if existing is not None:
                return existing
            if not sampler.ephemeral:
                who = sampler.owner
                advice = "finish sessions that no longer sample"
                held = self._held[Sampler][who]
                _within_quota(held, self.quotas.samplers, "sampling_session", who, "samplers", advice)
            session = self._owned(
                self._sessions, sampler.session_id, sampler.owner, f"session {sampler.session_id}"
            )
            self._put(self._samplers, sampler.id, sampler)
            session.sampler_ids.append(sampler.id)
            return sampler

    def drop_sampler(self, sampler_id: str) -> None:
        with self._lock:
            self._pop(self._samplers, sampler_id)

    # ending sessions ----------------------------------------------------------------------------

    def due(self, idle_timeout_s: float, busy: set[str]) -> list[tuple[Session, str]]:
        """Sessions to end now, with why: finished, or idle past the timeout (never with work in flight)."""
        cutoff = time.monotonic() - idle_timeout_s
        with self._lock:
            return [
                (s, f"finished ({s.finished})" if s.finished else f"idle for more than {idle_timeout_s:g}s")
                for s in self._sessions.values()
                if s.id not in busy and (s.finished or s.last_seen < cutoff)
            ]

    def end(self, session: Session, why: str) -> Ended:
        """Forget `session` and everything made in it (lookups answer Gone from now on); what it held,
        for the caller to free."""
        with self._lock:
            self._pop(self._sessions, session.id)
            runs = [r for rid in session.run_ids if (r := self._pop(self._runs, rid)) is not None]
            samplers = [s for sid in session.sampler_ids if (s := self._pop(self._samplers, sid)) is not None]
            for run in runs:  # snapshots of these runs taken from other sessions' clients go too
                for sampler_id in run.snapshots:
                    self._pop(self._samplers, sampler_id)
            self._ended[session.id] = (session.owner, why)
            while len(self._ended) > TOMBSTONES:
                self._ended.popitem(last=False)
        return Ended(session, runs, samplers)

    def _put(self, table: dict[str, Owned], object_id: str, obj: Owned) -> None:
        """Add to a table, counting it against its owner's quota (call with the lock held)."""
        table[object_id] = obj
        if _counts(obj):
            self._held[type(obj)][obj.owner] += 1

    def _pop(self, table: dict[str, Owned], object_id: str) -> Owned | None:
        """Remove from a table, if there, and from its owner's count (call with the lock held)."""
        obj = table.pop(object_id, None)
        if obj is not None and _counts(obj):
            held = self._held[type(obj)]
            held[obj.owner] -= 1
            if not held[obj.owner]:
                del held[obj.owner]
        return obj

    def _owned(self, table: dict[str, Owned], object_id: str, owner: str, what: str) -> Owned:
        """`table[object_id]` if `owner` holds it (call with the lock held); else Gone or NotFound."""
        found = table.get(object_id)
        if found is None or found.owner != owner:
            self._raise_missing(object_id, owner, what)
        return found

    def _raise_missing(self, object_id: str, owner: str, what: str) -> NoReturn:
        session_id = object_id.split(":", 1)[0]
        ended = self._ended.get(session_id)
        if ended is not None and ended[0] == owner:
            raise Gone(
                f"{what} is gone: its session {session_id} was closed ({ended[1]}); unsaved training state "
                "was discarded, saved checkpoints remain. Create a new client to continue"
            )
        raise NotFound(f"{what} not found")


def _counts(obj: Session | Run | Sampler) -> bool:
    """Whether it counts against a quota: all do but a run's snapshot samplers, which the run owns."""
    return not (isinstance(obj, Sampler) and obj.ephemeral)


def _within_quota(held: int, limit: int, field: str, owner: str, what: str, advice: str) -> None:
    if held >= limit:
        raise QuotaExceeded(f"{field}: {owner} already holds {held} live {what}, the most allowed; {advice}")
