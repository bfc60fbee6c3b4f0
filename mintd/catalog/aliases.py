"""Alias moves inside the caller's write transaction: promote (optionally gated) and rollback.

Every move appends an `alias_moves` row and an audit row. A rollback undoes the newest promote that no
rollback has undone yet, so repeated rollbacks walk back through the promotions (promote A, B, C;
rollback -> B; rollback -> A; rollback -> nothing left).
"""

from __future__ import annotations

from dataclasses import asdict

from sqlalchemy import Connection, Row, bindparam, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mintd.catalog import queries as q
from mintd.catalog import writes
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.catalog.types import Alias, Gate

_a = q.aliases.c
_MOVE = (
    update(q.aliases)
    .where(_a.id == bindparam("alias_id"))
    .values(revision_id=bindparam("to_id"), updated_at=bindparam("at"))
)
_INSERT_ALIAS = insert(q.aliases)
_INSERT_MOVE = insert(q.moves)
_e = q.evaluations.c
_BEST = select(func.max(_e.value)).where(
    _e.revision_id == bindparam("revision_id"),
    _e.suite == bindparam("suite"),
    _e.metric == bindparam("metric"),
)
_m, _undone = q.moves.alias("m"), q.moves.alias("undone")
_LAST_PROMOTE = (
    select(_m.c.id, _m.c.from_revision_id)
    .where(
        _m.c.alias_id == bindparam("alias_id"),
        _m.c.action == "promote",
        ~exists().where(_undone.c.reverts_id == _m.c.id),
    )
    .order_by(_m.c.id.desc())
    .limit(1)
)


def promote(
    conn: Connection,
    *,
    owner: str,
    adapter: Row,
    alias: str,
    target: Row,
    gate: Gate | None,
    now: float,
    actor: str,
) -> Alias:
    """Point `alias` of `adapter` (a `queries.ADAPTER` row) at `target` (a locked revision row).
    Moving it to where it already points records nothing."""
    adapter_id, adapter_name = adapter[0], adapter[3]
    rev = q.revision_from_row(target)
    if q.adapter_pk(target) != adapter_id:
        raise ValueError(f"ref: {rev.ref} is not a revision of adapter {adapter_name!r}")
    if gate is not None:
        best = conn.execute(
            _BEST, {"revision_id": rev.id, "suite": gate.suite, "metric": gate.metric}
        ).scalar()
        if best is None or best < gate.threshold:
            seen = "no such evaluation" if best is None else f"best is {best}"
            raise CatalogConflict(
                f"gate: {rev.ref} needs an evaluation {gate.suite}/{gate.metric} >= {gate.threshold} ({seen})"
            )
    current = _current(conn, adapter_id, alias)
    if current is None:
        created = _create(conn, adapter_id, alias, rev.id, now)
        if created is None:  # another writer created it first (PostgreSQL): it exists now
            current = conn.execute(q.ALIAS_FOR_UPDATE, {"adapter_id": adapter_id, "alias": alias}).one()
    if current is not None:
        if current.revision_id == rev.id:
            return Alias(alias, owner, adapter_name, rev.number, rev.id, current.updated_at)
        alias_id = current.id
        conn.execute(_MOVE, {"alias_id": alias_id, "to_id": rev.id, "at": now})
    else:
        alias_id = created
    conn.execute(
        _INSERT_MOVE,
        {
            "alias_id": alias_id,
            "action": "promote",
            "from_revision_id": None if current is None else current.revision_id,
            "to_revision_id": rev.id,
            "reverts_id": None,
            "at": now,
            "actor": actor,
        },
    )
    _audit(
        conn,
        adapter,
        owner,
        alias,
        now,
        actor,
        "alias.promote",
        from_number=None if current is None else _number(conn, current.revision_id),
        to=rev.ref,
        gate=None if gate is None else asdict(gate),
    )
    return Alias(alias, owner, adapter_name, rev.number, rev.id, now)


def expect(conn: Connection, *, adapter: Row, alias: str, number: int) -> None:
    """CatalogConflict unless `alias` of `adapter` points at revision `number` now (its row locked)."""
    current = _current(conn, adapter[0], alias)
    now_at = None if current is None else _number(conn, current.revision_id)
    if now_at != number:
        where = "does not exist" if now_at is None else f"points at @{now_at}"
        raise CatalogConflict(f"alias: {adapter[3]}:{alias} {where}, not @{number} as expected; it moved")


def rollback(conn: Connection, *, owner: str, adapter: Row, alias: str, now: float, actor: str) -> Alias:
    adapter_id, adapter_name = adapter[0], adapter[3]
    current = _current(conn, adapter_id, alias)
    if current is None:
        raise CatalogNotFound(f"alias: {alias!r} not found")
    undo = conn.execute(_LAST_PROMOTE, {"alias_id": current.id}).first()
    if undo is None or undo.from_revision_id is None:
        raise CatalogConflict(f"alias: {adapter_name}:{alias} has no earlier target to roll back to")
    prev = conn.execute(q.LOCKED[q.BY_ID], {"owner": owner, "id": undo.from_revision_id}).one()
    rev = q.revision_from_row(prev)
    try:
        q.check_live(prev, now, rev.ref, "alias")
    except CatalogNotFound as exc:
        raise CatalogConflict(f"alias: cannot roll back {adapter_name}:{alias}: {exc}") from None
    conn.execute(_MOVE, {"alias_id": current.id, "to_id": rev.id, "at": now})
    conn.execute(
        _INSERT_MOVE,
        {
            "alias_id": current.id,
            "action": "rollback",
            "from_revision_id": current.revision_id,
            "to_revision_id": rev.id,
            "reverts_id": undo.id,
            "at": now,
            "actor": actor,
        },
    )
    from_number = _number(conn, current.revision_id)
    _audit(conn, adapter, owner, alias, now, actor, "alias.rollback", from_number=from_number, to=rev.ref)
    return Alias(alias, owner, adapter_name, rev.number, rev.id, now)


def _current(conn: Connection, adapter_id: int, alias: str) -> Row | None:
    return conn.execute(q.ALIAS_FOR_UPDATE, {"adapter_id": adapter_id, "alias": alias}).first()


def _number(conn: Connection, revision_id: int) -> int:
    return conn.execute(q.NUMBER_OF, {"id": revision_id}).scalar_one()


def _create(conn: Connection, adapter_id: int, alias: str, revision_id: int, now: float) -> int | None:
    """A new alias already pointing at `revision_id`; None if a concurrent writer created it."""
    values = {"adapter_id": adapter_id, "name": alias, "revision_id": revision_id, "updated_at": now}
    try:
        with conn.begin_nested():
            return conn.execute(_INSERT_ALIAS, values).inserted_primary_key[0]
    except IntegrityError:
        return None


def _audit(
    conn: Connection,
    adapter: Row,
    owner: str,
    alias: str,
    now: float,
    actor: str,
    action: str,
    *,
    from_number: int | None,
    **details: object,
) -> None:
    base = f"{owner}/{adapter[3]}"
    writes.audit(
        conn,
        at=now,
        owner_id=adapter[-1],
        adapter_id=adapter[0],
        actor=actor,
        action=action,
        subject=f"{base}:{alias}",
        **{"from": None if from_number is None else f"{base}@{from_number}"},
        **details,
    )
