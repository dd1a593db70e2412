"""Modality Performed Procedure Steps received by N-CREATE and N-SET.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _text(name: str, length: int) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.String(length), nullable=False)


def upgrade() -> None:
    op.create_table(
        "performed_steps",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        _text("status", 16),
        _text("calling_ae", 16),
        _text("performed_station_ae", 16),
        _text("modality", 16),
        _text("study_instance_uid", 64),
        _text("accession_number", 16),
        _text("sps_ids", 512),
        _text("started", 14),
        _text("ended", 14),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    for column in ("status", "study_instance_uid", "accession_number"):
        op.create_index(f"ix_performed_steps_{column}", "performed_steps", [column])


def downgrade() -> None:
    op.drop_table("performed_steps")
