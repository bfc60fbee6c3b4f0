"""The same catalog code on PostgreSQL: migrations, the lifecycle, and concurrent writers (row locks
instead of SQLite's database lock), and replicas starting together on one database. A throwaway cluster
on a unix socket (tests/servers.py); where PostgreSQL is not installed the tests fail saying so."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from mintd.catalog import models
from mintd.catalog.api import Catalog
from mintd.catalog.db import CatalogDB, alembic_config
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.catalog.types import Gate, NewRevision, Provenance
from tests.catalog.concurrency import run_writers

PROV = Provenance(base_fingerprint="fp", lora_config={"rank": 4})


def sha(i: object) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_postgres_migrations_and_lifecycle(pg_url: str) -> None:
    db = CatalogDB(pg_url)
    CatalogDB(pg_url).dispose()  # a second start finds the schema at head
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
    cat = Catalog(db)

    path = "tinker://run-1/sampler_weights/s1"
    r1 = cat.register_revision(
        "alice", "pol", sha(1), "sampler", provenance=PROV, tinker_path=path, ttl_seconds=3600
    )
    r2 = cat.register_revision("alice", "pol", sha(2), "state", provenance=PROV, parents=["pol@1"])
    assert (r1.number, r2.number) == (1, 2)
    assert cat.resolve("alice", path) == cat.resolve("alice", "alice/pol@1") == r1
    assert cat.lineage("alice", "pol@2") == [r1]
    assert cat.register_revisions_bulk("alice", [NewRevision("pol", sha(3), "sampler", PROV)]) == 1

    cat.add_evaluation("alice", "pol@2", "suite", "acc", 0.8)
    cat.promote("alice", "pol", "prod", 1)
    with pytest.raises(CatalogConflict, match="^gate:"):
        cat.promote("alice", "pol", "prod", 2, gate=Gate("suite", "acc", 0.9))
    assert cat.promote("alice", "pol", "prod", 2, gate=Gate("suite", "acc", 0.8)).number == 2
    assert cat.rollback("alice", "pol", "prod").number == 1
    with pytest.raises(CatalogConflict, match="^ref:"):
        cat.delete_revision("alice", "pol:prod")
    cat.delete_revision("alice", "pol@3")
    assert cat.resolve("alice", "pol").number == 2

    with pytest.raises(CatalogNotFound):
        cat.resolve("bob", "alice/pol@1")
    assert cat.list_adapters("bob") == []
    assert [a.name for a in cat.list_adapters("alice", prefix="po")] == ["pol"]
    assert {sha(1), sha(2)} <= cat.referenced_hashes()
    assert [e.action for e in cat.audit("alice", limit=3)] == [
        "revision.delete",
        "alias.rollback",
        "alias.promote",
    ]
    db.dispose()


def test_postgres_concurrent_writers_get_consecutive_numbers(pg_url: str) -> None:
    dbs = [CatalogDB(pg_url) for _ in range(2)]
    cats = [Catalog(d) for d in dbs]

    def writer(k: int) -> list[int]:
        numbers = []
        for i in range(10):
            rev = cats[k % 2].register_revision("carol", "shared", sha((k, i)), "sampler", provenance=PROV)
            cats[k % 2].promote("carol", "shared", "latest", rev.number)
            numbers.append(rev.number)
        return numbers

    numbers = run_writers(6, writer)
    assert sorted(numbers) == list(range(1, 61))
    assert cats[0].get_adapter("carol", "shared").last_number == 60
    for d in dbs:
        d.dispose()


_REPLICA = """
import sys, time
from mintd.catalog.db import CatalogDB
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
CatalogDB(url).dispose()
"""


def _start_together(url: str, count: int) -> list[CatalogDB]:
    """`count` replica processes opening (and so migrating) one database at the same moment; then a
    handle on it for the test."""
    at = time.time() + 3  # past every interpreter's start-up, so they really start together
    procs = [
        subprocess.Popen([sys.executable, "-c", _REPLICA, url, str(at)], stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    assert not failed, failed[0]
    return [CatalogDB(url, migrate=False) for _ in range(count)]


def test_replicas_starting_together_on_an_empty_database_migrate_once(pg_url: str) -> None:
    dbs = _start_together(pg_url, 8)  # before the advisory lock: UniqueViolation on alembic_version
    with dbs[0].engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0003"]
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
    numbers = run_writers(
        8,
        lambda k: [
            Catalog(dbs[k]).register_revision("dave", "pol", sha(("m", k)), "sampler", provenance=PROV).number
        ],
    )
    assert sorted(numbers) == list(range(1, 9))
    for db in dbs:
        db.dispose()


def test_replicas_starting_together_on_an_older_database_upgrade_it_once(pg_url: str) -> None:
    old = CatalogDB(pg_url, migrate=False)
    with old.write() as conn:  # the schema as the previous release left it, with data in it
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with old.engine.connect() as conn:
        assert not inspect(conn).has_table("training_runs")
    before = Catalog(old).register_revision("erin", "pol", sha("old"), "sampler", provenance=PROV)
    old.dispose()
    dbs = _start_together(pg_url, 6)
    with dbs[0].engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0003"
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
    cat = Catalog(dbs[0])
    assert cat.resolve("erin", "pol@1") == before
    assert cat.register_revision("erin", "pol", sha("new"), "sampler", provenance=PROV).number == 2
    for db in dbs:
        db.dispose()
