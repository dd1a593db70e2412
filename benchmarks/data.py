"""Benchmark data, made once under var/bench-data and reused: the same studies and worklist items
go to every server, as files for the peers and, where a scenario needs a large index fast, as rows
straight into a fresh fabricatord database."""

from __future__ import annotations

import os
import subprocess
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from benchmarks.peers import PYTHON, ROOT

DATA = ROOT / "var" / "bench-data"
UID_BASE = "1.2.826.0.1.3680043.10.1438.9"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MWL_FIND = "1.2.840.10008.5.1.4.31"
SURNAMES = [
    "SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES", "ROBINSON", "WRIGHT",
    "THOMPSON", "EVANS", "WALKER", "WHITE", "ROBERTS", "GREEN", "HALL", "WOOD", "JACKSON", "CLARKE",
    "PATEL", "KHAN", "LEWIS", "JAMES", "PHILLIPS", "MASON", "MITCHELL", "ROSE", "DAVIS", "RODRIGUEZ",
    "COX", "ALEXANDER", "MORGAN", "MOORE", "MARTIN", "PRICE", "KING", "HUGHES", "TURNER", "BAKER",
    "EDWARDS", "HILL", "COOPER", "WARD", "YOUNG", "ALLEN", "HARRIS", "SCOTT", "CLARK", "LEE",
]  # fmt: skip
GIVEN = ["JOHN", "MARY", "ALEX", "SARA", "PAUL", "ANNA", "MARK", "LISA", "OMAR", "NINA", "IVAN"]
WORKLIST_DAY = "20250115"
WORKLIST_STATION = "CT01"


def ct_study(images: int = 500) -> list[Path]:
    """A CT study of 512×512 slices made by fabricatord's own generator (about 0.5 MB each)."""
    folder = DATA / f"ct{images}"
    if not folder.exists():
        subprocess.run(
            [PYTHON, "-m", "fabricatord", "generate", "--modality", "CT", "--series", "1", "--images", str(images),
             "--out", str(folder)],
            check=True,
            cwd=ROOT,
            env={**os.environ, "FABRICATORD_CONFIG": "", "FABRICATORD__NODE__DATA_DIR": str(DATA / "generator"),
                 "FABRICATORD__SYNTH__SEED": "7"},
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return sorted(folder.rglob("*.dcm"))


def study(index: int) -> dict[str, Any]:
    """Study `index` of the synthetic archive: five studies per patient, dates over two years."""
    patient = index // 5
    # The first 8 patients (40 studies) are the only ZELLERs, the first 100 studies the only ones
    # of December 2022: the name and date queries match as many at 1,000 studies as at 100,000.
    surname = "ZELLER" if patient < 8 else SURNAMES[patient % len(SURNAMES)]
    day = (
        date(2022, 12, 1) + timedelta(days=index % 31)
        if index < 100
        else date(2023, 1, 1) + timedelta(days=index * 7919 % 730)
    )
    return {
        "patient_id": f"BP{patient:06d}",
        "patient_name": f"{surname}^{GIVEN[patient % len(GIVEN)]}",
        "birth_date": f"19{40 + patient % 60:02d}0{1 + patient % 9}15",
        "sex": "MF"[patient % 2],
        "study_uid": f"{UID_BASE}.{index + 1}",
        "series_uid": f"{UID_BASE}.{index + 1}.1",
        "sop_uid": f"{UID_BASE}.{index + 1}.1.1",
        "study_date": day.strftime("%Y%m%d"),
        "accession": f"BA{index:08d}",
    }


# The study queries every C-FIND target answers, with the matches they must return at `count` studies.
def find_queries(count: int) -> dict[str, tuple[dict[str, str], int]]:
    return {
        "PatientID": ({"PatientID": "BP000050"}, min(5, max(0, count - 250))),
        "name wildcard": ({"PatientName": "ZEL*"}, min(40, count)),
        "date range": ({"StudyDate": "20221201-20221231"}, min(100, count)),
    }


def small_studies(count: int) -> list[Path]:
    """`count` one-instance CT studies of 64×64 pixels (about 10 KB each)."""
    folder = DATA / f"studies{count}"
    files = sorted(folder.glob("*.dcm")) if folder.exists() else []
    if len(files) == count:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    for index in range(count):
        values = study(index)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.file_meta.MediaStorageSOPInstanceUID = values["sop_uid"]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, values["sop_uid"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = values["study_uid"], values["series_uid"]
        ds.PatientName, ds.PatientID = values["patient_name"], values["patient_id"]
        ds.PatientBirthDate, ds.PatientSex = values["birth_date"], values["sex"]
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = values["study_date"], "101500", values["accession"]
        ds.StudyID, ds.StudyDescription, ds.ReferringPhysicianName = "1", "CT HEAD", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        ds.save_as(folder / f"{index:06d}.dcm", enforce_file_format=True)
    return sorted(folder.glob("*.dcm"))


def index_studies(database_url: str, count: int) -> None:
    """The index rows of `count` studies straight into a fresh fabricatord database (no files)."""
    from sqlalchemy import insert

    from fabricatord.db import open_database
    from fabricatord.db.models import Instance, Patient, Series, Study

    database = open_database(database_url)
    with database.writer.begin() as connection:
        for start in range(0, count, 5000):
            rows = [study(i) for i in range(start, min(count, start + 5000))]
            connection.execute(
                insert(Patient),
                [{"id": int(r["patient_id"][2:]) + 1, "patient_id": r["patient_id"], "issuer": "",
                  "name": r["patient_name"], "birth_date": r["birth_date"], "sex": r["sex"], "address": "",
                  "phone": "", "synthetic": False} for r in rows[::5]],
            )  # fmt: skip
            connection.execute(
                insert(Study),
                [{"id": start + n + 1, "study_instance_uid": r["study_uid"], "patient_pk": int(r["patient_id"][2:]) + 1,
                  "study_date": r["study_date"], "study_time": "101500", "accession_number": r["accession"],
                  "study_id": "1", "study_description": "CT HEAD", "referring_physician_name": ""}
                 for n, r in enumerate(rows)],
            )  # fmt: skip
            connection.execute(
                insert(Series),
                [{"id": start + n + 1, "series_instance_uid": r["series_uid"], "study_pk": start + n + 1,
                  "modality": "CT", "series_number": 1, "series_description": "", "body_part_examined": ""}
                 for n, r in enumerate(rows)],
            )  # fmt: skip
            connection.execute(
                insert(Instance),
                [{"sop_instance_uid": r["sop_uid"], "series_pk": start + n + 1, "sop_class_uid": CT_IMAGE,
                  "instance_number": 1, "transfer_syntax_uid": str(ExplicitVRLittleEndian),
                  "path": f"{r['study_uid']}/{r['series_uid']}/{r['sop_uid']}.dcm", "size": 10000, "digest": "",
                  "source": "received", "source_ae": "BENCH"} for n, r in enumerate(rows)],
            )  # fmt: skip


def worklist_item(index: int) -> dict[str, str]:
    """Item `index`: ten stations, ten days around WORKLIST_DAY, so 1 % of items match a station and day."""
    return {
        "patient_id": f"WP{index:06d}",
        "patient_name": f"{SURNAMES[index % len(SURNAMES)]}^{GIVEN[index % len(GIVEN)]}",
        "birth_date": f"19{40 + index % 60:02d}0{1 + index % 9}15",
        "sex": "MF"[index % 2],
        "accession": f"WA{index:08d}",
        "procedure_id": f"RP{index:07d}",
        "sps_id": f"SPS{index:07d}",
        "study_uid": f"{UID_BASE}.8.{index + 1}",
        "station": f"CT{index % 10 + 1:02d}",
        "date": f"202501{10 + index // 10 % 10:02d}",
        "time": f"{8 + index % 50 // 6:02d}{index % 6 * 10:02d}00",
    }


def worklist_files(count: int) -> Path:
    """DCMTK's layout: `<folder>/WLMSCP/*.wl` (plus the lockfile wlmscpfs wants); Orthanc reads the same."""
    folder = DATA / f"wl{count}"
    items = folder / "WLMSCP"
    if items.exists() and len(list(items.glob("*.wl"))) == count:
        return folder
    items.mkdir(parents=True, exist_ok=True)
    (items / "lockfile").write_bytes(b"")
    for index in range(count):
        values = worklist_item(index)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MWL_FIND
        ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_BASE}.7.{index + 1}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = values["patient_name"], values["patient_id"]
        ds.PatientBirthDate, ds.PatientSex = values["birth_date"], values["sex"]
        ds.AccessionNumber, ds.ReferringPhysicianName = values["accession"], "REF^DOC"
        ds.RequestedProcedureID, ds.RequestedProcedureDescription = values["procedure_id"], "CT HEAD"
        ds.StudyInstanceUID = values["study_uid"]
        step = Dataset()
        step.ScheduledStationAETitle, step.Modality = values["station"], "CT"
        step.ScheduledProcedureStepStartDate = values["date"]
        step.ScheduledProcedureStepStartTime = values["time"]
        step.ScheduledProcedureStepID, step.ScheduledProcedureStepDescription = values["sps_id"], "CT HEAD"
        step.ScheduledStationName, step.ScheduledProcedureStepLocation = values["station"], "ROOM 1"
        step.ScheduledPerformingPhysicianName, step.ScheduledProcedureStepStatus = "", "SCHEDULED"
        ds.ScheduledProcedureStepSequence = [step]
        ds.save_as(items / f"item{index:06d}.wl", enforce_file_format=True)
    return folder


def index_worklist(database_url: str, count: int) -> None:
    """The same items as `worklist_files`, as rows of a fresh fabricatord database."""
    from sqlalchemy import insert

    from fabricatord.db import open_database
    from fabricatord.db.models import Order, Patient, RequestedProcedure, ScheduledStep
    from fabricatord.db.worklist import start_datetime

    database = open_database(database_url)
    items = [worklist_item(i) for i in range(count)]
    with database.writer.begin() as connection:
        connection.execute(
            insert(Patient),
            [{"id": i + 1, "patient_id": v["patient_id"], "issuer": "", "name": v["patient_name"],
              "birth_date": v["birth_date"], "sex": v["sex"], "address": "", "phone": "", "synthetic": True}
             for i, v in enumerate(items)],
        )  # fmt: skip
        connection.execute(
            insert(Order),
            [{"id": i + 1, "patient_pk": i + 1, "placer_order_number": "", "filler_order_number": "",
              "accession_number": v["accession"], "status": "SCHEDULED", "referring_physician_name": "REF^DOC",
              "requesting_physician": "", "requesting_service": "", "admission_id": "",
              "current_patient_location": "", "source": "cli"} for i, v in enumerate(items)],
        )  # fmt: skip
        connection.execute(
            insert(RequestedProcedure),
            [{"id": i + 1, "order_pk": i + 1, "requested_procedure_id": v["procedure_id"],
              "study_instance_uid": v["study_uid"], "description": "CT HEAD", "code_value": "", "code_scheme": "",
              "code_meaning": "", "priority": ""} for i, v in enumerate(items)],
        )  # fmt: skip
        connection.execute(
            insert(ScheduledStep),
            [{"procedure_pk": i + 1, "sps_id": v["sps_id"], "station_ae": v["station"], "station_name": v["station"],
              "location": "ROOM 1", "modality": "CT", "start_date": v["date"], "start_time": v["time"],
              "start_datetime": start_datetime(v["date"], v["time"]), "performing_physician": "",
              "description": "CT HEAD", "protocol_code_value": "", "protocol_code_scheme": "",
              "protocol_code_meaning": "", "premedication": "", "contrast_agent": "", "status": "SCHEDULED"}
             for i, v in enumerate(items)],
        )  # fmt: skip


def big_instance(gib: float = 1.0) -> Path:
    """One Secondary Capture instance of about `gib` GiB, for the flat-memory check."""
    path = DATA / f"big{gib:g}g.dcm"
    if path.exists():
        return path
    side = int((gib * 2**30 / 2) ** 0.5) // 2 * 2
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_BASE}.6.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", f"{UID_BASE}.6.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{UID_BASE}.6", f"{UID_BASE}.6.1.1"
    ds.PatientName, ds.PatientID, ds.Modality = "BIG^IMAGE", "BIG1", "OT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(side * side * 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
