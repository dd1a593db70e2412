"""HL7 messages kept raw with their ACKs; orders remember their charset and their message.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _text(name: str, length: int) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.String(length), nullable=False)


def upgrade() -> None:
    op.create_table(
        "hl7_messages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        _text("peer", 64),
        _text("sending_application", 227),
        _text("sending_facility", 227),
        _text("control_id", 199),
        _text("message_type", 16),
        _text("version", 16),
        _text("profile", 64),
        _text("outcome", 2),
        _text("error", 512),
        _text("detail", 512),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("ack", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_hl7_messages_received_at", "hl7_messages", ["received_at"])
    op.create_index("ix_hl7_messages_outcome", "hl7_messages", ["outcome"])
    op.create_index(
        "ix_hl7_messages_sender_control_id",
        "hl7_messages",
        ["sending_application", "sending_facility", "control_id"],
    )
    with op.batch_alter_table("orders") as orders:
        orders.add_column(sa.Column("specific_character_set", sa.String(64), nullable=False, server_default=""))
        orders.add_column(sa.Column("hl7_message_pk", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("orders") as orders:
        orders.drop_column("hl7_message_pk")
        orders.drop_column("specific_character_set")
    op.drop_table("hl7_messages")
