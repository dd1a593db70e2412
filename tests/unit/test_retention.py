"""Layouts and file names for new files, crash-safe deletion, and what cleanup may delete."""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update

from fabricatord.config.values import parse_duration
from fabricatord.db import InstanceIndex, open_database
from fabricatord.db.jobs import FhirJobs
from fabricatord.db.models import Instance
from fabricatord.dicom.part10 import Part10Encoder
from fabricatord.dicom.storage import InstanceWriter, index_entry, relative_path
from fabricatord.service import with_cleanup
from fabricatord.workflow.fhir import Exports
from tests.helpers import study


def test_each_layout_and_naming_makes_its_path() -> None:
    ds = study("CT", images=2)[1]
    study_uid, series_uid, sop_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    arrived = datetime(2026, 12, 3, 9, 15, 30, 123456)
    assert relative_path(ds, "study", received=arrived) == f"{study_uid}/{sop_uid}.dcm"
    assert relative_path(ds, "received-date", received=arrived) == f"2026/12/03/{study_uid}/{series_uid}/{sop_uid}.dcm"
    assert relative_path(ds, "patient/study/series") == relative_path(ds, "patient")
    assert relative_path(ds, "study/series", "instance-number") == f"{study_uid}/{series_uid}/{ds.InstanceNumber}.dcm"
    assert relative_path(ds, "study", "timestamp", arrived) == f"{study_uid}/20261203091530123456.dcm"
    assert relative_path(ds, "flat", "sequence", number=lambda: 42) == "00000042.dcm"
    # An instance number that is not a number: the SOP Instance UID names the file.
    ds.InstanceNumber = None
    assert relative_path(ds, "study", "instance-number") == f"{study_uid}/{sop_uid}.dcm"


def test_a_taken_name_gets_a_suffix_and_nothing_is_overwritten(database_url: str, tmp_path: Path) -> None:
    """Two series of one study, each with instances 1 and 2, in one folder per study."""
    index = InstanceIndex(open_database(database_url))
    writer = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp", "study", naming="instance-number")
    first = study("CT", images=2, seed=1)
    second = [copy.deepcopy(ds) for ds in first]
    for ds in second:
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".1"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    results = list(writer.write_many(first, "generated")) + list(writer.write_many(second, "generated"))
    names = sorted(result.path.name for result in results)
    assert names == ["1-2.dcm", "1.dcm", "2-2.dcm", "2.dcm"]
    rows = index.lookup(ds.SOPInstanceUID for ds in first + second)
    assert len({row.path for row in rows.values()}) == 4
    # A received file takes the same way: the next free name.
    received = copy.deepcopy(second[0])
    received.SOPInstanceUID = received.SOPInstanceUID + ".7"
    file = tmp_path / "tmp" / "incoming.dcm"
    file.write_bytes(Part10Encoder().encode(received))
    adopted = writer.adopt(file, received, "received")
    assert adopted.path.name == "1-3.dcm" and adopted.outcome == "new"
    assert index.path_indexed(str(adopted.path.relative_to(tmp_path / "storage")))


def test_a_deletion_cut_short_is_finished_by_recovery(tmp_path: Path) -> None:
    """The rows are gone and the intents committed, but the process died before the unlinks."""
    index = InstanceIndex(open_database(f"sqlite:///{tmp_path / 'r.sqlite'}"))
    writer = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp")
    datasets = study("CT", images=3)
    results = list(writer.write_many(datasets, "generated"))
    forgotten = index.forget_study(datasets[0].StudyInstanceUID)
    assert forgotten is not None and len(forgotten.intents) == 3
    assert all(result.path.exists() for result in results)
    report = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp").recover()
    assert report.orphans_removed == 3
    assert not any(result.path.exists() for result in results) and index.intents() == []


def _age(database_url: str, uid: str, days: float) -> None:
    database = open_database(database_url)
    with database.writes.begin() as session:
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == uid)
            .values(created_at=datetime.now(UTC) - timedelta(days=days))
        )


def test_cleanup_deletes_by_age_and_for_the_quota_never_a_young_or_busy_study(
    database_url: str, tmp_path: Path, make_settings: object
) -> None:
    size = len(Part10Encoder().encode(study("CT", images=1, seed=1)[0]))
    settings = make_settings(  # type: ignore[operator]
        f'[dicom]\nretention = "10d"\ncleanup = true\nstorage_quota = "{int(size * 3.5)}"\n', database=database_url
    )
    database = open_database(settings.database_url)
    index = InstanceIndex(database)
    writer = InstanceWriter(index, settings.storage_dir, settings.tmp_dir, quota_bytes=int(size * 3.5))
    cleaner = with_cleanup(settings, database, writer)
    studies = [study("CT", images=1, seed=seed)[0] for seed in range(1, 6)]
    for ds in studies[:3]:
        writer.write(ds, "received")
    _age(settings.database_url, studies[0].SOPInstanceUID, 30)  # past retention
    _age(settings.database_url, studies[1].SOPInstanceUID, 20)  # past retention, but a route job waits
    _age(settings.database_url, studies[2].SOPInstanceUID, 1)  # young
    with database.writes.begin() as session:
        from fabricatord.db.models import RouteJob

        session.add(
            RouteJob(
                sop_instance_uid=studies[1].SOPInstanceUID,
                study_instance_uid=studies[1].StudyInstanceUID,
                peer="pacs",
                state="pending",
                next_attempt_at=datetime.now(UTC),
            )
        )
    planned = cleaner.clean(dry_run=True)
    assert [(r.study_instance_uid, r.reason) for r in planned] == [(studies[0].StudyInstanceUID, "age")]
    assert index.lookup([studies[0].SOPInstanceUID])  # a dry run deletes nothing
    done = cleaner.clean()
    assert [r.study_instance_uid for r in done] == [studies[0].StudyInstanceUID]
    assert not index.lookup([studies[0].SOPInstanceUID])
    # The quota: three fit; the fourth is stored; the fifth makes room by deleting the fourth,
    # now past retention, and neither the busy nor the young one.
    writer.write(studies[3], "received")
    _age(settings.database_url, studies[3].SOPInstanceUID, 15)
    writer.write(studies[4], "received")  # makes room by deleting the 15-day-old study
    assert not index.lookup([studies[3].SOPInstanceUID]) and index.lookup([studies[4].SOPInstanceUID])
    assert index.lookup([studies[1].SOPInstanceUID])  # its route job keeps it
    assert parse_duration(settings.dicom.retention) == 10 * 86400
    assert os.listdir(settings.tmp_dir) == []


def test_a_deletion_whose_path_was_given_again_keeps_the_new_file(tmp_path: Path) -> None:
    """Cut short after its commit; before recovery another instance was indexed at the path."""
    index = InstanceIndex(open_database(f"sqlite:///{tmp_path / 'g.sqlite'}"))
    writer = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp", "flat", naming="sequence")
    old = study("CT", images=1, seed=1)[0]
    first = writer.write(old, "received")
    forgotten = index.forget_study(old.StudyInstanceUID)
    assert forgotten is not None
    first.path.unlink()  # as if the deletion had unlinked it, then a new store took the name
    newer = study("CT", images=1, seed=2)[0]
    encoded = Part10Encoder().encode(newer)
    index.commit([index_entry(newer, first.path.name, len(encoded), "", "received", "")], [])
    first.path.write_bytes(encoded)
    report = writer.recover()
    assert report.orphans_removed == 0 and first.path.exists() and index.intents() == []


def test_cleanup_spares_a_study_an_acquisition_is_making_and_stops_at_90_percent(
    database_url: str, tmp_path: Path, make_settings: object
) -> None:
    size = len(Part10Encoder().encode(study("CT", images=1, seed=1)[0]))
    quota = int(size * 10.5)  # ten fit (their sizes differ by a few bytes), the eleventh does not
    settings = make_settings(  # type: ignore[operator]
        f'[dicom]\ncleanup = true\nstorage_quota = "{quota}"\n', database=database_url
    )
    database = open_database(settings.database_url)
    index = InstanceIndex(database)
    writer = InstanceWriter(index, settings.storage_dir, settings.tmp_dir, quota_bytes=quota)
    with_cleanup(settings, database, writer)
    studies = [study("CT", images=1, seed=seed)[0] for seed in range(1, 12)]
    for ds in studies[:10]:
        writer.write(ds, "received")
    # An order's step whose acquisition is pending names the first study: it must stay.
    from fabricatord.db.models import Acquisition, Order, RequestedProcedure, ScheduledStep

    with database.writes.begin() as session:
        order = Order(placer_order_number="P1", filler_order_number="F1", accession_number="A1", patient_pk=1)
        session.add(order)
        session.flush()
        procedure = RequestedProcedure(
            order_pk=order.id, requested_procedure_id="RP1", study_instance_uid=studies[0].StudyInstanceUID
        )
        session.add(procedure)
        session.flush()
        step = ScheduledStep(
            procedure_pk=procedure.id, sps_id="S1", modality="CT", start_date="20261203", start_time="0900",
            start_datetime="20261203090000",
        )  # fmt: skip
        session.add(step)
        session.flush()
        session.add(Acquisition(step_pk=step.id, policy="manual", state="pending"))
    writer.write(studies[10], "received")  # over the quota: the oldest eligible ones go
    held = set(index.lookup(ds.SOPInstanceUID for ds in studies))
    assert studies[0].SOPInstanceUID in held  # its acquisition is pending
    assert studies[10].SOPInstanceUID in held  # the study being stored is never a candidate
    assert studies[1].SOPInstanceUID not in held  # the oldest eligible went first
    assert len(held) < 11 and index.total_size() <= quota * 0.9 + 1.1 * size  # down to 90 %, then the new one


def test_cleanup_spares_a_study_until_its_fhir_export_is_settled(
    database_url: str, tmp_path: Path, make_settings: object
) -> None:
    settings = make_settings(  # type: ignore[operator]
        '[dicom]\nretention = "10d"\n[fhir]\nstable_age = "1h"\n[[fhir.destinations]]\nname = "ehr"\n'
        'url = "http://127.0.0.1:9/fhir"\n',
        database=database_url,
    )
    database = open_database(settings.database_url)
    exports = Exports(settings)
    index = InstanceIndex(database, on_indexed=exports.arrived)
    writer = InstanceWriter(index, settings.storage_dir, settings.tmp_dir)
    cleaner = with_cleanup(settings, database, writer)
    [ds] = study("CT", images=1, seed=7)
    writer.write(ds, "received")  # its FHIR job waits out the stable age
    _age(settings.database_url, ds.SOPInstanceUID, 30)
    [job] = FhirJobs(database).listing()
    assert (job.state, job.study_instance_uid) == ("pending", ds.StudyInstanceUID)
    assert cleaner.clean(dry_run=True) == []
    FhirJobs(database).cancel([job.id])
    assert [r.study_instance_uid for r in cleaner.clean()] == [ds.StudyInstanceUID]
