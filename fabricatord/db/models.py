"""The tables, typed. Each table has one owner module in this package.

Columns that hold a DICOM attribute name its tag, VR and VM, so that the mapping between the
index and the standard is read here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """Owner: `fabricatord.db.patients`."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))  # (0010,0020) Patient ID | LO, 1
    issuer: Mapped[str] = mapped_column(String(64), default="")  # (0010,0021) Issuer of Patient ID | LO, 1
    name: Mapped[str] = mapped_column(String(324), index=True)  # (0010,0010) Patient's Name | PN, 1
    birth_date: Mapped[str] = mapped_column(String(8), default="")  # (0010,0030) Patient's Birth Date | DA, 1
    sex: Mapped[str] = mapped_column(String(1), default="")  # (0010,0040) Patient's Sex | CS, 1
    address: Mapped[str] = mapped_column(String(64), default="")  # (0010,1040) Patient's Address | LO, 1
    phone: Mapped[str] = mapped_column(String(64), default="")  # (0010,2154) Patient's Telephone Numbers | SH, 1-n
    synthetic: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Sequence(Base):
    """Owner: `fabricatord.db.sequences`. One persisted counter per generated identifier."""

    __tablename__ = "sequences"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_value: Mapped[int] = mapped_column(BigInteger)


class Study(Base):
    """Owner: `fabricatord.db.index`."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0020,000D) | UI, 1
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)  # (0008,0020) | DA, 1
    study_time: Mapped[str] = mapped_column(String(16), default="")  # (0008,0030) | TM, 1
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0008,0050) | SH, 1
    study_id: Mapped[str] = mapped_column(String(16), default="")  # (0020,0010) | SH, 1
    study_description: Mapped[str] = mapped_column(String(64), default="")  # (0008,1030) | LO, 1
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")  # (0008,0090) | PN, 1
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """Owner: `fabricatord.db.index`."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0020,000E) | UI, 1
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0008,0060) | CS, 1
    series_number: Mapped[int | None] = mapped_column(Integer)  # (0020,0011) | IS, 1
    series_description: Mapped[str] = mapped_column(String(64), default="")  # (0008,103E) | LO, 1
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")  # (0018,0015) | CS, 1

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """Owner: `fabricatord.db.index`. `path` is relative to `data_dir/storage`."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0008,0018) | UI, 1
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))  # (0008,0016) | UI, 1
    instance_number: Mapped[int | None] = mapped_column(Integer)  # (0020,0013) | IS, 1
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))  # (0002,0010) | UI, 1
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the file: a resent identical instance is recognised without reading it."""
    source: Mapped[str] = mapped_column(String(16))  # generated | received
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    series: Mapped[Series] = relationship(back_populates="instances")


class StorageIntent(Base):
    """Owner: `fabricatord.db.index`. A file about to be renamed into storage.

    Committed before the rename and deleted with the index row's commit: after a crash, an
    intent that is still here names a final file that may lack its row, and recovery settles it.
    """

    __tablename__ = "storage_intents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))


Index("ix_patients_patient_id", Patient.patient_id)
