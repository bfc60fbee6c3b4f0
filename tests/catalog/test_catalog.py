"""Catalog behaviour on SQLite: naming, numbering, aliases, deletion, TTL, tenancy, input errors, audit,
migrations, concurrency. (PostgreSQL: test_postgres.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.orm import Session

from mintd.catalog import models, writes
from mintd.catalog.api import Catalog
from mintd.catalog.db import CatalogDB
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.catalog.types import Gate, NewRevision, Provenance
from mintd.config import CatalogSettings
from tests.catalog.concurrency import run_writers

T0 = 1_800_000_000.0
PROV = Provenance(base_fingerprint="base-fp", lora_config={"rank": 8}, training_run_id="run-1", step=10)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def sha(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path):
    database = CatalogDB(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield database
    database.dispose()


@pytest.fixture
def cat(db: CatalogDB, clock: Clock) -> Catalog:
    return Catalog(db, clock=clock)


def save(cat: Catalog, owner: str, adapter: str, i: int, **kw) -> object:
    kw.setdefault("provenance", PROV)
    return cat.register_revision(
        owner, adapter, sha(f"{owner}/{adapter}/{i}"), kw.pop("kind", "sampler"), **kw
    )


@pytest.fixture
def alice(cat: Catalog) -> Catalog:
    """alice/pol with revisions 1 (sampler, tinker path) and 2 (state, parent 1), alias prod -> 1,
    one evaluation of 2."""
    save(cat, "alice", "pol", 1, tinker_path="tinker://run-a/sampler_weights/s1")
    save(cat, "alice", "pol", 2, kind="state", parents=["pol@1"], tinker_path="tinker://run-a/weights/w2")
    cat.promote("alice", "pol", "prod", 1)
    cat.add_evaluation("alice", "pol@2", "gsm8k", "acc", 0.7)
    return cat


# names --------------------------------------------------------------------------------------------------


def test_every_ref_form_names_the_same_revision(alice: Catalog) -> None:
    refs = [
        "pol@1",
        "pol:prod",
        "alice/pol:prod",
        "alice/pol@1",
        "tinker://run-a/sampler_weights/s1",
        "tinker://adapters/pol:prod",  # the catalog's refs, spelled for SDKs that insist on tinker://
        "tinker://adapters/alice/pol@1",
    ]
    rev, *others = [alice.resolve("alice", ref) for ref in refs]
    assert all(other == rev for other in others)
    assert (rev.ref, rev.kind, rev.content_hash) == ("alice/pol@1", "sampler", sha("alice/pol/1"))
    assert rev.provenance == dataclasses.replace(PROV, created_by="alice")
    # `name` alone is the newest live revision; so is owner/name
    assert (
        alice.resolve("alice", "pol")
        == alice.resolve("alice", "alice/pol")
        == alice.resolve("alice", "pol@2")
    )
    assert alice.resolve("alice", "tinker://run-a/weights/w2").number == 2
    assert alice.resolve("alice", "tinker://adapters/pol").number == 2
    for bad in [
        "tinker://adapters/",
        "tinker://adapters/tinker://run-a/weights/w2",
        "tinker://adapters/alice/b/c",
    ]:
        with pytest.raises(ValueError, match="is not a ref"):
            alice.resolve("alice", bad)
    with pytest.raises(CatalogNotFound):
        alice.resolve("alice", "tinker://adapters/bob/pol@1")


def test_numbers_are_consecutive_per_adapter(cat: Catalog) -> None:
    order = ["a", "b", "a", "a", "b", "c", "a"]
    numbers = [save(cat, "alice", name, i).number for i, name in enumerate(order)]
    assert numbers == [1, 1, 2, 3, 2, 1, 4]
    assert {a.name: a.last_number for a in cat.list_adapters("alice")} == {"a": 4, "b": 2, "c": 1}
    assert [r.number for r in cat.log("alice", "a")] == [4, 3, 2, 1]


def test_results_are_frozen_copies(alice: Catalog) -> None:
    rev = alice.resolve("alice", "pol@1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rev.number = 5  # type: ignore[misc]
    rev.provenance.lora_config["rank"] = 999  # a copy: the catalog is untouched
    assert alice.resolve("alice", "pol@1").provenance.lora_config == {"rank": 8}


def test_list_show_log_lineage(cat: Catalog) -> None:
    for name in ["pol-a", "pol-b", "other", "pol-c"]:
        cat.get_or_create_adapter("alice", name, metadata={"team": "rl"})
    assert [a.name for a in cat.list_adapters("alice", prefix="pol-")] == ["pol-a", "pol-b", "pol-c"]
    assert [a.name for a in cat.list_adapters("alice", limit=2, offset=1)] == ["pol-a", "pol-b"]
    assert [a.name for a in cat.list_adapters("alice", after="pol-a")] == ["pol-b", "pol-c"]
    assert cat.get_adapter("alice", "pol-a").metadata == {"team": "rl"}
    with pytest.raises(CatalogConflict, match="^name:"):
        cat.create_adapter("alice", "pol-a")

    # lineage: 4 <- (3, 2), 3 <- 1, 2 <- 1; breadth-first, nearest first, each ancestor once
    for i in range(1, 5):
        parents = {1: [], 2: ["pol-a@1"], 3: ["pol-a@1"], 4: ["pol-a@3", "pol-a@2"]}[i]
        save(cat, "alice", "pol-a", i, parents=parents)
    assert [r.number for r in cat.lineage("alice", "pol-a@4")] == [3, 2, 1]
    assert cat.lineage("alice", "pol-a@1") == []
    cat.delete_revision("alice", "pol-a@1")  # lineage is history: deleted ancestors stay visible
    assert [(r.number, r.deleted_at is not None) for r in cat.lineage("alice", "pol-a@2")] == [(1, True)]

    cat.promote("alice", "pol-a", "prod", 3)
    view = cat.show("alice", "pol-a")
    assert [r.number for r in view.revisions] == [4, 3, 2]
    assert [(a.name, a.number) for a in view.aliases] == [("prod", 3)]
    assert [r.number for r in cat.log("alice", "pol-a", limit=1, before=4)] == [3]


# aliases ------------------------------------------------------------------------------------------------


def test_gate_refuses_below_threshold_and_allows_at_or_above(alice: Catalog) -> None:
    gate = Gate("gsm8k", "acc", 0.75)
    with pytest.raises(CatalogConflict, match=r"^gate: .*best is 0\.7"):
        alice.promote("alice", "pol", "prod", 2, gate=gate)
    with pytest.raises(CatalogConflict, match="^gate: .*no such evaluation"):
        alice.promote("alice", "pol", "prod", 2, gate=Gate("gsm8k", "f1", 0.0))
    assert alice.resolve("alice", "pol:prod").number == 1  # refusals moved nothing

    alice.add_evaluation("alice", "pol@2", "gsm8k", "acc", 0.75)
    assert alice.promote("alice", "pol", "prod", "@2", gate=gate).number == 2  # exactly at threshold
    alice.add_evaluation("alice", "pol@1", "gsm8k", "acc", 0.9)
    assert alice.promote("alice", "pol", "prod", "pol@1", gate=gate).number == 1  # above


def test_rollback_walks_back_through_promotions(cat: Catalog) -> None:
    for i in range(1, 4):
        save(cat, "alice", "pol", i)
    for n in (1, 2, 3):
        cat.promote("alice", "pol", "prod", n)
    assert cat.rollback("alice", "pol", "prod").number == 2
    assert cat.rollback("alice", "pol", "prod").number == 1
    with pytest.raises(CatalogConflict, match="^alias: .*no earlier target"):
        cat.rollback("alice", "pol", "prod")
    assert cat.resolve("alice", "pol:prod").number == 1

    cat.promote("alice", "pol", "prod", 3)  # a promote after rollbacks is undone first
    assert cat.rollback("alice", "pol", "prod").number == 1
    assert cat.promote("alice", "pol", "canary", 2).number == 2
    with pytest.raises(CatalogConflict, match="^alias:"):  # created, never moved: no history
        cat.rollback("alice", "pol", "canary")
    with pytest.raises(CatalogNotFound, match="^alias:"):
        cat.rollback("alice", "pol", "nope")


def test_rollback_refuses_a_deleted_previous_target(cat: Catalog) -> None:
    save(cat, "alice", "pol", 1)
    save(cat, "alice", "pol", 2)
    cat.promote("alice", "pol", "prod", 1)
    cat.promote("alice", "pol", "prod", 2)
    cat.delete_revision("alice", "pol@1")
    with pytest.raises(CatalogConflict, match="^alias: cannot roll back .*was deleted"):
        cat.rollback("alice", "pol", "prod")


def test_promote_checks_target_and_ignores_no_op(alice: Catalog) -> None:
    save(alice, "alice", "other", 1)
    with pytest.raises(ValueError, match="^ref: .*not a revision of adapter 'pol'"):
        alice.promote("alice", "pol", "prod", "other@1")
    before = len(alice.audit("alice", limit=1000))
    assert alice.promote("alice", "pol", "prod", 1).number == 1
    assert len(alice.audit("alice", limit=1000)) == before


# deletion and TTL ---------------------------------------------------------------------------------------


def test_aliased_revision_cannot_be_deleted(alice: Catalog) -> None:
    with pytest.raises(CatalogConflict, match="^ref: alice/pol@1 is the target of alias.*prod"):
        alice.delete_revision("alice", "pol:prod")
    alice.promote("alice", "pol", "prod", 2)
    gone = alice.delete_revision("alice", "pol@1")
    assert gone.deleted_at is not None
    for ref in ("pol@1", "tinker://run-a/sampler_weights/s1"):
        with pytest.raises(CatalogNotFound, match="was deleted"):
            alice.resolve("alice", ref)
    assert alice.referenced_hashes([sha("alice/pol/1"), sha("alice/pol/2")]) == {sha("alice/pol/2")}
    assert sha("alice/pol/1") not in alice.referenced_hashes()
    assert save(alice, "alice", "pol", 3).number == 3  # numbers are never reused


def test_ttl_bounds_and_expiry(cat: Catalog, clock: Clock) -> None:
    for bad in (3599, 10 * 365 * 24 * 3600 + 1, 0, -1, 1.5, True, "3600"):
        with pytest.raises(ValueError, match="^ttl_seconds:"):
            save(cat, "alice", "pol", 0, ttl_seconds=bad)
    save(cat, "alice", "pol", 1)
    rev = save(cat, "alice", "pol", 2, ttl_seconds=3600, tinker_path="tinker://r/sampler_weights/x")
    assert rev.expires_at == T0 + 3600
    save(cat, "alice", "pol", 3, ttl_seconds=7200)
    cat.set_ttl("alice", "pol@3", None)  # never expires now
    cat.promote("alice", "pol", "prod", 2)

    clock.now += 3601
    for ref in ("pol@2", "pol:prod", "tinker://r/sampler_weights/x"):
        with pytest.raises(CatalogNotFound, match="has expired"):
            cat.resolve("alice", ref)
    assert cat.resolve("alice", "pol").number == 3
    clock.now += 3600
    assert cat.resolve("alice", "pol@3").expires_at is None
    with pytest.raises(CatalogNotFound):
        cat.set_ttl("alice", "pol@2", 7200)  # expired is gone for good
    with pytest.raises(CatalogNotFound):
        cat.promote("alice", "pol", "canary", 2)

    # the sweep tombstones expired revisions no alias holds; prod still holds #2 (unresolvable)
    save(cat, "alice", "pol", 4, ttl_seconds=3600)
    clock.now += 3601
    assert cat.expire() == 1
    assert cat.expire() == 0
    assert [e.subject for e in cat.audit("alice", limit=1) if e.action == "revision.expire"] == [
        "alice/pol@4"
    ]
    assert sha("alice/pol/4") not in cat.referenced_hashes()
    assert sha("alice/pol/2") in cat.referenced_hashes()


def test_tinker_path_overwrite(cat: Catalog) -> None:
    path = "tinker://run/weights/ckpt"
    save(cat, "alice", "pol", 1, kind="state", tinker_path=path)
    with pytest.raises(CatalogConflict, match="^tinker_path: .*already exists"):
        save(cat, "alice", "pol", 2, kind="state", tinker_path=path)
    save(cat, "alice", "pol", 2, kind="state", tinker_path=path, overwrite=True)
    assert cat.resolve("alice", path).number == 2
    assert cat.resolve("alice", "pol@1").tinker_path == path  # the old one stays addressable
    # another owner's identical path neither conflicts nor resolves across
    save(cat, "bob", "pol", 1, kind="state", tinker_path=path)
    assert cat.resolve("bob", path).owner == "bob"
    assert cat.resolve("alice", path).owner == "alice"


# tenancy ------------------------------------------------------------------------------------------------


def test_another_owner_sees_nothing(alice: Catalog) -> None:
    foreign = [
        lambda: alice.get_adapter("bob", "pol"),
        lambda: alice.show("bob", "pol"),
        lambda: alice.log("bob", "pol"),
        lambda: alice.lineage("bob", "pol@2"),
        lambda: alice.evaluations("bob", "pol@2"),
        lambda: alice.add_evaluation("bob", "pol@2", "s", "m", 1.0),
        lambda: alice.promote("bob", "pol", "prod", 2),
        lambda: alice.rollback("bob", "pol", "prod"),
        lambda: alice.delete_revision("bob", "pol@1"),
        lambda: alice.set_ttl("bob", "pol@1", 3600),
        lambda: alice.audit("bob", adapter="pol"),
        lambda: save(alice, "bob", "mine", 1, parents=["alice/pol@1"]),
    ]
    refs = [
        "pol",
        "pol@1",
        "pol:prod",
        "alice/pol@1",
        "alice/pol:prod",
        "alice/pol",
        "tinker://run-a/weights/w2",
    ]
    foreign += [lambda ref=ref: alice.resolve("bob", ref) for ref in refs]
    for call in foreign:
        with pytest.raises(CatalogNotFound):
            call()
    # worded exactly as for a name that exists nowhere
    for ref in refs:
        with pytest.raises(CatalogNotFound) as exc:
            alice.resolve("bob", ref)
        assert str(exc.value) == f"ref: {ref!r} not found"
    assert alice.list_adapters("bob") == []
    assert alice.audit("bob") == []

    # bob's own "pol" is a different adapter; each owner resolves only their own
    save(alice, "bob", "pol", 1)
    assert alice.resolve("bob", "pol").owner == "bob"
    assert alice.resolve("alice", "pol").number == 2
    assert {e.subject.split("/")[0] for e in alice.audit("bob", limit=1000)} == {"bob"}
    assert all(e.subject.startswith("alice") for e in alice.audit("alice", limit=1000))
    with pytest.raises(CatalogNotFound):
        alice.resolve("bob", "pol@2")
    with pytest.raises(CatalogNotFound):
        alice.promote("bob", "pol", "prod", "alice/pol@1")
    assert alice.referenced_hashes([sha("alice/pol/1")]) == {sha("alice/pol/1")}  # system-wide by design


# input errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("owner", lambda c: c.resolve("a/b", "pol")),
        ("owner", lambda c: c.list_adapters("")),
        ("ref", lambda c: c.resolve("alice", "pol@0")),
        ("ref", lambda c: c.resolve("alice", "pol@x")),
        ("ref", lambda c: c.resolve("alice", "po l")),
        ("ref", lambda c: c.resolve("alice", "")),
        ("ref", lambda c: c.resolve("alice", "tinker://run/bogus/x")),
        ("ref", lambda c: c.resolve("alice", "tinker://run/weights")),
        ("content_hash", lambda c: c.register_revision("alice", "p", "ABC", "sampler", provenance=PROV)),
        ("kind", lambda c: c.register_revision("alice", "p", sha(1), "merged", provenance=PROV)),
        ("adapter", lambda c: c.register_revision("alice", "-p", sha(1), "sampler", provenance=PROV)),
        (
            "provenance.base_fingerprint",
            lambda c: c.register_revision("alice", "p", sha(1), "sampler", provenance=Provenance("")),
        ),
        (
            "provenance.step",
            lambda c: c.register_revision(
                "alice", "p", sha(1), "sampler", provenance=Provenance("f", step=-1)
            ),
        ),
        (
            "provenance.lora_config",
            lambda c: c.register_revision(
                "alice", "p", sha(1), "sampler", provenance=Provenance("f", lora_config={"x": math.nan})
            ),
        ),
        (
            "metadata",
            lambda c: c.register_revision("alice", "p", sha(1), "state", provenance=PROV, metadata=[1]),
        ),
        (
            "metadata",
            lambda c: c.register_revision(
                "alice", "p", sha(1), "state", provenance=PROV, metadata={"x": "y" * 70_000}
            ),
        ),
        (
            "size_bytes",
            lambda c: c.register_revision("alice", "p", sha(1), "state", provenance=PROV, size_bytes=-1),
        ),
        (
            "tinker_path",
            lambda c: c.register_revision(
                "alice", "p", sha(1), "state", provenance=PROV, tinker_path="tinker://r/sampler_weights/x"
            ),
        ),
        (
            "tinker_path",
            lambda c: c.register_revision(
                "alice", "p", sha(1), "state", provenance=PROV, tinker_path="s3://x"
            ),
        ),
        (
            "parents[0]",
            lambda c: c.register_revision("alice", "p", sha(1), "state", provenance=PROV, parents=["@"]),
        ),
        ("rows[1].content_hash", lambda c: c.register_revisions_bulk("alice", [_new(1), _new(2, hash="x")])),
        ("batch_size", lambda c: c.register_revisions_bulk("alice", [], batch_size=0)),
        ("alias", lambda c: c.promote("alice", "pol", "pr od", 1)),
        ("gate.threshold", lambda c: c.promote("alice", "pol", "prod", 1, gate=Gate("s", "m", math.inf))),
        ("gate", lambda c: c.promote("alice", "pol", "prod", 1, gate=("s", "m", 0.5))),
        ("value", lambda c: c.add_evaluation("alice", "pol@1", "s", "m", math.nan)),
        ("value", lambda c: c.add_evaluation("alice", "pol@1", "s", "m", "0.5")),
        ("suite", lambda c: c.add_evaluation("alice", "pol@1", "", "m", 0.5)),
        ("limit", lambda c: c.list_adapters("alice", limit=0)),
        ("offset", lambda c: c.list_adapters("alice", offset=-1)),
        ("prefix", lambda c: c.list_adapters("alice", prefix="a/b")),
        ("before", lambda c: c.log("alice", "pol", before=-1)),
        ("actor", lambda c: c.ensure_owner("alice", actor="")),
        ("name", lambda c: c.create_adapter("alice", "x" * 129)),
    ],
)
def test_bad_input_names_the_field(alice: Catalog, field: str, call) -> None:
    audit_before = alice.audit("alice", limit=1000)
    with pytest.raises(ValueError) as exc:
        call(alice)
    assert str(exc.value).startswith(f"{field}:"), str(exc.value)
    assert not isinstance(exc.value, CatalogConflict)
    assert alice.audit("alice", limit=1000) == audit_before  # nothing was written


def _new(i: int, hash: str | None = None, **kw) -> NewRevision:
    return NewRevision(
        adapter=kw.pop("adapter", "bulk"), content_hash=hash or sha(i), kind="sampler", provenance=PROV, **kw
    )


# audit --------------------------------------------------------------------------------------------------


def test_every_mutation_is_audited_in_its_transaction(cat: Catalog, clock: Clock) -> None:
    cat.ensure_owner("alice")
    cat.create_adapter("alice", "pol", actor="ci-bot")
    save(cat, "alice", "pol", 1)
    save(cat, "alice", "pol", 2, parents=["pol@1"])
    cat.add_evaluation("alice", "pol@2", "s", "m", 1.0, evaluator="harness")
    cat.promote("alice", "pol", "prod", 1)
    cat.promote("alice", "pol", "prod", 2, gate=Gate("s", "m", 0.5))
    cat.rollback("alice", "pol", "prod")
    cat.set_ttl("alice", "pol@2", 3600)
    cat.delete_revision("alice", "pol@2")
    cat.register_revisions_bulk("alice", [_new(1, adapter="pol"), _new(2, adapter="new")])
    save(cat, "alice", "pol", 9, ttl_seconds=3600)
    clock.now += 4000
    cat.expire()
    entries = cat.audit("alice", limit=100)[::-1]
    assert [(e.action, e.subject) for e in entries] == [
        ("owner.create", "alice"),
        ("adapter.create", "alice/pol"),
        ("revision.register", "alice/pol@1"),
        ("revision.register", "alice/pol@2"),
        ("evaluation.add", "alice/pol@2"),
        ("alias.promote", "alice/pol:prod"),
        ("alias.promote", "alice/pol:prod"),
        ("alias.rollback", "alice/pol:prod"),
        ("revision.set_ttl", "alice/pol@2"),
        ("revision.delete", "alice/pol@2"),
        ("adapter.create", "alice/new"),
        ("revision.register", "alice/pol@3"),
        ("revision.register", "alice/new@1"),
        ("revision.register", "alice/pol@4"),
        ("revision.expire", "alice/pol@4"),
    ]
    assert entries[1].actor == "ci-bot" and entries[-1].actor == "mintd:ttl"
    assert entries[3].details["parents"] == ["alice/pol@1"]
    assert entries[6].details == {
        "from": "alice/pol@1",
        "to": "alice/pol@2",
        "gate": {"suite": "s", "metric": "m", "threshold": 0.5},
    }
    assert entries[7].details == {"from": "alice/pol@2", "to": "alice/pol@1"}
    assert [e.action for e in cat.audit("alice", adapter="new")] == ["revision.register", "adapter.create"]
    newest = cat.audit("alice", limit=2)
    assert cat.audit("alice", limit=1, before=newest[0].id) == newest[1:]

    # a refused mutation leaves no trace
    count = len(cat.audit("alice", limit=1000))
    with pytest.raises(CatalogConflict):
        cat.delete_revision("alice", "pol:prod")
    assert len(cat.audit("alice", limit=1000)) == count


def test_revisions_are_immutable_and_the_audit_log_append_only(alice: Catalog, db: CatalogDB) -> None:
    with Session(db.engine) as session:
        rev = session.scalars(select(models.Revision).where(models.Revision.number == 1)).first()
        rev.content_hash = sha("evil")
        with pytest.raises(PermissionError, match="immutable"):
            session.flush()
        session.rollback()
        entry = session.scalars(select(models.AuditLog)).first()
        session.delete(entry)
        with pytest.raises(PermissionError, match="append-only"):
            session.flush()
    with db.write() as conn, pytest.raises(PermissionError, match="immutable"):
        writes.update_lifecycle(conn, [1], content_hash=sha("evil"))
    assert alice.resolve("alice", "pol@1").content_hash == sha("alice/pol/1")


# bulk ---------------------------------------------------------------------------------------------------


def test_bulk_numbers_after_existing_and_checks_like_single(alice: Catalog) -> None:
    rows = [_new(i, adapter=["pol", "fresh"][i % 2], parents=("pol@1",) if i == 0 else ()) for i in range(7)]
    assert alice.register_revisions_bulk("alice", rows, batch_size=3) == 7
    assert [r.number for r in alice.log("alice", "pol")] == [6, 5, 4, 3, 2, 1]
    assert [r.number for r in alice.log("alice", "fresh")] == [3, 2, 1]
    assert [r.ref for r in alice.lineage("alice", "pol@3")] == ["alice/pol@1"]
    taken = _new(9, tinker_path="tinker://run-a/sampler_weights/s1")
    with pytest.raises(CatalogConflict, match="^tinker_path:"):
        alice.register_revisions_bulk("alice", [taken])
    twice = [_new(i, tinker_path="tinker://x/sampler_weights/y") for i in range(2)]
    with pytest.raises(ValueError, match="^tinker_path: .*twice"):
        alice.register_revisions_bulk("alice", twice)
    with pytest.raises(CatalogNotFound, match=r"^parents\[0\]"):
        alice.register_revisions_bulk("alice", [_new(1, parents=("nope@1",))])
    with pytest.raises(CatalogNotFound):  # the failed batches rolled back whole, adapter included
        alice.get_adapter("alice", "bulk")


def test_promote_with_expect_is_a_compare_and_swap(cat: Catalog) -> None:
    for i in (1, 2, 3):
        save(cat, "alice", "inst", i, kind="memory")
    with pytest.raises(CatalogConflict, match=r"^alias: inst:live does not exist, not @1"):
        cat.promote("alice", "inst", "live", 2, expect=1)
    cat.promote("alice", "inst", "live", 1)
    assert cat.promote("alice", "inst", "live", 2, expect=1).number == 2
    with pytest.raises(CatalogConflict, match=r"^alias: inst:live points at @2, not @1 as expected"):
        cat.promote("alice", "inst", "live", 3, expect=1)  # another writer moved it first
    assert cat.resolve("alice", "inst:live").number == 2
    with pytest.raises(ValueError, match="^expect: "):
        cat.promote("alice", "inst", "live", 3, expect=-1)


def test_delete_adapter_tombstones_everything_and_drops_aliases(cat: Catalog, clock: Clock) -> None:
    save(cat, "alice", "inst", 1, kind="memory")
    save(cat, "alice", "inst", 2, kind="memory", parents=["inst@1"])
    cat.promote("alice", "inst", "live", 1)
    cat.promote("alice", "inst", "live", 2)
    cat.rollback("alice", "inst", "live")
    save(cat, "bob", "inst", 1, kind="memory")
    with pytest.raises(CatalogNotFound):  # another owner's adapter: not found, nothing touched
        cat.delete_adapter("bob", "other")
    hashes = cat.delete_adapter("alice", "inst")
    assert hashes == sorted(sha(f"alice/inst/{i}") for i in (1, 2))
    for ref in ("inst@1", "inst@2", "inst:live", "inst"):
        with pytest.raises(CatalogNotFound):
            cat.resolve("alice", ref)
    assert cat.show("alice", "inst").aliases == ()
    assert cat.referenced_hashes(hashes) == set()
    assert cat.resolve("bob", "inst").kind == "memory"  # bob's adapter of the same name is untouched
    assert cat.audit("alice", adapter="inst", limit=1)[0].action == "adapter.delete"
    assert cat.delete_adapter("alice", "inst") == []  # again: nothing left to tombstone
    rev = save(cat, "alice", "inst", 3, kind="memory")  # the name lives on, numbering continues
    assert rev.number == 3


def test_memory_kind_migrates_from_an_older_database(tmp_path: Path) -> None:
    """0002 -> 0003 on SQLite rebuilds `revisions` with the wider kind check, keeping rows and the check."""
    from alembic import command

    from mintd.catalog.db import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = CatalogDB(url, migrate=False)
    with old.write() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    before = save(Catalog(old), "erin", "pol", 1)
    with pytest.raises(Exception, match="CHECK constraint"), old.write() as conn:
        conn.exec_driver_sql("UPDATE revisions SET kind = 'memory'")
    old.dispose()
    db = CatalogDB(url)
    cat = Catalog(db)
    assert cat.resolve("erin", "pol@1") == before
    assert save(cat, "erin", "pol", 2, kind="memory").kind == "memory"
    with pytest.raises(Exception, match="CHECK constraint"), db.write() as conn:
        conn.exec_driver_sql("UPDATE revisions SET kind = 'bogus'")
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
        # compare_metadata cannot see expression indexes on SQLite, and batch mode would have lost one
        indexes = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")
        present = {name for (name,) in indexes}
    assert {ix.name for table in models.Base.metadata.tables.values() for ix in table.indexes} <= present
    db.dispose()


# schema and concurrency ---------------------------------------------------------------------------------


def test_migrations_build_the_schema_and_rerun_as_no_ops(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "catalog.db"
    first = CatalogDB(f"sqlite:///{path}")
    cat = Catalog(first)
    save(cat, "alice", "pol", 1)
    with first.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), models.Base.metadata) == []
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    first.dispose()
    assert version == "0003"
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {t.name for t in models.Base.metadata.sorted_tables} | {"alembic_version"} == tables

    again = CatalogDB(f"sqlite:///{path}")  # a restart: migrate() again finds the schema at head
    assert Catalog(again).resolve("alice", "pol@1").number == 1
    again.dispose()


def test_settings_default_to_sqlite_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINTD_CATALOG_URL", raising=False)
    db = CatalogDB.from_settings(CatalogSettings(), tmp_path / "data")
    db.dispose()
    assert (tmp_path / "data" / "catalog.db").is_file()
    monkeypatch.setenv("MINTD_CATALOG_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    CatalogDB.from_settings(CatalogSettings(), tmp_path / "data").dispose()
    assert (tmp_path / "elsewhere.db").is_file()


def test_sqlite_needs_a_file() -> None:
    with pytest.raises(ValueError, match="^catalog_url:"):
        CatalogDB("sqlite://")


def test_concurrent_registration_gives_unique_consecutive_numbers(tmp_path: Path) -> None:
    """Writers in threads, over two engines (as two processes would be) on one SQLite file."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    dbs = [CatalogDB(url), CatalogDB(url)]
    cats = [Catalog(d) for d in dbs]

    def writer(k: int) -> list[int]:
        return [save(cats[k % 2], "alice", "pol", k * 100 + i).number for i in range(15)]

    numbers = run_writers(8, writer)
    assert sorted(numbers) == list(range(1, 121))
    assert cats[0].get_adapter("alice", "pol").last_number == 120
    assert len([e for e in cats[1].audit("alice", limit=1000) if e.action == "adapter.create"]) == 1
    for d in dbs:
        d.dispose()


@pytest.mark.parametrize(
    ("path", "expires_at"),
    [
        (None, None),
        ('tinker://r/weights/a"b\\c ünï', 1.5e9 + 0.125),
        ("tinker://r/sampler_weights/s", 3600.0),
    ],
)
def test_bulk_audit_details_are_exactly_the_json_encoding(path: str | None, expires_at: float | None) -> None:
    from mintd.catalog.bulk import register_details
    from mintd.catalog.validate import dump_json

    values = {"kind": "state", "content_hash": "ab" * 32, "tinker_path": path}
    details = {"kind": "state", "content_hash": "ab" * 32, "tinker_path": path, "expires_at": expires_at}
    assert register_details(values, expires_at, []) == dump_json({**details, "parents": []})


def test_json_memo_never_confuses_values_that_encode_differently() -> None:
    from mintd.catalog.validate import JsonMemo

    memo = JsonMemo()
    forms = [{"a": True}, {"a": 1}, {"a": 1.0}, {"a": "1"}, {"a": [1]}, {"a": 1, "b": 2}, {"b": 2, "a": 1}]
    assert [memo(f, "x") for f in forms] == [
        '{"a":true}',
        '{"a":1}',
        '{"a":1.0}',
        '{"a":"1"}',
        '{"a":[1]}',
        '{"a":1,"b":2}',
        '{"b":2,"a":1}',
    ]
    assert memo({"a": True}, "x") == '{"a":true}'  # remembered
    with pytest.raises(ValueError, match="^y: "):
        memo({"a": float("nan")}, "y")
    assert memo(None, "z", optional=True) is None
