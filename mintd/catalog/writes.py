"""Write helpers shared by the single and bulk paths. Each runs inside the caller's write transaction,
so a mutation and its audit row commit or vanish together.

These are the only statements that change existing rows: adapter counters, alias targets, and the two
revision lifecycle columns (`update_lifecycle`). Revisions have no other update path.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, update
from sqlalchemy.exc import IntegrityError

from mintd.catalog import queries as q
from mintd.catalog.errors import CatalogNotFound
from mintd.catalog.models import REVISION_LIFECYCLE_COLUMNS
from mintd.catalog.validate import JsonText

_INSERT_AUDIT = insert(q.audit_log)
_NEXT_NUMBER = (
    update(q.adapters)
    .where(q.a.id == bindparam("adapter_id"))
    .values(last_number=q.a.last_number + 1)
    .returning(q.a.last_number)
)


def audit(
    conn: Connection,
    *,
    at: float,
    owner_id: int,
    actor: str,
    action: str,
    subject: str,
    adapter_id: int | None = None,
    encoded: JsonText | None = None,
    **details: Any,
) -> None:
    """Append an audit row; its details are `details`, or `encoded` when the caller encoded them."""
    conn.execute(
        _INSERT_AUDIT,
        {
            "at": at,
            "owner_id": owner_id,
            "adapter_id": adapter_id,
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": details if encoded is None else encoded,
        },
    )


def owner_id(conn: Connection, owner: str, *, create: bool, now: float, actor: str) -> int:
    """The owner's key; created (and audited) on first write. Readers never create owners."""
    found = conn.execute(q.OWNER_ID, {"owner": owner}).scalar()
    if found is not None:
        return found
    if not create:
        raise CatalogNotFound(f"owner: {owner!r} has no catalog entries")
    try:
        with conn.begin_nested():  # PostgreSQL: another writer may create the same owner concurrently
            new_id = conn.execute(insert(q.owners).values(name=owner, created_at=now)).inserted_primary_key[0]
    except IntegrityError:
        return conn.execute(q.OWNER_ID, {"owner": owner}).scalar_one()
    audit(conn, at=now, owner_id=new_id, actor=actor, action="owner.create", subject=owner)
    return new_id


def adapter(
    conn: Connection,
    owner_id: int,
    owner: str,
    name: str,
    *,
    create: bool,
    now: float,
    actor: str,
    metadata: JsonText | None = None,
) -> tuple[Row, bool]:
    """(adapter row as in `queries.ADAPTER`, created?). Not found unless `create`; `metadata` (checked
    by `validate.json_object`) is used only when creating."""
    stmt = q.ADAPTER_BY_NAME
    found = conn.execute(stmt, {"owner": owner, "adapter": name}).first()
    if found is not None:
        return found, False
    if not create:
        raise CatalogNotFound(f"adapter: {name!r} not found")
    values = {
        "public_id": uuid.uuid4().hex,
        "owner_id": owner_id,
        "name": name,
        "created_at": now,
        "last_number": 0,
        "metadata": metadata if metadata is not None else {},
    }
    try:
        with conn.begin_nested():
            adapter_id = conn.execute(insert(q.adapters).values(values)).inserted_primary_key[0]
    except IntegrityError:  # created concurrently (PostgreSQL); SQLite writers are serialized
        return conn.execute(stmt, {"owner": owner, "adapter": name}).one(), False
    audit(
        conn,
        at=now,
        owner_id=owner_id,
        adapter_id=adapter_id,
        actor=actor,
        action="adapter.create",
        subject=f"{owner}/{name}",
        id=values["public_id"],
    )
    return conn.execute(stmt, {"owner": owner, "adapter": name}).one(), True


def next_number(conn: Connection, adapter_id: int) -> int:
    """Hand out the adapter's next revision number. The UPDATE row-locks the adapter on PostgreSQL and
    holds the write lock on SQLite, so concurrent savers get distinct, consecutive numbers."""
    return conn.execute(_NEXT_NUMBER, {"adapter_id": adapter_id}).scalar_one()


def update_lifecycle(conn: Connection, revision_ids: list[int], **values: float | None) -> None:
    """The one UPDATE on revisions: TTL and tombstone only. Everything else about a revision is fixed."""
    if not values or set(values) - REVISION_LIFECYCLE_COLUMNS:
        raise PermissionError(
            f"revisions are immutable; only {sorted(REVISION_LIFECYCLE_COLUMNS)} may change"
        )
    conn.execute(update(q.revisions).where(q.r.id.in_(revision_ids)).values(**values))
