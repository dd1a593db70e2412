"""Several daemons on one database: the nodes, the leader's lease, leases on jobs, and whose
storage intent is whose.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False, server_default=""),
        sa.Column("pid", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("version", sa.String(32), nullable=False, server_default=""),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    for table in ("acquisitions", "route_jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("leased_by", sa.String(64), nullable=False, server_default=""))
            batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("storage_intents") as batch:
        batch.add_column(sa.Column("node", sa.String(64), nullable=False, server_default=""))
        batch.create_index("ix_storage_intents_node", ["node"])


def downgrade() -> None:
    with op.batch_alter_table("storage_intents") as batch:
        batch.drop_index("ix_storage_intents_node")
        batch.drop_column("node")
    for table in ("route_jobs", "acquisitions"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_until")
            batch.drop_column("leased_by")
    op.drop_table("leases")
    op.drop_table("nodes")
