"""Patients, identifier sequences, the study/series/instance index and storage intents.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("name", sa.String(324), nullable=False),
        sa.Column("birth_date", sa.String(8), nullable=False),
        sa.Column("sex", sa.String(1), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("phone", sa.String(64), nullable=False),
        sa.Column("synthetic", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),
    )
    op.create_index("ix_patients_patient_id", "patients", ["patient_id"])
    op.create_index("ix_patients_name", "patients", ["name"])
    op.create_table(
        "sequences",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("next_value", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_pk", sa.Integer(), sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_id", sa.String(16), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.Column("referring_physician_name", sa.String(324), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_studies_patient_pk", "studies", ["patient_pk"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "study_pk",
            sa.Integer(),
            sa.ForeignKey("studies.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("body_part_examined", sa.String(16), nullable=False),
    )
    op.create_index("ix_series_study_pk", "series", ["study_pk"])
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "series_pk",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_ae", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.create_table(
        "storage_intents",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
    )


def downgrade() -> None:
    for table in ("storage_intents", "instances", "series", "studies", "sequences", "patients"):
        op.drop_table(table)
