"""Anonymizing proxies: each proxy's key check, and what each de-identified instance was.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proxy_keys",
        sa.Column("proxy", sa.String(64), primary_key=True),
        sa.Column("check_value", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "proxy_records",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("proxy", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("original_file", sa.String(512), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("proxy", "sop_instance_uid", name="uq_proxy_records_instance"),
    )


def downgrade() -> None:
    op.drop_table("proxy_records")
    op.drop_table("proxy_keys")
