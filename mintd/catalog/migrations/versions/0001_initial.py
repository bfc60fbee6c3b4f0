"""initial catalog schema: owners, adapters, revisions, lineage, aliases and their moves, evaluations,
audit log

Written out in full rather than importing models.py: a migration must keep creating the schema of its
own time after the models move on.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
TEXT = sa.String(512)


def _id() -> sa.Column:
    return sa.Column("id", ID, nullable=False)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"))


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*(columns or ("id",)), name=op.f(f"pk_{table}"))


def _index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    op.create_table(
        "owners",
        _id(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        _pk("owners"),
        sa.UniqueConstraint("name", name=op.f("uq_owners_name")),
    )
    op.create_table(
        "adapters",
        _id(),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("last_number", sa.Integer(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        _pk("adapters"),
        _fk("adapters", "owner_id", "owners"),
        sa.UniqueConstraint("owner_id", "name", name=op.f("uq_adapters_owner_id_name")),
        sa.UniqueConstraint("public_id", name=op.f("uq_adapters_public_id")),
    )
    op.create_table(
        "revisions",
        _id(),
        sa.Column("adapter_id", ID, nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("base_fingerprint", TEXT, nullable=False),
        sa.Column("base_model", TEXT, nullable=True),
        sa.Column("lora_config", JSON, nullable=False),
        sa.Column("training_run_id", TEXT, nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("loss_fn", TEXT, nullable=True),
        sa.Column("optimizer", JSON, nullable=True),
        sa.Column("data_fingerprint", TEXT, nullable=True),
        sa.Column("created_by", TEXT, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("tinker_path", sa.String(1024), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.Column("deleted_at", sa.Double(), nullable=True),
        _pk("revisions"),
        _fk("revisions", "adapter_id", "adapters"),
        sa.CheckConstraint("kind IN ('sampler', 'state', 'external')", name=op.f("ck_revisions_kind")),
        sa.UniqueConstraint("adapter_id", "number", name=op.f("uq_revisions_adapter_id_number")),
    )
    _index("revisions", "content_hash")
    has_ttl = sa.text("expires_at IS NOT NULL")  # partial: most revisions never expire
    op.create_index(
        op.f("ix_revisions_expires_at"),
        "revisions",
        ["expires_at"],
        sqlite_where=has_ttl,
        postgresql_where=has_ttl,
    )
    _index("revisions", "tinker_path")
    op.create_table(
        "revision_parents",
        sa.Column("child_id", ID, nullable=False),
        sa.Column("parent_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        _pk("revision_parents", "child_id", "parent_id"),
        _fk("revision_parents", "child_id", "revisions"),
        _fk("revision_parents", "parent_id", "revisions"),
    )
    op.create_table(
        "aliases",
        _id(),
        sa.Column("adapter_id", ID, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("revision_id", ID, nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        _pk("aliases"),
        _fk("aliases", "adapter_id", "adapters"),
        _fk("aliases", "revision_id", "revisions"),
        sa.UniqueConstraint("adapter_id", "name", name=op.f("uq_aliases_adapter_id_name")),
    )
    _index("aliases", "revision_id")
    op.create_table(
        "alias_moves",
        _id(),
        sa.Column("alias_id", ID, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("from_revision_id", ID, nullable=True),
        sa.Column("to_revision_id", ID, nullable=False),
        sa.Column("reverts_id", ID, nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("actor", TEXT, nullable=False),
        _pk("alias_moves"),
        _fk("alias_moves", "alias_id", "aliases"),
        _fk("alias_moves", "from_revision_id", "revisions"),
        _fk("alias_moves", "to_revision_id", "revisions"),
        _fk("alias_moves", "reverts_id", "alias_moves"),
        sa.CheckConstraint("action IN ('promote', 'rollback')", name=op.f("ck_alias_moves_action")),
        sa.UniqueConstraint("reverts_id", name=op.f("uq_alias_moves_reverts_id")),
    )
    _index("alias_moves", "alias_id", "id")
    op.create_table(
        "evaluations",
        _id(),
        sa.Column("revision_id", ID, nullable=False),
        sa.Column("suite", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("dataset_fingerprint", TEXT, nullable=True),
        sa.Column("evaluator", TEXT, nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        _pk("evaluations"),
        _fk("evaluations", "revision_id", "revisions"),
    )
    _index("evaluations", "revision_id", "suite", "metric")
    op.create_table(
        "audit_log",
        _id(),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("adapter_id", ID, nullable=True),
        sa.Column("actor", TEXT, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(1024), nullable=False),
        sa.Column("details", JSON, nullable=False),
        _pk("audit_log"),
        _fk("audit_log", "owner_id", "owners"),
        _fk("audit_log", "adapter_id", "adapters"),
    )
    _index("audit_log", "owner_id", "id")
    _index("audit_log", "adapter_id", "id")


def downgrade() -> None:
    for table in (
        "audit_log",
        "evaluations",
        "alias_moves",
        "aliases",
        "revision_parents",
        "revisions",
        "adapters",
        "owners",
    ):
        op.drop_table(table)
