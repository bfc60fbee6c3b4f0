"""The same catalog code on PostgreSQL: migrations, the lifecycle, and concurrent writers (row locks
instead of SQLite's database lock). Runs only where a PostgreSQL server (initdb, pg_ctl) and the
psycopg driver are installed; it starts a throwaway cluster on a unix socket, no TCP."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mintd.catalog import models
from mintd.catalog.api import Catalog
from mintd.catalog.db import CatalogDB
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.catalog.types import Gate, NewRevision, Provenance
from tests.catalog.concurrency import run_writers


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = [found] if found else sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(os.path.realpath(candidates[-1])).parent if candidates else None


PG_BIN = _pg_bin()
try:
    import psycopg  # noqa: F401

    HAVE_DRIVER = True
except ImportError:
    HAVE_DRIVER = False

pytestmark = pytest.mark.skipif(
    PG_BIN is None or not (PG_BIN / "initdb").exists() or not HAVE_DRIVER,
    reason="needs a PostgreSQL server (initdb, pg_ctl) and the psycopg driver",
)
PROV = Provenance(base_fingerprint="fp", lora_config={"rank": 4})


def sha(i: object) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    # PostgreSQL refuses to run as root; then the cluster belongs to `nobody`.
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "nobody", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="mintd-pg-"))
    if as_root:
        shutil.chown(root, "nobody")
    data = root / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=60)

    run(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "mintd", "--no-sync")
    options = f"-k {root} -c listen_addresses='' -c fsync=off -p 54329"
    run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://mintd@/postgres?host={root}&port=54329"
    finally:
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


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
