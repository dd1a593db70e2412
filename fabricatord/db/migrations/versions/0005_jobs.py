"""Durable jobs: acquisitions (the simulated modality's work) and route jobs (instances to peers).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _text(name: str, length: int) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.String(length), nullable=False)


def _timestamp(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "acquisitions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "step_pk",
            sa.Integer(),
            sa.ForeignKey("scheduled_steps.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        _text("policy", 16),
        _text("state", 16),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _text("last_error", 512),
        _text("study_instance_uid", 64),
        _text("performed_step_uid", 64),
        sa.Column("instances", sa.Integer(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
    )
    op.create_index("ix_acquisitions_state", "acquisitions", ["state"])
    op.create_index("ix_acquisitions_due_at", "acquisitions", ["due_at"])
    op.create_table(
        "route_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        _text("sop_instance_uid", 64),
        _text("study_instance_uid", 64),
        _text("peer", 64),
        _text("route", 64),
        _text("state", 16),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        _text("last_error", 512),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
    )
    op.create_index("ix_route_jobs_study_instance_uid", "route_jobs", ["study_instance_uid"])
    op.create_index("ix_route_jobs_state_next_attempt_at", "route_jobs", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("route_jobs")
    op.drop_table("acquisitions")
