"""The catalog schema. `migrations/versions/` must produce exactly this (a test compares them).

Dialect-neutral on purpose: the same tables run on SQLite (default, one machine) and PostgreSQL (several
nodes). Hence: times are unix seconds in DOUBLE columns (no timezone-lossy SQLite DATETIME), enums are
strings with CHECK constraints (no native ENUM types to migrate), JSON is JSON (JSONB on PostgreSQL).

Revisions are immutable. They are never updated except their two lifecycle columns (`expires_at` via
set_ttl, `deleted_at` via delete/expire) and never removed: a delete is a tombstone, so lineage stays
complete, revision numbers are never reused, and the audit log's refs keep pointing at real rows.
`audit_log` is append-only. The guards at the bottom enforce both for anyone using these classes through
an ORM session; the catalog itself writes through Core and has no update path for other columns.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT ids on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the auto-assigned rowid.
Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
ShortText = String(512)

KINDS = ("sampler", "state", "external", "memory")
MOVES = ("promote", "rollback")
REVISION_LIFECYCLE_COLUMNS = frozenset({"expires_at", "deleted_at"})
HAS_TTL = text("expires_at IS NOT NULL")
HASH_PREFIX_SQL = "substr(content_hash, 1, 8)"  # literal, so both databases match queries to the index


class Base(DeclarativeBase):
    # Named constraints, so later migrations can drop or alter them on both dialects.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Owner(Base):
    __tablename__ = "owners"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Double)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Double)
    # The last revision number handed out. Bumped with UPDATE ... RETURNING, which takes the row lock
    # on PostgreSQL, so concurrent saves to one adapter get consecutive numbers without retries.
    last_number: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", Json)


class Revision(Base):
    __tablename__ = "revisions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),  # also serves "newest live revision" (backward scan)
        CheckConstraint(f"kind IN {KINDS}", name="kind"),
        Index(None, "tinker_path"),  # not unique: an overwrite=True save shadows the older revision
        # Blob GC: is this hash still referenced? An index of its first 8 hex digits (not the whole
        # 64) is a quarter of the size, which keeps bulk registration fast at 10^7 revisions.
        Index("ix_revisions_content_hash_prefix", text(HASH_PREFIX_SQL)),
        # TTL sweep. Partial: most revisions never expire and should not pay for an index entry.
        Index(None, "expires_at", sqlite_where=HAS_TTL, postgresql_where=HAS_TTL),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    base_fingerprint: Mapped[str] = mapped_column(ShortText)
    base_model: Mapped[str | None] = mapped_column(ShortText)
    lora_config: Mapped[dict[str, Any]] = mapped_column(Json)
    training_run_id: Mapped[str | None] = mapped_column(ShortText)
    step: Mapped[int | None] = mapped_column(BigInteger)
    loss_fn: Mapped[str | None] = mapped_column(ShortText)
    optimizer: Mapped[dict[str, Any] | None] = mapped_column(Json)
    data_fingerprint: Mapped[str | None] = mapped_column(ShortText)
    created_by: Mapped[str] = mapped_column(ShortText)
    created_at: Mapped[float] = mapped_column(Double)
    tinker_path: Mapped[str | None] = mapped_column(String(1024))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", Json)
    expires_at: Mapped[float | None] = mapped_column(Double)  # lifecycle: set_ttl
    deleted_at: Mapped[float | None] = mapped_column(Double)  # lifecycle: tombstone


class RevisionParent(Base):
    """Lineage edges: a revision made from others (resumed state, merged or distilled adapters)."""

    __tablename__ = "revision_parents"

    child_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # order the parents were given in


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"), Index(None, "revision_id"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    name: Mapped[str] = mapped_column(String(128))
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"))
    updated_at: Mapped[float] = mapped_column(Double)


class AliasMove(Base):
    """Every alias move, append-only, in id order per alias.

    A rollback reverts the newest promote not yet reverted (`reverts_id` names it) and returns the alias
    to that promote's `from_revision_id`; so repeated rollbacks walk back through the promotions.
    """

    __tablename__ = "alias_moves"
    __table_args__ = (Index(None, "alias_id", "id"), CheckConstraint(f"action IN {MOVES}", name="action"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    alias_id: Mapped[int] = mapped_column(ForeignKey("aliases.id"))
    action: Mapped[str] = mapped_column(String(16))
    from_revision_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    to_revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"))
    reverts_id: Mapped[int | None] = mapped_column(ForeignKey("alias_moves.id"), unique=True)
    at: Mapped[float] = mapped_column(Double)
    actor: Mapped[str] = mapped_column(ShortText)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (Index(None, "revision_id", "suite", "metric"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"))
    suite: Mapped[str] = mapped_column(String(128))
    metric: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Double)
    dataset_fingerprint: Mapped[str | None] = mapped_column(ShortText)
    evaluator: Mapped[str | None] = mapped_column(ShortText)
    created_at: Mapped[float] = mapped_column(Double)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", Json)


class AuditLog(Base):
    """Append-only: one row per mutation, written in the mutation's own transaction."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "owner_id", "id"), Index(None, "adapter_id", "id"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[float] = mapped_column(Double)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    actor: Mapped[str] = mapped_column(ShortText)
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(1024))
    details: Mapped[dict[str, Any]] = mapped_column(Json)


class Replica(Base):
    """A `mintd serve` process sharing this catalog. Its heartbeat is the lease on every run it holds."""

    __tablename__ = "replicas"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(String(1024))
    started_at: Mapped[float] = mapped_column(Double)
    heartbeat_at: Mapped[float] = mapped_column(Double)


class TrainingRun(Base):
    """A Tinker training run: who owns it, what it trains, and which replica holds its live adapter
    (`replica`, cleared when the run is unloaded). Outlives the process, for the REST views."""

    __tablename__ = "training_runs"
    __table_args__ = (Index(None, "owner", "id"),)

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    replica: Mapped[str | None] = mapped_column(String(128))
    record: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[float] = mapped_column(Double)


@event.listens_for(Revision, "before_update")
def _revision_is_immutable(_mapper: Any, _conn: Any, target: Revision) -> None:
    changed = {a.key for a in inspect(target).attrs if a.history.has_changes()}
    if changed - REVISION_LIFECYCLE_COLUMNS:
        raise PermissionError(
            f"revisions are immutable; cannot change {sorted(changed - REVISION_LIFECYCLE_COLUMNS)}"
        )


@event.listens_for(AuditLog, "before_update")
@event.listens_for(AuditLog, "before_delete")
def _audit_is_append_only(_mapper: Any, _conn: Any, _target: AuditLog) -> None:
    raise PermissionError("audit_log is append-only")
