"""Storage Commitment: transactions asked of us and by us, with their instances.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commitments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("transaction_uid", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(3), nullable=False),
        sa.Column("peer_ae", sa.String(16), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False, server_default=""),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(512), nullable=False, server_default=""),
        sa.Column("leased_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("reported_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "ix_commitments_direction_transaction", "commitments", ["direction", "transaction_uid"], unique=True
    )
    op.create_table(
        "commitment_items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "commitment_pk",
            sa.Integer(),
            sa.ForeignKey("commitments.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, server_default="", index=True),
        sa.Column("failure_reason", sa.Integer()),
        sa.Column("route_job_pk", sa.Integer()),
    )


def downgrade() -> None:
    op.drop_table("commitment_items")
    op.drop_table("commitments")
