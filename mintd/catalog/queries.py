"""Read statements built once at import, and the mapping of their rows to value objects.

Resolution is the hot path (every sample request names a revision), so each ref form is a single
indexed lookup built here once; SQLAlchemy's compiled cache then reuses the SQL, and rows become frozen
dataclasses without any ORM machinery. Every statement filters on the owner's name: tenancy is part of
the SQL, not a check after the fact.
"""

from __future__ import annotations

from sqlalchemy import Connection, Row, and_, bindparam, or_, select

from mintd.catalog import models
from mintd.catalog.errors import CatalogNotFound
from mintd.catalog.refs import Ref
from mintd.catalog.types import Adapter, Alias, AuditEntry, Evaluation, Provenance, Revision

owners = models.Owner.__table__
adapters = models.Adapter.__table__
revisions = models.Revision.__table__
parents = models.RevisionParent.__table__
aliases = models.Alias.__table__
moves = models.AliasMove.__table__
evaluations = models.Evaluation.__table__
audit_log = models.AuditLog.__table__

r, a, o = revisions.c, adapters.c, owners.c
_PROVENANCE = (
    r.base_fingerprint,
    r.base_model,
    r.lora_config,
    r.training_run_id,
    r.step,
    r.loss_fn,
    r.optimizer,
    r.data_fingerprint,
    r.created_by,
)
REVISION_COLUMNS = (
    r.id,
    o.name,
    a.name,
    a.public_id,
    r.number,
    r.kind,
    r.content_hash,
    r.size_bytes,
    *_PROVENANCE,
    r.tinker_path,
    r.created_at,
    r.expires_at,
    r.deleted_at,
    r.metadata,
    a.id,  # internal keys, for writers; not part of the value object
    a.owner_id,
)
_P0, _P1 = 8, 8 + len(_PROVENANCE)
FROM = revisions.join(adapters, a.id == r.adapter_id).join(owners, o.id == a.owner_id)
REVISION = select(*REVISION_COLUMNS).select_from(FROM)
_ADAPTER_IS = and_(o.name == bindparam("owner"), a.name == bindparam("adapter"))
LIVE = and_(r.deleted_at.is_(None), or_(r.expires_at.is_(None), r.expires_at > bindparam("now")))

BY_NUMBER = REVISION.where(_ADAPTER_IS, r.number == bindparam("number"))
NEWEST_LIVE = REVISION.where(_ADAPTER_IS, LIVE).order_by(r.number.desc()).limit(1)
BY_ALIAS = REVISION.join(aliases, aliases.c.revision_id == r.id).where(
    _ADAPTER_IS, aliases.c.adapter_id == a.id, aliases.c.name == bindparam("alias")
)
# An overwrite=True save re-uses a path; the newest revision under it is the one the path names.
BY_TINKER_PATH = (
    REVISION.where(o.name == bindparam("owner"), r.tinker_path == bindparam("path"))
    .order_by(r.id.desc())
    .limit(1)
)
BY_ID = REVISION.where(o.name == bindparam("owner"), r.id == bindparam("id"))
# Writers read what they are about to act on with FOR UPDATE OF revisions (PostgreSQL; SQLite writers
# already hold the database lock), so e.g. a delete and a promote of one revision cannot both win.
LOCKED = {
    s: s.with_for_update(of=revisions) for s in (BY_NUMBER, NEWEST_LIVE, BY_ALIAS, BY_TINKER_PATH, BY_ID)
}

# (internal key, the value object's fields..., internal owner key)
ADAPTER = select(
    a.id, a.public_id, o.name, a.name, a.created_at, a.last_number, a.metadata, a.owner_id
).select_from(adapters.join(owners, o.id == a.owner_id))
ADAPTER_BY_NAME = ADAPTER.where(_ADAPTER_IS)
ALIAS_COLUMNS = (aliases.c.name, o.name, a.name, r.number, r.id, aliases.c.updated_at)
_ALIAS = select(*ALIAS_COLUMNS).select_from(
    aliases.join(revisions, r.id == aliases.c.revision_id)
    .join(adapters, a.id == aliases.c.adapter_id)
    .join(owners, o.id == a.owner_id)
)
ALIASES_OF = _ALIAS.where(_ADAPTER_IS).order_by(aliases.c.name)
ALIASES_OF_MANY = _ALIAS.where(
    o.name == bindparam("owner"), a.name.in_(bindparam("adapters", expanding=True))
).order_by(a.name, aliases.c.name)
# No join here: PostgreSQL re-checks a locked row that changed meanwhile against the old versions of
# joined rows, and would drop an alias just moved by another writer.
ALIAS_FOR_UPDATE = (
    select(aliases.c.id, aliases.c.revision_id, aliases.c.updated_at)
    .where(aliases.c.adapter_id == bindparam("adapter_id"), aliases.c.name == bindparam("alias"))
    .with_for_update()
)
NUMBER_OF = select(r.number).where(r.id == bindparam("id"))
OWNER_ID = select(o.id).where(o.name == bindparam("owner"))
EVALUATION_COLUMNS = tuple(
    evaluations.c[k]
    for k in ("id", "suite", "metric", "value", "dataset_fingerprint", "evaluator", "created_at", "metadata")
)
AUDIT_COLUMNS = tuple(audit_log.c[k] for k in ("id", "at", "actor", "action", "subject", "details"))


def revision_from_row(row: Row) -> Revision:
    return Revision(
        *row[:7],
        size_bytes=row[7],
        provenance=Provenance(*row[_P0:_P1]),
        tinker_path=row[_P1],
        created_at=row[_P1 + 1],
        expires_at=row[_P1 + 2],
        deleted_at=row[_P1 + 3],
        metadata=row[_P1 + 4],
    )


def adapter_pk(row: Row) -> int:
    """The internal adapter key carried near the end of a revision row."""
    return row[-2]


def owner_pk(row: Row) -> int:
    return row[-1]


def adapter_from_row(row: Row) -> Adapter:
    return Adapter(*row[1:7])


def alias_from_row(row: Row) -> Alias:
    return Alias(*row)


def evaluation_from_row(row: Row, revision_ref: str) -> Evaluation:
    """Row of EVALUATION_COLUMNS; the evaluated revision is named by its ref, not an internal key."""
    return Evaluation(row[0], revision_ref, *row[1:])


def audit_from_row(row: Row) -> AuditEntry:
    return AuditEntry(*row)


def find_revision(
    conn: Connection, owner: str, ref: Ref, now: float, text: str, field: str = "ref", *, lock: bool = False
) -> Row:
    """The row a parsed ref names, if it belongs to `owner` and is live; else CatalogNotFound.

    Only the owner's own revisions get the more specific "expired" / "deleted" wording: a foreign or
    unknown ref reads exactly like one that never existed.
    """
    if ref.tinker_path is not None:
        stmt, params = BY_TINKER_PATH, {"owner": owner, "path": ref.tinker_path}
    elif ref.number is not None:
        stmt, params = BY_NUMBER, {"owner": owner, "adapter": ref.adapter, "number": ref.number}
    elif ref.alias is not None:
        stmt, params = BY_ALIAS, {"owner": owner, "adapter": ref.adapter, "alias": ref.alias}
    else:
        stmt, params = NEWEST_LIVE, {"owner": owner, "adapter": ref.adapter, "now": now}
    row = conn.execute(LOCKED[stmt] if lock else stmt, params).first()
    if row is None:
        raise CatalogNotFound(f"{field}: {text!r} not found")
    check_live(row, now, text, field)
    return row


def check_live(row: Row, now: float, text: str, field: str) -> None:
    deleted_at, expires_at = row[_P1 + 3], row[_P1 + 2]
    if deleted_at is not None:
        raise CatalogNotFound(f"{field}: {text!r} was deleted")
    if expires_at is not None and expires_at <= now:
        raise CatalogNotFound(f"{field}: {text!r} has expired")
