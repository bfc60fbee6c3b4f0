"""revision kind `memory`: the states of δ-mem instances, committed by serving

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _kinds(kinds: str) -> None:
    # On SQLite batch mode rebuilds the table from its reflection, which cannot see an expression index
    # (it would be lost, with a warning): drop it first and make it again after
    op.drop_index("ix_revisions_content_hash_prefix", table_name="revisions")
    with op.batch_alter_table("revisions") as batch:
        batch.drop_constraint(op.f("ck_revisions_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_revisions_kind"), f"kind IN ({kinds})")
    op.create_index("ix_revisions_content_hash_prefix", "revisions", [sa.text("substr(content_hash, 1, 8)")])


def upgrade() -> None:
    _kinds("'sampler', 'state', 'external', 'memory'")


def downgrade() -> None:
    _kinds("'sampler', 'state', 'external'")
