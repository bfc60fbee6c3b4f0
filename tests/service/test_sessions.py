"""The session registry on its own: ownership, quotas, which sessions are due to end, and what an
ended session's ids answer (Gone to their owner, NotFound to anyone else)."""

from __future__ import annotations

import time

import pytest

from mintd.engine.adapters import LoraSpec
from mintd.residency import SnapshotKey
from mintd.service.errors import Gone, NotFound, QuotaExceeded
from mintd.service.sessions import Quotas, Registry, Run, Sampler


def registry(sessions: int = 4, runs: int = 4, samplers: int = 4) -> Registry:
    return Registry(Quotas(sessions, runs, samplers))


def run_in(session_id: str, owner: str, n: int = 0) -> Run:
    return Run(f"{session_id}:train:{n}", session_id, owner, "tiny", LoraSpec(rank=4), {}, "a")


def test_objects_are_their_owners_alone() -> None:
    reg = registry()
    s = reg.create_session("alice", [], {})
    reg.add_run(run_in(s.id, "alice"))
    assert reg.run(f"{s.id}:train:0", "alice").owner == "alice"
    for lookup in (lambda: reg.session(s.id, "bob"), lambda: reg.run(f"{s.id}:train:0", "bob")):
        with pytest.raises(NotFound):
            lookup()
    with pytest.raises(NotFound):  # nor can bob make things in alice's session
        reg.add_run(run_in(s.id, "bob", 1))


def test_quotas_are_per_owner() -> None:
    reg = registry(sessions=2, samplers=1)
    a = [reg.create_session("alice", [], {}) for _ in range(2)]
    with pytest.raises(QuotaExceeded, match="live sessions"):
        reg.create_session("alice", [], {})
    assert reg.create_session("bob", [], {})
    reg.add_sampler(Sampler(f"{a[0].id}:sample:0", "alice", a[0].id, "tiny", None))
    with pytest.raises(QuotaExceeded, match="samplers"):
        reg.add_sampler(Sampler(f"{a[0].id}:sample:1", "alice", a[0].id, "tiny", None))
    snapshot = Sampler(
        f"{a[0].id}:sample:2", "alice", a[0].id, "tiny", None, SnapshotKey(f"{a[0].id}:sample:2")
    )
    assert reg.add_sampler(snapshot) is snapshot  # a run's snapshots count against the run, not here


def test_what_ends_or_is_dropped_frees_its_quota() -> None:
    reg = registry(sessions=1, runs=1, samplers=1)
    s = reg.create_session("alice", [], {})
    reg.add_run(run := run_in(s.id, "alice"))
    reg.add_sampler(Sampler(f"{s.id}:sample:0", "alice", s.id, "tiny", None))
    reg.drop_sampler(f"{s.id}:sample:0")
    reg.add_sampler(Sampler(f"{s.id}:sample:1", "alice", s.id, "tiny", None))  # the dropped one's room
    reg.remove_run(run)
    reg.add_run(run_in(s.id, "alice", 1))
    reg.end(s, "finished")
    t = reg.create_session("alice", [], {})  # the ended session held the only room, and its run and sampler
    reg.add_run(run_in(t.id, "alice"))
    reg.add_sampler(Sampler(f"{t.id}:sample:0", "alice", t.id, "tiny", None))
    with pytest.raises(QuotaExceeded):
        reg.add_sampler(Sampler(f"{t.id}:sample:1", "alice", t.id, "tiny", None))


def test_due_sessions_are_finished_or_idle_and_never_busy() -> None:
    reg = registry()
    idle, finished, busy, fresh = (reg.create_session("alice", [], {}) for _ in range(4))
    finished.finished = "success"
    idle.last_seen = busy.last_seen = time.monotonic() - 100
    due = {s.id: why for s, why in reg.due(idle_timeout_s=50, busy={busy.id})}
    assert due == {idle.id: "idle for more than 50s", finished.id: "finished (success)"}
    assert fresh.id not in due


def test_an_ended_sessions_ids_are_gone_to_their_owner_only() -> None:
    reg = registry()
    s = reg.create_session("alice", [], {})
    run = run_in(s.id, "alice")
    reg.add_run(run)
    ended = reg.end(s, "idle for more than 900s")
    assert ended.runs == [run]
    for lookup in (lambda: reg.session(s.id, "alice"), lambda: reg.run(run.model_id, "alice")):
        with pytest.raises(Gone, match="idle for more than 900s"):
            lookup()
    with pytest.raises(NotFound):
        reg.run(run.model_id, "bob")
    with pytest.raises(Gone):  # a run whose creation was in flight when the session ended
        reg.add_run(run_in(s.id, "alice", 1))
