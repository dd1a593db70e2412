"""Which HL7 messages touched which orders, by key: `fabricatord trace` read it from the log's
text before. Messages already logged are linked from that text once, here.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hl7_message_orders",
        sa.Column("message_pk", sa.Integer(), sa.ForeignKey("hl7_messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("order_pk", sa.Integer(), sa.ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_hl7_message_orders_order_pk", "hl7_message_orders", ["order_pk"])
    op.execute(
        "INSERT INTO hl7_message_orders (message_pk, order_pk) "
        "SELECT DISTINCT m.id, o.id FROM hl7_messages m JOIN orders o "
        "ON o.hl7_message_pk = m.id OR m.detail LIKE '%order ' || o.accession_number || ' %'"
    )


def downgrade() -> None:
    op.drop_index("ix_hl7_message_orders_order_pk", table_name="hl7_message_orders")
    op.drop_table("hl7_message_orders")
