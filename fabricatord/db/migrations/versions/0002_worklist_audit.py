"""Orders, requested procedures, scheduled steps (the worklist), worklist fetches and audit events.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _timestamp(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def _text(name: str, length: int) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.String(length), nullable=False)


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_pk", sa.Integer(), sa.ForeignKey("patients.id"), nullable=False),
        _text("placer_order_number", 64),
        _text("filler_order_number", 64),
        _text("accession_number", 16),
        _text("status", 16),
        _text("referring_physician_name", 324),
        _text("requesting_physician", 324),
        _text("requesting_service", 64),
        _text("admission_id", 64),
        _text("current_patient_location", 64),
        _text("source", 16),
        _timestamp("created_at"),
        _timestamp("updated_at"),
    )
    for column in ("patient_pk", "placer_order_number", "filler_order_number", "accession_number"):
        op.create_index(f"ix_orders_{column}", "orders", [column])
    op.create_table(
        "requested_procedures",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("order_pk", sa.Integer(), sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
        _text("requested_procedure_id", 16),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        _text("description", 64),
        _text("code_value", 16),
        _text("code_scheme", 16),
        _text("code_meaning", 64),
        _text("priority", 16),
    )
    op.create_index("ix_requested_procedures_order_pk", "requested_procedures", ["order_pk"])
    op.create_index(
        "ix_requested_procedures_requested_procedure_id", "requested_procedures", ["requested_procedure_id"]
    )
    op.create_table(
        "scheduled_steps",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "procedure_pk",
            sa.Integer(),
            sa.ForeignKey("requested_procedures.id", ondelete="CASCADE"),
            nullable=False,
        ),
        _text("sps_id", 16),
        _text("station_ae", 16),
        _text("station_name", 16),
        _text("location", 16),
        _text("modality", 16),
        _text("start_date", 8),
        _text("start_time", 16),
        _text("start_datetime", 14),
        _text("performing_physician", 324),
        _text("description", 64),
        _text("protocol_code_value", 16),
        _text("protocol_code_scheme", 16),
        _text("protocol_code_meaning", 64),
        _text("premedication", 64),
        _text("contrast_agent", 64),
        _text("status", 16),
        _timestamp("updated_at"),
    )
    for column in ("procedure_pk", "sps_id", "station_ae", "modality", "start_date", "start_datetime", "status"):
        op.create_index(f"ix_scheduled_steps_{column}", "scheduled_steps", [column])
    # A modality asks for its own station's steps of one day: the worklist's commonest query.
    op.create_index("ix_scheduled_steps_start_date_station_ae", "scheduled_steps", ["start_date", "station_ae"])
    op.create_table(
        "worklist_fetches",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("step_pk", sa.Integer(), sa.ForeignKey("scheduled_steps.id", ondelete="CASCADE"), nullable=False),
        _text("calling_ae", 16),
        _timestamp("fetched_at"),
    )
    op.create_index("ix_worklist_fetches_step_pk", "worklist_fetches", ["step_pk"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        _text("association", 16),
        _text("operation", 32),
        _text("calling_ae", 16),
        _text("called_ae", 16),
        _text("peer_address", 64),
        _text("status", 32),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        _text("detail", 256),
    )
    for column in ("at", "association", "operation", "calling_ae"):
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])


def downgrade() -> None:
    for table in ("audit_events", "worklist_fetches", "scheduled_steps", "requested_procedures", "orders"):
        op.drop_table(table)
