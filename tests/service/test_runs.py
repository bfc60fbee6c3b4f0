"""Training-run records and replica leases in the catalog database (SQLite here; the two-replica test
runs them on PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import update

from mintd.catalog import CatalogDB
from mintd.catalog.models import Replica
from mintd.service.runs import ReplicaInfo, RunRecords


def records(tmp_path: Path, name: str) -> RunRecords:
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.db'}")
    return RunRecords(db, ReplicaInfo(name, f"http://{name}:8000", lease_s=30))


def test_a_run_held_elsewhere_names_its_replica_until_the_lease_lapses(tmp_path: Path) -> None:
    a, b = records(tmp_path, "a"), records(tmp_path, "b")
    a.write("s-1:train:0", {"owner": "alice", "base_model": "tiny"})
    assert a.elsewhere("s-1:train:0", "alice") is None  # its own run
    assert b.elsewhere("s-1:train:0", "bob") is None  # another owner's run is not even named
    held = b.elsewhere("s-1:train:0", "alice")
    assert held is not None and held.live and (held.replica, held.url) == ("a", "http://a:8000")
    assert "lives on replica a (http://a:8000)" in str(held)

    with a.db.write() as conn:  # replica a stopped beating a minute ago
        conn.execute(update(Replica.__table__).values(heartbeat_at=Replica.heartbeat_at - 60))
    lapsed = b.elsewhere("s-1:train:0", "alice")
    assert lapsed is not None and not lapsed.live and "lease lapsed" in str(lapsed)
    a.heartbeat()
    assert b.elsewhere("s-1:train:0", "alice").live

    a.release("s-1:train:0")  # unloaded: nobody holds it, the record stays for the REST views
    assert b.elsewhere("s-1:train:0", "alice") is None
    assert b.read("s-1:train:0") == {"owner": "alice", "base_model": "tiny"}
    assert b.ids("alice") == ["s-1:train:0"] and b.ids("bob") == []


def test_run_files_of_earlier_versions_are_adopted_once(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "s-old:train:0.json").write_text(json.dumps({"owner": "carol", "base_model": "tiny"}))
    runs = records(tmp_path, "a")
    assert runs.import_folder(folder) == 1
    assert runs.import_folder(folder) == 0
    assert runs.read("s-old:train:0") == {"owner": "carol", "base_model": "tiny"}
    assert runs.elsewhere("s-old:train:0", "carol") is None  # its process is gone; nobody holds it
    assert not list(folder.glob("*.json"))
