"""Registering revisions many at a time: the statements of `register_revision` turned into multi-row
ones, so an import (or the scale benchmark) costs a few statements per thousand revisions instead of a
transaction each. Also the checks both paths share.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import Connection, Executable, Row, bindparam, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from mintd.catalog import queries as q
from mintd.catalog import refs, writes
from mintd.catalog.errors import CatalogConflict
from mintd.catalog.types import NewRevision
from mintd.catalog.validate import JsonText

_string = json.encoder.encode_basestring_ascii  # what the encoder uses for str (ensure_ascii)
_EMPTY = JsonText("{}")
_SET_LAST = update(q.adapters).where(q.a.id == bindparam("aid")).values(last_number=bindparam("last"))

T = TypeVar("T")
_IN = 500  # bound parameters per IN (...) list: far below every backend's limit


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """itertools.batched (Python 3.12) for 3.11."""
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def parent_rows(
    conn: Connection, owner: str, parent_refs: list[tuple[str, ...]], now: float
) -> list[list[Row]]:
    """Resolve each revision's parent refs (live, same owner), dropping repeats but keeping order."""
    out: list[list[Row]] = []
    if not any(parent_refs):
        return [[] for _ in parent_refs]
    for refs_of_one in parent_refs:
        if not refs_of_one:
            out.append([])
            continue
        rows: dict[int, Row] = {}
        for i, text in enumerate(refs_of_one):
            field = f"parents[{i}]"
            row = q.find_revision(conn, owner, refs.parse(text, owner, field), now, text, field)
            rows.setdefault(row.id, row)
        out.append(list(rows.values()))
    return out


def check_paths_free(conn: Connection, owner_id: int, paths: list[str], now: float) -> None:
    """A tinker path may name one live revision of an owner at a time (Tinker's overwrite=False).

    The owner is compared in Python, not in SQL: given a long IN list plus an owner filter, SQLite's
    planner may walk all of the owner's revisions instead of probing the tinker_path index.
    """
    repeated = [p for p, n in Counter(paths).items() if n > 1]
    if repeated:
        raise ValueError(f"tinker_path: {repeated[0]!r} given twice")
    for chunk in batched(paths, _IN):
        stmt = (
            select(q.r.tinker_path, q.a.owner_id)
            .select_from(q.revisions.join(q.adapters, q.a.id == q.r.adapter_id))
            .where(q.r.tinker_path.in_(chunk), q.LIVE)
        )
        for path, path_owner in conn.execute(stmt, {"now": now}):
            if path_owner == owner_id:
                raise CatalogConflict(
                    f"tinker_path: {path!r} already exists (save with overwrite to replace it)"
                )


def register_details(values: dict[str, Any], expires_at: float | None, parents: list[Row]) -> JsonText:
    """What the audit row of a registration records (the revision row itself holds the rest), encoded.

    Written out rather than through the JSON encoder (a fifth of the bulk path's Python time went
    there): the values are already validated, and each string goes through the encoder's own escaping,
    so the text is exactly what `dump_json` of the same object gives (tests/catalog compare them)."""
    path = values["tinker_path"]
    refs_ = ",".join([_string(q.revision_from_row(p).ref) for p in parents]) if parents else ""
    return JsonText(
        f'{{"kind":{_string(values["kind"])},"content_hash":{_string(values["content_hash"])},'
        f'"tinker_path":{"null" if path is None else _string(path)},'
        f'"expires_at":{"null" if expires_at is None else float.__repr__(expires_at)},"parents":[{refs_}]}}'
    )


def register(
    conn: Connection, owner: str, checked: list[tuple[NewRevision, dict[str, Any]]], *, now: float, actor: str
) -> None:
    """Insert one batch of validated revisions, each numbered after its adapter's last in input order."""
    owner_id = writes.owner_id(conn, owner, create=True, now=now, actor=actor)
    adapter_ids = _adapters(conn, owner_id, owner, sorted({new.adapter for new, _ in checked}), now, actor)
    parents = parent_rows(conn, owner, [new.parents for new, _ in checked], now)
    paths = [v["tinker_path"] for _, v in checked if v["tinker_path"] is not None]
    if paths:
        check_paths_free(conn, owner_id, paths, now)

    last = _lock_counters(conn, sorted(set(adapter_ids.values())))
    rows, audits = [], []
    for (new, values), parent in zip(checked, parents, strict=True):
        adapter_id = adapter_ids[new.adapter]
        last[adapter_id] += 1
        expires_at = None if new.ttl_seconds is None else now + new.ttl_seconds
        # completes the row in place: `values` was made for this batch by validate.revision_values
        values.update(adapter_id=adapter_id, number=last[adapter_id], created_at=now, expires_at=expires_at)
        rows.append(values)
        audits.append(
            {
                "at": now,
                "owner_id": owner_id,
                "adapter_id": adapter_id,
                "actor": actor,
                "action": "revision.register",
                "subject": f"{owner}/{new.adapter}@{last[adapter_id]}",
                "details": register_details(values, expires_at, parent),
            }
        )
    execute_many(conn, _SET_LAST, [{"aid": aid, "last": n} for aid, n in last.items()])
    execute_many(conn, insert(q.revisions), rows)
    execute_many(conn, insert(q.audit_log), audits)
    _link_parents(conn, rows, parents)


def execute_many(conn: Connection, stmt: Executable, rows: list[dict[str, Any]]) -> None:
    """One executemany of a statement compiled for the connection's dialect, skipping SQLAlchemy's
    per-row parameter processing (the bulk path's main cost after validation). Values must already be
    plain driver values: JSON columns take encoded text (`validate.JsonText` / `dump_json`)."""
    dialect = conn.dialect
    if dialect.name == "sqlite":  # sqlite3 binds :name from each dict in C; no per-row tuple in Python
        dialect = type(dialect)(paramstyle="named")
    compiled = stmt.compile(dialect=dialect, column_keys=list(rows[0]))
    if compiled.positional:
        values_of = itemgetter(*compiled.positiontup)
        conn.exec_driver_sql(compiled.string, [values_of(row) for row in rows])
    else:
        conn.exec_driver_sql(compiled.string, rows)


def _adapters(
    conn: Connection, owner_id: int, owner: str, names: list[str], now: float, actor: str
) -> dict[str, int]:
    """name -> adapter key for every name, creating (and auditing) the missing adapters."""
    ids = _adapter_ids(conn, owner_id, names)
    missing = [n for n in names if n not in ids]
    if not missing:
        return ids
    new = [
        {
            "public_id": uuid.uuid4().hex,
            "owner_id": owner_id,
            "name": n,
            "created_at": now,
            "last_number": 0,
            "metadata": _EMPTY,
        }
        for n in missing
    ]
    try:
        with conn.begin_nested():
            execute_many(conn, insert(q.adapters), new)
    except IntegrityError:  # PostgreSQL: some were created concurrently; take the one-by-one path
        for n in missing:
            writes.adapter(conn, owner_id, owner, n, create=True, now=now, actor=actor)
        return _adapter_ids(conn, owner_id, names)
    ids.update(_adapter_ids(conn, owner_id, missing))
    audits = [
        {
            "at": now,
            "owner_id": owner_id,
            "adapter_id": ids[v["name"]],
            "actor": actor,
            "action": "adapter.create",
            "subject": f"{owner}/{v['name']}",
            "details": JsonText(f'{{"id":"{v["public_id"]}"}}'),  # a uuid's hex digits need no escaping
        }
        for v in new
    ]
    execute_many(conn, insert(q.audit_log), audits)
    return ids


def _adapter_ids(conn: Connection, owner_id: int, names: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for chunk in batched(names, _IN):
        stmt = select(q.a.name, q.a.id).where(q.a.owner_id == owner_id, q.a.name.in_(chunk))
        ids.update((name, key) for name, key in conn.execute(stmt))
    return ids


def _lock_counters(conn: Connection, adapter_ids: list[int]) -> dict[int, int]:
    """Current last_number per adapter, row-locked in key order (PostgreSQL; no deadlocks between
    batches), so the numbers handed out below are not handed out twice."""
    last: dict[int, int] = {}
    for chunk in batched(adapter_ids, _IN):
        stmt = select(q.a.id, q.a.last_number).where(q.a.id.in_(chunk)).order_by(q.a.id).with_for_update()
        last.update((key, n) for key, n in conn.execute(stmt))
    return last


def _link_parents(conn: Connection, rows: list[dict[str, Any]], parents: list[list[Row]]) -> None:
    wanted = [(row["adapter_id"], row["number"], ps) for row, ps in zip(rows, parents, strict=True) if ps]
    if not wanted:
        return
    links = []
    for chunk in batched(wanted, _IN):
        keys = [(aid, num) for aid, num, _ in chunk]
        stmt = select(q.r.adapter_id, q.r.number, q.r.id).where(tuple_(q.r.adapter_id, q.r.number).in_(keys))
        child = {(aid, num): rid for aid, num, rid in conn.execute(stmt)}
        for aid, num, ps in chunk:
            links += [
                {"child_id": child[aid, num], "parent_id": p.id, "position": i} for i, p in enumerate(ps)
            ]
    conn.execute(insert(q.parents), links)
