"""`Catalog`: the one Python API over the catalog, called by the service (every Tinker save), the REST
routes and the CLI.

Conventions every method keeps:
- `owner` is the authenticated principal and comes first. Every query is scoped to it; another owner's
  adapter, revision, alias, evaluation or audit row is reported as `CatalogNotFound`, worded exactly
  like a name that does not exist.
- Bad input raises ValueError naming the field, before anything is written; refused state changes
  raise `CatalogConflict`.
- Every mutation appends its audit row in the same transaction; `actor` (default: the owner) is who
  the audit log names.
- Results are frozen value objects (`mintd.catalog.types`), never ORM rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, exists, func, insert, literal_column, select

from mintd.catalog import aliases, bulk, refs, validate, writes
from mintd.catalog import queries as q
from mintd.catalog.bulk import batched
from mintd.catalog.db import CatalogDB
from mintd.catalog.errors import CatalogConflict, CatalogNotFound
from mintd.catalog.models import HASH_PREFIX_SQL
from mintd.catalog.types import (
    Adapter,
    AdapterView,
    Alias,
    AuditEntry,
    Evaluation,
    Gate,
    NewRevision,
    Provenance,
    Revision,
    RevisionKind,
)

TTL_ACTOR = "mintd:ttl"
_HELD_BY = select(q.aliases.c.name).where(q.aliases.c.revision_id == bindparam("revision_id"))
_HASH_PREFIX = literal_column(HASH_PREFIX_SQL.replace("content_hash", "revisions.content_hash"))
# Live hashes by their first 8 hex digits (the indexed prefix); the caller compares whole hashes. A
# `content_hash = ?` in the same query would make SQLite substitute it into substr() and scan.
_LIVE_BY_PREFIX = select(q.r.content_hash).where(
    _HASH_PREFIX.in_(bindparam("prefixes", expanding=True)), q.r.deleted_at.is_(None)
)


class Catalog:
    def __init__(self, db: CatalogDB, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    # adapters ---------------------------------------------------------------------------------------

    def ensure_owner(self, owner: str, *, actor: str | None = None) -> None:
        owner, actor = _who(owner, actor)
        with self.db.write() as conn:
            writes.owner_id(conn, owner, create=True, now=self._clock(), actor=actor)

    def create_adapter(
        self, owner: str, name: str, *, metadata: dict[str, Any] | None = None, actor: str | None = None
    ) -> Adapter:
        adapter, created = self._get_or_create_adapter(owner, name, metadata, actor)
        if not created:
            raise CatalogConflict(f"name: adapter {name!r} already exists")
        return adapter

    def get_or_create_adapter(
        self, owner: str, name: str, *, metadata: dict[str, Any] | None = None, actor: str | None = None
    ) -> Adapter:
        return self._get_or_create_adapter(owner, name, metadata, actor)[0]

    def _get_or_create_adapter(
        self, owner: str, name: str, metadata: dict[str, Any] | None, actor: str | None
    ) -> tuple[Adapter, bool]:
        owner, actor = _who(owner, actor)
        validate.name(name, "name")
        encoded = validate.json_object({} if metadata is None else metadata, "metadata")
        now = self._clock()
        with self.db.write() as conn:
            oid = writes.owner_id(conn, owner, create=True, now=now, actor=actor)
            row, created = writes.adapter(
                conn, oid, owner, name, create=True, now=now, actor=actor, metadata=encoded
            )
        return q.adapter_from_row(row), created

    def get_adapter(self, owner: str, name: str) -> Adapter:
        owner = validate.owner(owner)
        validate.name(name, "name")
        with self.db.read() as conn:
            return q.adapter_from_row(_adapter_row(conn, owner, name))

    def list_adapters(
        self,
        owner: str,
        *,
        prefix: str | None = None,
        limit: int = 100,
        offset: int = 0,
        after: str | None = None,
    ) -> list[Adapter]:
        """The owner's adapters by name. For deep pages pass the last name seen as `after` (an index seek)
        rather than a large `offset` (a scan)."""
        owner = validate.owner(owner)
        stmt = q.ADAPTER.where(q.o.name == owner)
        if prefix is not None:
            validate.prefix(prefix)
            stmt = stmt.where(func.substr(q.a.name, 1, len(prefix)) == prefix)
        if after is not None:
            stmt = stmt.where(q.a.name > validate.name(after, "after"))
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset: {offset!r} must be a non-negative integer")
        stmt = stmt.order_by(q.a.name).limit(validate.limit(limit)).offset(offset)
        with self.db.read() as conn:
            return [q.adapter_from_row(row) for row in conn.execute(stmt)]

    def show(self, owner: str, name: str, *, limit: int = 100) -> AdapterView:
        """One adapter, its newest live revisions (up to `limit`) and all its aliases."""
        owner = validate.owner(owner)
        validate.name(name, "name")
        limit = validate.limit(limit)
        with self.db.read() as conn:
            adapter = q.adapter_from_row(_adapter_row(conn, owner, name))
            revisions = self._log(conn, owner, name, limit, None)
            rows = conn.execute(q.ALIASES_OF, {"owner": owner, "adapter": name})
            return AdapterView(adapter, tuple(revisions), tuple(q.alias_from_row(row) for row in rows))

    def aliases(self, owner: str, names: list[str]) -> list[Alias]:
        """Every alias of the named adapters (one query: a page of a listing), by adapter and alias name."""
        owner = validate.owner(owner)
        if not names:
            return []
        with self.db.read() as conn:
            rows = conn.execute(q.ALIASES_OF_MANY, {"owner": owner, "adapters": list(names)})
            return [q.alias_from_row(row) for row in rows]

    def log(self, owner: str, name: str, *, limit: int = 100, before: int | None = None) -> list[Revision]:
        """Live revisions newest first; page with `before` = the last number seen."""
        owner = validate.owner(owner)
        validate.name(name, "name")
        limit = validate.limit(limit)
        before = validate.count(before, "before")
        with self.db.read() as conn:
            _adapter_row(conn, owner, name)
            return self._log(conn, owner, name, limit, before)

    def _log(self, conn: Connection, owner: str, name: str, limit: int, before: int | None) -> list[Revision]:
        stmt = q.NEWEST_LIVE.limit(limit)
        if before is not None:
            stmt = stmt.where(q.r.number < before)
        rows = conn.execute(stmt, {"owner": owner, "adapter": name, "now": self._clock()})
        return [q.revision_from_row(row) for row in rows]

    # revisions --------------------------------------------------------------------------------------

    def resolve(self, owner: str, ref: str, *, field: str = "ref") -> Revision:
        """The live revision a ref names (see `mintd.catalog.refs` for the grammar); errors name `field`."""
        owner = validate.owner(owner)
        parsed = refs.parse(ref, owner, field)
        with self.db.read() as conn:
            return q.revision_from_row(q.find_revision(conn, owner, parsed, self._clock(), ref, field))

    def lineage(self, owner: str, ref: str, *, limit: int = 1000) -> list[Revision]:
        """Ancestors of a revision through its parents, nearest first (breadth-first). Ancestors since
        deleted or expired are included (their `deleted_at` / `expires_at` say so): lineage is history."""
        owner = validate.owner(owner)
        parsed = refs.parse(ref, owner)
        limit = validate.limit(limit)
        p = q.parents.c
        with self.db.read() as conn:
            start = q.find_revision(conn, owner, parsed, self._clock(), ref)
            order: list[int] = []
            seen, frontier = {start.id}, [start.id]
            while frontier and len(order) < limit:
                level: list[int] = []
                for chunk in batched(frontier, 500):
                    stmt = select(p.parent_id).where(p.child_id.in_(chunk)).order_by(p.child_id, p.position)
                    for pid in conn.execute(stmt).scalars():
                        if pid not in seen:
                            seen.add(pid)
                            level.append(pid)
                order += level
                frontier = level
            found: dict[int, Revision] = {}
            for chunk in batched(order[:limit], 500):  # by key alone, so the planner probes the primary key
                rows = conn.execute(q.REVISION.where(q.r.id.in_(chunk)))
                found.update((row.id, q.revision_from_row(row)) for row in rows if row[1] == owner)
        return [found[i] for i in order[:limit] if i in found]

    def tinker_checkpoints(self, owner: str, run_id: str) -> list[Revision]:
        """The live revisions a training run's `tinker://<run_id>/...` paths name, oldest first (where an
        overwrite re-used a path, only the newest revision under it: the one the path resolves to)."""
        owner = validate.owner(owner)
        validate.text(run_id, "run_id", optional=False, max_len=256)
        if "/" in run_id:
            raise ValueError(f"run_id: {run_id!r} must not contain '/'")
        low = f"{validate.TINKER_SCHEME}{run_id}/"
        high = low[:-1] + chr(ord("/") + 1)  # a range scan on the tinker_path index
        stmt = q.REVISION.where(q.o.name == owner, q.r.tinker_path >= low, q.r.tinker_path < high).order_by(
            q.r.id.desc()
        )
        now = self._clock()
        newest: dict[str, Revision] = {}
        with self.db.read() as conn:
            for row in conn.execute(stmt):
                newest.setdefault(row.tinker_path, q.revision_from_row(row))
        live = [
            rev
            for rev in newest.values()
            if rev.deleted_at is None and (rev.expires_at is None or rev.expires_at > now)
        ]
        return sorted(live, key=lambda rev: rev.id)

    def register_revision(
        self,
        owner: str,
        adapter: str,
        content_hash: str,
        kind: RevisionKind | str,
        *,
        provenance: Provenance,
        parents: Iterable[str] = (),
        tinker_path: str | None = None,
        ttl_seconds: int | None = None,
        size_bytes: int | None = None,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        actor: str | None = None,
    ) -> Revision:
        """Record one saved adapter as its adapter's next revision (the adapter is created on first save).

        The bytes must already be durable in the blob store under `content_hash`: a revision is
        acknowledged once this commits. `tinker_path`, if given, must be free (no live revision of this
        owner holds it) unless `overwrite`; then the new revision takes the path over and the old one
        stays addressable by number.
        """
        owner, actor = _who(owner, actor)
        new = NewRevision(
            adapter=adapter,
            content_hash=content_hash,
            kind=kind,
            provenance=provenance,
            parents=tuple(parents),
            tinker_path=tinker_path,
            ttl_seconds=ttl_seconds,
            size_bytes=size_bytes,
            metadata={} if metadata is None else metadata,
        )
        values = validate.revision_values(new)
        values["created_by"] = values["created_by"] or actor
        now = self._clock()
        with self.db.write() as conn:
            oid = writes.owner_id(conn, owner, create=True, now=now, actor=actor)
            arow, _ = writes.adapter(conn, oid, owner, adapter, create=True, now=now, actor=actor)
            parent_rows = bulk.parent_rows(conn, owner, [new.parents], now)[0]
            if tinker_path is not None and not overwrite:
                bulk.check_paths_free(conn, oid, [tinker_path], now)
            number = writes.next_number(conn, arow.id)
            expires_at = None if ttl_seconds is None else now + ttl_seconds
            row = {"adapter_id": arow.id, "number": number, "created_at": now, "expires_at": expires_at}
            rid = conn.execute(insert(q.revisions), {**values, **row}).inserted_primary_key[0]
            if parent_rows:
                links = [
                    {"child_id": rid, "parent_id": p.id, "position": i} for i, p in enumerate(parent_rows)
                ]
                conn.execute(insert(q.parents), links)
            writes.audit(
                conn,
                at=now,
                owner_id=oid,
                adapter_id=arow.id,
                actor=actor,
                action="revision.register",
                subject=f"{owner}/{adapter}@{number}",
                encoded=bulk.register_details(values, expires_at, parent_rows),
            )
            return q.revision_from_row(conn.execute(q.BY_ID, {"owner": owner, "id": rid}).one())

    def register_revisions_bulk(
        self, owner: str, rows: Iterable[NewRevision], *, batch_size: int = 10_000, actor: str | None = None
    ) -> int:
        """Register many revisions (imports, migrations, benchmarks); returns how many.

        Same checks, numbering and audit rows as `register_revision` (one audit row per revision), done
        with multi-row statements, one transaction per `batch_size` rows: a failing batch leaves the
        batches before it committed. Tinker paths must be free (no overwrite); parents must name
        revisions registered before the batch.
        """
        owner, actor = _who(owner, actor)
        validate.limit(batch_size, "batch_size", maximum=1_000_000)
        total = 0
        for chunk in batched(rows, batch_size):
            checked = []
            encode = validate.JsonMemo()
            for i, new in enumerate(chunk, start=total):
                try:
                    values = validate.revision_values(new, encode)
                except ValueError as exc:
                    raise ValueError(f"rows[{i}].{exc}") from None
                values["created_by"] = values["created_by"] or actor
                checked.append((new, values))
            with self.db.write() as conn:
                bulk.register(conn, owner, checked, now=self._clock(), actor=actor)
            total += len(chunk)
        return total

    def set_ttl(self, owner: str, ref: str, ttl_seconds: int | None, *, actor: str | None = None) -> Revision:
        """Expire the revision `ttl_seconds` from now (3600 s to 10 years), or never (None)."""
        owner, actor = _who(owner, actor)
        ttl = validate.ttl(ttl_seconds)
        parsed = refs.parse(ref, owner)
        now = self._clock()
        with self.db.write() as conn:
            row = q.find_revision(conn, owner, parsed, now, ref, lock=True)
            expires_at = None if ttl is None else now + ttl
            writes.update_lifecycle(conn, [row.id], expires_at=expires_at)
            _audit_revision(conn, row, now, actor, "revision.set_ttl", ttl_seconds=ttl, expires_at=expires_at)
            return q.revision_from_row(conn.execute(q.BY_ID, {"owner": owner, "id": row.id}).one())

    def delete_revision(self, owner: str, ref: str, *, actor: str | None = None) -> Revision:
        """Tombstone a revision: it stops resolving and its bytes become collectable. Refused while an
        alias points at it."""
        owner, actor = _who(owner, actor)
        parsed = refs.parse(ref, owner)
        now = self._clock()
        with self.db.write() as conn:
            row = q.find_revision(conn, owner, parsed, now, ref, lock=True)
            held = conn.execute(_HELD_BY, {"revision_id": row.id}).scalars().all()
            if held:
                raise CatalogConflict(
                    f"ref: {q.revision_from_row(row).ref} is the target of alias(es) "
                    f"{', '.join(sorted(held))}; move them first"
                )
            writes.update_lifecycle(conn, [row.id], deleted_at=now)
            _audit_revision(conn, row, now, actor, "revision.delete")
            return q.revision_from_row(conn.execute(q.BY_ID, {"owner": owner, "id": row.id}).one())

    def delete_adapter(self, owner: str, name: str, *, actor: str | None = None) -> list[str]:
        """Erase an adapter's content: tombstone every live revision and drop its aliases with their move
        history (the privacy path of a δ-mem instance, whose states encode what a user wrote). Returns
        the content hashes it tombstoned; the caller deletes the blobs no live revision still uses. The
        name, its numbering and the audit log stay."""
        owner, actor = _who(owner, actor)
        validate.name(name, "name")
        now = self._clock()
        al = q.aliases.c
        with self.db.write() as conn:
            arow = _adapter_row(conn, owner, name)
            held = select(al.id).where(al.adapter_id == arow.id)
            conn.execute(delete(q.moves).where(q.moves.c.alias_id.in_(held)))
            conn.execute(delete(q.aliases).where(al.adapter_id == arow.id))
            live = select(q.r.id, q.r.content_hash).where(q.r.adapter_id == arow.id, q.r.deleted_at.is_(None))
            rows = conn.execute(live).all()
            if rows:
                writes.update_lifecycle(conn, [row.id for row in rows], deleted_at=now)
            writes.audit(
                conn,
                at=now,
                owner_id=arow.owner_id,
                adapter_id=arow.id,
                actor=actor,
                action="adapter.delete",
                subject=f"{owner}/{name}",
                revisions=len(rows),
            )
        return sorted({row.content_hash for row in rows})

    # evaluations ------------------------------------------------------------------------------------

    def add_evaluation(
        self,
        owner: str,
        ref: str,
        suite: str,
        metric: str,
        value: float,
        *,
        dataset_fingerprint: str | None = None,
        evaluator: str | None = None,
        metadata: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> Evaluation:
        owner, actor = _who(owner, actor)
        parsed = refs.parse(ref, owner)
        values = {
            "suite": validate.text(suite, "suite", optional=False, max_len=128),
            "metric": validate.text(metric, "metric", optional=False, max_len=128),
            "value": validate.finite(value, "value"),
            "dataset_fingerprint": validate.text(dataset_fingerprint, "dataset_fingerprint"),
            "evaluator": validate.text(evaluator, "evaluator"),
        }
        encoded = validate.json_object({} if metadata is None else metadata, "metadata")
        now = self._clock()
        with self.db.write() as conn:
            row = q.find_revision(conn, owner, parsed, now, ref, lock=True)
            eid = conn.execute(
                insert(q.evaluations),
                {"revision_id": row.id, "created_at": now, "metadata": encoded, **values},
            ).inserted_primary_key[0]
            _audit_revision(conn, row, now, actor, "evaluation.add", id=eid, **values)
            found = conn.execute(select(*q.EVALUATION_COLUMNS).where(q.evaluations.c.id == eid)).one()
            return q.evaluation_from_row(found, q.revision_from_row(row).ref)

    def evaluations(
        self, owner: str, ref: str, *, suite: str | None = None, metric: str | None = None
    ) -> list[Evaluation]:
        owner = validate.owner(owner)
        parsed = refs.parse(ref, owner)
        e = q.evaluations.c
        stmt = select(*q.EVALUATION_COLUMNS)
        if suite is not None:
            stmt = stmt.where(e.suite == validate.text(suite, "suite", max_len=128))
        if metric is not None:
            stmt = stmt.where(e.metric == validate.text(metric, "metric", max_len=128))
        with self.db.read() as conn:
            rev = q.revision_from_row(q.find_revision(conn, owner, parsed, self._clock(), ref))
            rows = conn.execute(stmt.where(e.revision_id == rev.id).order_by(e.id))
            return [q.evaluation_from_row(row, rev.ref) for row in rows]

    # aliases ----------------------------------------------------------------------------------------

    def promote(
        self,
        owner: str,
        adapter: str,
        alias: str,
        ref: str | int,
        *,
        gate: Gate | None = None,
        expect: int | None = None,
        actor: str | None = None,
    ) -> Alias:
        """Point `adapter:alias` at a revision of that adapter (the alias is created on first promote).

        `ref` may be relative to the adapter (`3`, `@3`, `:canary`) or a full ref. With a gate, some
        evaluation of the target must reach the threshold, else CatalogConflict. With `expect` (a
        revision number), the alias must point there now, else CatalogConflict: a compare-and-swap for
        writers on several replicas (a δ-mem instance's `live`). Promoting to the current target changes
        and records nothing.
        """
        owner, actor = _who(owner, actor)
        validate.name(adapter, "adapter")
        validate.name(alias, "alias")
        target = _relative(adapter, ref)
        parsed = refs.parse(target, owner)
        if gate is not None:
            _check_gate(gate)
        now = self._clock()
        with self.db.write() as conn:
            arow = _adapter_row(conn, owner, adapter)
            row = q.find_revision(conn, owner, parsed, now, target, lock=True)
            if expect is not None:
                aliases.expect(conn, adapter=arow, alias=alias, number=validate.count(expect, "expect"))
            return aliases.promote(
                conn, owner=owner, adapter=arow, alias=alias, target=row, gate=gate, now=now, actor=actor
            )

    def rollback(self, owner: str, adapter: str, alias: str, *, actor: str | None = None) -> Alias:
        """Return the alias to its target before its newest not-yet-undone promote. Repeated rollbacks
        walk back through the promotions; with none left, CatalogConflict."""
        owner, actor = _who(owner, actor)
        validate.name(adapter, "adapter")
        validate.name(alias, "alias")
        now = self._clock()
        with self.db.write() as conn:
            arow = _adapter_row(conn, owner, adapter)
            return aliases.rollback(conn, owner=owner, adapter=arow, alias=alias, now=now, actor=actor)

    # audit and housekeeping -------------------------------------------------------------------------

    def audit(
        self, owner: str, *, adapter: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[AuditEntry]:
        """The owner's audit rows newest first, optionally for one adapter; page with `before` = last id."""
        owner = validate.owner(owner)
        log = q.audit_log.c
        stmt = (
            select(*q.AUDIT_COLUMNS)
            .select_from(q.audit_log.join(q.owners))
            .where(q.o.name == owner)
            .order_by(log.id.desc())
            .limit(validate.limit(limit))
        )
        if before is not None:
            stmt = stmt.where(log.id < validate.count(before, "before"))
        with self.db.read() as conn:
            if adapter is not None:
                validate.name(adapter, "adapter")
                stmt = stmt.where(log.adapter_id == _adapter_row(conn, owner, adapter).id)
            return [q.audit_from_row(row) for row in conn.execute(stmt)]

    def expire(self, *, batch: int = 1000) -> int:
        """System housekeeping (not owner-scoped; never expose to users): tombstone every revision past
        its TTL that no alias points at, with an audit row each; returns how many. Expired revisions
        already fail to resolve; this makes their bytes collectable and records it."""
        now = self._clock()
        stmt = (
            q.REVISION.where(
                q.r.deleted_at.is_(None),
                q.r.expires_at <= now,
                ~exists().where(q.aliases.c.revision_id == q.r.id),
            )
            .order_by(q.r.id)
            .limit(batch)
        )
        total = 0
        while True:
            with self.db.write() as conn:
                rows = conn.execute(stmt).all()
                if not rows:
                    return total
                writes.update_lifecycle(conn, [row.id for row in rows], deleted_at=now)
                for row in rows:
                    _audit_revision(conn, row, now, TTL_ACTOR, "revision.expire")
            total += len(rows)

    def referenced_hashes(self, candidates: Iterable[str] | None = None) -> set[str]:
        """System call for the blob GC (not owner-scoped): content hashes some non-deleted revision still
        uses. With `candidates`, only those among them (memory bounded by the candidates); without, all
        of them. Run `expire()` first so expired revisions stop counting. A blob must be written before
        its revision is registered, so the GC should also spare blobs younger than a grace period."""
        with self.db.read() as conn:
            if candidates is None:
                stmt = select(q.r.content_hash).where(q.r.deleted_at.is_(None)).distinct()
                return set(conn.execute(stmt).scalars())
            wanted = set(candidates)
            return {sha for chunk in batched(wanted, 500) for sha in _live(conn, chunk) if sha in wanted}

    @contextmanager
    def hold_blob(self, sha: str) -> Iterator[None]:
        """Keep every replica's collector off `sha` while it is stored and then registered."""
        with self.db.blob_lock(sha, exclusive=False):
            yield

    @contextmanager
    def claim_blob(self, sha: str) -> Iterator[bool]:
        """For the blob collector (`Blobs.gc`'s claim): True, with the lock held, when no live revision
        references `sha` and no save holds it; False (skip it this time) otherwise."""
        with self.db.blob_lock(sha, exclusive=True) as conn:
            yield conn is not None and sha not in _live(conn, [sha])


def _live(conn: Connection, hashes: list[str]) -> set[str]:
    """Live content hashes sharing an indexed prefix with one of `hashes` (a superset of the live ones
    among them)."""
    return set(conn.execute(_LIVE_BY_PREFIX, {"prefixes": sorted({h[:8] for h in hashes})}).scalars())


def _who(owner: str, actor: str | None) -> tuple[str, str]:
    owner = validate.owner(owner)
    return owner, owner if actor is None else validate.text(actor, "actor", optional=False)


def _adapter_row(conn: Connection, owner: str, name: str) -> Row:
    row = conn.execute(q.ADAPTER_BY_NAME, {"owner": owner, "adapter": name}).first()
    if row is None:
        raise CatalogNotFound(f"adapter: {name!r} not found")
    return row


def _audit_revision(conn: Connection, row: Row, now: float, actor: str, action: str, **details: Any) -> None:
    writes.audit(
        conn,
        at=now,
        owner_id=q.owner_pk(row),
        adapter_id=q.adapter_pk(row),
        actor=actor,
        action=action,
        subject=q.revision_from_row(row).ref,
        **details,
    )


def _relative(adapter: str, ref: str | int) -> str:
    """Promote's target: `3` / `"3"` / `"@3"` / `":canary"` are relative to the adapter."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        return f"{adapter}@{ref}"
    if isinstance(ref, str) and ref.isdigit():
        return f"{adapter}@{ref}"
    if isinstance(ref, str) and ref[:1] in ("@", ":"):
        return adapter + ref
    return ref


def _check_gate(gate: Gate) -> None:
    if not isinstance(gate, Gate):
        raise ValueError("gate: must be a Gate(suite, metric, threshold)")
    validate.text(gate.suite, "gate.suite", optional=False, max_len=128)
    validate.text(gate.metric, "gate.metric", optional=False, max_len=128)
    validate.finite(gate.threshold, "gate.threshold")
