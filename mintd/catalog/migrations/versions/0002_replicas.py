"""replicas and training runs: several `mintd serve` processes on one catalog; the blob-GC index
covers only a content hash's first 8 hex digits (a quarter of the size, for fast bulk registration)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("url", sa.String(1024), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("heartbeat_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_replicas")),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.String(256), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("replica", sa.String(128), nullable=True),
        sa.Column("record", JSON, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(op.f("ix_training_runs_owner_id"), "training_runs", ["owner", "id"])
    op.drop_index(op.f("ix_revisions_content_hash"), table_name="revisions")
    op.create_index("ix_revisions_content_hash_prefix", "revisions", [sa.text("substr(content_hash, 1, 8)")])


def downgrade() -> None:
    op.drop_index("ix_revisions_content_hash_prefix", table_name="revisions")
    op.create_index(op.f("ix_revisions_content_hash"), "revisions", ["content_hash"])
    op.drop_index(op.f("ix_training_runs_owner_id"), table_name="training_runs")
    op.drop_table("training_runs")
    op.drop_table("replicas")
