"""Expanding an evaluation's revision set in the catalog: refs, an adapter's revisions, a name prefix
(newest, or an alias), each revision once, limits and field-named errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mintd.catalog import Catalog, CatalogDB, CatalogNotFound, Provenance
from mintd.service.evaluation import RevisionSet, expand

PROV = Provenance(base_fingerprint="base-fp")


@pytest.fixture
def cat(tmp_path: Path) -> Iterator[Catalog]:
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog = Catalog(db)
    n = 0
    for name, revisions in [("pop-a", 3), ("pop-b", 2), ("pop-c", 1), ("other", 2)]:
        for _ in range(revisions):
            n += 1
            sha = hashlib.sha256(str(n).encode()).hexdigest()
            catalog.register_revision("alice", name, sha, "sampler", provenance=PROV, size_bytes=10)
    catalog.promote("alice", "pop-a", "prod", 2)
    catalog.promote("alice", "pop-c", "prod", 1)
    catalog.register_revision("bob", "pop-z", "f" * 64, "sampler", provenance=PROV)
    yield catalog
    db.dispose()


def refs(cat: Catalog, **query) -> list[str]:
    return [r.ref for r in expand(cat, "alice", RevisionSet(**query))]


def test_refs_adapters_prefixes_and_aliases(cat: Catalog) -> None:
    assert refs(cat, refs=("pop-a@1", "other", "pop-a:prod")) == [
        "alice/pop-a@1",
        "alice/other@2",
        "alice/pop-a@2",
    ]
    assert refs(cat, adapter="pop-a") == ["alice/pop-a@3", "alice/pop-a@2", "alice/pop-a@1"]
    assert refs(cat, prefix="pop-") == ["alice/pop-a@3", "alice/pop-b@2", "alice/pop-c@1"]  # not bob's
    assert refs(cat, prefix="pop-", alias="prod") == ["alice/pop-a@2", "alice/pop-c@1"]  # pop-b has none
    # the parts add up, each revision once
    assert refs(cat, refs=("pop-a@3",), adapter="pop-b", prefix="pop-") == [
        "alice/pop-a@3",
        "alice/pop-b@2",
        "alice/pop-b@1",
        "alice/pop-c@1",
    ]


def test_deleted_revisions_are_not_evaluated(cat: Catalog) -> None:
    cat.delete_revision("alice", "pop-b@2")
    assert refs(cat, prefix="pop-b") == ["alice/pop-b@1"]
    cat.delete_revision("alice", "pop-b@1")
    with pytest.raises(ValueError, match="revisions: no live revision matches"):
        refs(cat, prefix="pop-b")


def test_bad_sets_are_refused_naming_the_field(cat: Catalog) -> None:
    with pytest.raises(CatalogNotFound, match=r"revisions.refs\[1\]: 'nope' not found"):
        refs(cat, refs=("pop-a", "nope"))
    with pytest.raises(CatalogNotFound, match=r"revisions.refs\[0\]"):
        refs(cat, refs=("bob/pop-z",))  # another owner's: as if missing
    with pytest.raises(ValueError, match="revisions: more than 2 revisions match"):
        refs(cat, prefix="pop-", limit=2)
    with pytest.raises(ValueError, match="revisions.limit"):
        refs(cat, prefix="pop-", limit=0)
    with pytest.raises(ValueError, match="revisions.alias: needs revisions.prefix"):
        refs(cat, alias="prod")
    with pytest.raises(ValueError, match="revisions: no live revision matches"):
        refs(cat)
    with pytest.raises(ValueError, match="prefix"):
        refs(cat, prefix="bad prefix")
