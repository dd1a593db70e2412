"""Storage Commitment: the Action and Event Information both ways, the decisions, the kept
transactions on SQLite and PostgreSQL, the roles we negotiate, and what cleanup spares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from fabricatord.config.loader import ConfigError, load
from fabricatord.db import InstanceIndex, open_database, timeline
from fabricatord.db.commitments import Commitments, Item
from fabricatord.db.jobs import RouteJobs
from fabricatord.db.models import Commitment, Instance, RouteJob
from fabricatord.dicom import commitment
from fabricatord.dicom.commitment import CommitmentError, Reference, Report
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.dicom.ul.negotiation import negotiate
from fabricatord.dicom.ul.pdu import AssociateRequest, PresentationContext, RoleSelection, UserInformation
from fabricatord.servers.dicom.node import policy
from fabricatord.service import with_cleanup
from fabricatord.workflow.commitment import StorageCommitment
from tests.helpers import study

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
PEER = '[[peers]]\nname = "pacs"\nae_title = "PACS"\n'


def _action(**values: Any) -> Dataset:
    dataset = Dataset()
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


def _item(sop_class: str, sop_instance: str) -> Dataset:
    return _action(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=sop_instance)


@pytest.mark.parametrize(
    ("dataset", "status", "named"),
    [
        (_action(ReferencedSOPSequence=[_item(CT, "1.2.3")]), 0x0115, "Transaction UID (0008,1195) is missing"),
        (_action(TransactionUID="1.2.x", ReferencedSOPSequence=[_item(CT, "1.2.3")]), 0x0115, "not a UID"),
        (_action(TransactionUID="1.2.3"), 0x0115, "Referenced SOP Sequence (0008,1199) is missing"),
        (_action(TransactionUID="1.2.3", ReferencedSOPSequence=[]), 0x0115, "is empty"),
        (
            _action(
                TransactionUID="1.2.3", ReferencedSOPSequence=[_item(CT, "1.2.3"), _action(ReferencedSOPClassUID=CT)]
            ),
            0x0115,
            "item 2: Referenced SOP Instance UID (0008,1155) is missing",
        ),
    ],
)
def test_a_request_that_cannot_be_read_is_refused_naming_the_attribute(
    dataset: Dataset, status: int, named: str
) -> None:
    with pytest.raises(CommitmentError) as refused:
        commitment.read_request(dataset)
    assert refused.value.status == status
    assert named in str(refused.value)


def test_each_instance_is_decided_against_what_is_held() -> None:
    references = [Reference(CT, "1.1"), Reference(MR, "1.2"), Reference(CT, "1.3"), Reference("1.2.3.4", "1.4")]
    outcomes = commitment.decide(references, {"1.1": CT, "1.2": CT}, {CT, MR})
    assert [reason for _, reason in outcomes] == [0, 0x0119, 0x0112, 0x0122]


def test_a_report_carries_each_sequence_only_when_it_has_items_and_reads_back() -> None:
    all_committed = commitment.event_information(Report("1.9", [Reference(CT, "1.1")], []), "FABRICATORD")
    assert "FailedSOPSequence" not in all_committed and all_committed.RetrieveAETitle == "FABRICATORD"
    none_committed = commitment.event_information(Report("1.9", [], [(Reference(CT, "1.2"), 0x0112)]), "AE")
    assert "ReferencedSOPSequence" not in none_committed and "RetrieveAETitle" not in none_committed
    assert none_committed.FailedSOPSequence[0].FailureReason == 0x0112
    read = commitment.read_report(2, none_committed)
    assert read == Report("1.9", [], [(Reference(CT, "1.2"), 0x0112)]) and read.event_type == 2
    with pytest.raises(CommitmentError) as refused:
        commitment.read_report(3, all_committed)
    assert refused.value.status == 0x0113
    none_committed.FailedSOPSequence[0].FailureReason = 0
    with pytest.raises(CommitmentError, match="is 0, not a failure"):
        commitment.read_report(2, none_committed)
    del none_committed.FailedSOPSequence[0].FailureReason
    with pytest.raises(CommitmentError, match="Failure Reason"):
        commitment.read_report(2, none_committed)
    assert commitment.reason_text(0x0112) == "0x0112 (no such object instance)"


def test_a_reporting_scp_gets_the_scu_role_and_a_requester_the_scp_role() -> None:
    """PS3.4 J.3.3.1.3: the SCP reporting on an association of its own proposes SCU-role 0,
    SCP-role 1, which makes us the SCU on that context; a requester with default roles makes
    us the SCP."""
    ours = policy(load(None, environ={}, checks=[]))

    def negotiated(roles: list[RoleSelection]) -> Any:
        request = AssociateRequest(
            b"FABRICATORD".ljust(16),
            b"ORTHANC".ljust(16),
            "1.2.840.10008.3.1.1.1",
            [PresentationContext(1, commitment.SOP_CLASS, ("1.2.840.10008.1.2.1",))],
            UserInformation(max_length=16384, roles=roles),
        )
        return negotiate(request, ours)

    reporting = negotiated([RoleSelection(commitment.SOP_CLASS, False, True)])
    context = reporting.contexts[1]
    assert (context.we_are_scp, context.we_are_scu) == (False, True)
    assert [(r.sop_class_uid, r.scu, r.scp) for r in reporting.accept.user.roles] == [
        (commitment.SOP_CLASS, False, True)
    ]
    asking = negotiated([]).contexts[1]
    assert (asking.we_are_scp, asking.we_are_scu) == (True, False)


def test_verify_takes_a_switch_or_a_named_mode(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    for value, verification in [("true", "find"), ("false", ""), ('"find"', "find"), ('"commitment"', "commitment")]:
        config.write_text(f'{PEER}[[routes]]\nto = ["pacs"]\nverify = {value}\n')
        assert load(config, environ={}, checks=[]).routes[0].verification == verification
    config.write_text(f'{PEER}[[routes]]\nto = ["pacs"]\nverify = "count"\n')
    with pytest.raises(ConfigError) as refused:
        load(config, environ={}, checks=[])
    assert "routes[0].verify" in str(refused.value) and "'commitment'" in str(refused.value)


def test_transactions_both_ways_are_kept_and_reports_land_on_the_route_jobs(
    database_url: str, tmp_path: Path, make_settings: Any
) -> None:
    settings = make_settings('[[peers]]\nname = "pacs"\nae_title = "PACS"\n', database=database_url)
    database = open_database(settings.database_url)
    writer = InstanceWriter(InstanceIndex(database), settings.storage_dir, settings.tmp_dir)
    held = study("CT", images=2, seed=3)
    for ds in held:
        writer.write(ds, "received")
    service = StorageCommitment(settings, database)

    # A peer's request: decided, kept, and asked again anew.
    transaction_uid = generate_uid()
    information = commitment.action_information(
        transaction_uid, [Reference(CT, held[0].SOPInstanceUID), Reference(CT, "1.2.3.999")]
    )
    owed = service.receive("MODALITY", None, information, report_here=False)
    assert owed.report.committed == [Reference(CT, held[0].SOPInstanceUID)]
    assert owed.report.failed == [(Reference(CT, "1.2.3.999"), 0x0112)]
    (
        settings.storage_dir / InstanceIndex(database).lookup([held[0].SOPInstanceUID])[held[0].SOPInstanceUID].path
    ).unlink()
    again = service.receive("MODALITY", None, information, report_here=False)
    assert again.report.failed[0][1] == 0x0110  # its file is gone now
    kept = service.transactions.transaction(transaction_uid, "in")
    assert kept is not None and [i.failure_reason for i in kept.items] == [0x0110, 0x0112]

    # The report owed is a job: claimed once, recovered after a crash, settled.
    claims = Commitments(database, "node-a")
    claimed = claims.claim()
    assert claimed is not None and claimed.transaction_uid == transaction_uid
    assert claimed.attempts == 0  # as read before this claim: `reschedule` counts this one
    sending = claims.transaction(transaction_uid, "in")
    assert sending is not None and sending.state == "sending"
    assert claims.claim() is None
    assert claims.recover() == 1
    claimed = claims.claim()
    assert claimed is not None
    claims.settle([claimed.id], {}, {})
    done = claims.transaction(transaction_uid, "in")
    assert done is not None and done.state == "done" and done.reported_at is not None
    # A report the requesting association is to take is not due for the sender thread meanwhile.
    here = generate_uid()
    owed = service.receive("MODALITY", None, commitment.action_information(here, [Reference(CT, "1.2.3.998")]), True)
    assert claims.claim() is None
    service.reported_here(owed, "")
    answered = claims.transaction(here, "in")
    assert answered is not None and answered.state == "done"

    # A request of ours from a route: the report marks its jobs.
    with database.writer.begin() as connection:
        RouteJobs.enqueue(connection, [(ds.SOPInstanceUID, ds.StudyInstanceUID, "pacs", "r") for ds in held])
    jobs = RouteJobs(database, "node-a")
    claimed_jobs = jobs.claim()
    jobs.settle([job.id for job in claimed_jobs], {}, {})
    ours = generate_uid()
    items = [Item(CT, job.sop_instance_uid, None, job.study_instance_uid, job.id) for job in claimed_jobs]
    pk = service.transactions.requested(ours, "PACS", "pacs", held[0].StudyInstanceUID, items)
    assert service.transactions.state(pk) == "requested"
    assert service.transactions.reported(generate_uid(), {}, []) is None  # not one of ours
    status, comment = service.take_report(
        2,
        commitment.event_information(
            Report(ours, [Reference(CT, held[0].SOPInstanceUID)], [(Reference(CT, held[1].SOPInstanceUID), 0x0213)]),
            "PACS",
        ),
        "PACS",
        same=False,
    )
    assert (status, comment) == (0, "")
    result = service.transactions.transaction(ours, "out")
    assert result is not None and result.state == "failed"
    by_uid = {job.sop_instance_uid: job for job in jobs.listing()}
    first, second = by_uid[held[0].SOPInstanceUID], by_uid[held[1].SOPInstanceUID]
    assert first.state == "done" and second.state == "failed"
    assert "failure reason 0x0213" in second.last_error
    with database.engine.connect() as connection:
        verified = dict(connection.execute(select(RouteJob.sop_instance_uid, RouteJob.verified_at)).all())
    assert verified[held[0].SOPInstanceUID] is not None and verified[held[1].SOPInstanceUID] is None
    assert service.take_report(1, _action(TransactionUID=generate_uid()), "PACS", same=False)[0] == 0x0110
    # A report from another AE than the one asked, and one again: nothing changes.
    all_committed = commitment.event_information(
        Report(ours, [Reference(CT, ds.SOPInstanceUID) for ds in held], []), "PACS"
    )
    assert service.take_report(1, all_committed, "OTHER", same=False) == (0x0110, "this transaction was asked of PACS")
    assert service.take_report(1, all_committed, "PACS", same=False) == (0, "")
    unchanged = service.transactions.transaction(ours, "out")
    assert unchanged is not None and unchanged.state == "failed" and len(unchanged.failed) == 1
    assert {job.sop_instance_uid: job.state for job in jobs.listing()}[held[1].SOPInstanceUID] == "failed"
    with database.engine.connect() as connection:  # what `fabricatord trace` tells of them
        told = sorted(event.what for event in timeline._commitments(connection, [held[0].StudyInstanceUID]))
    assert told == [
        "MODALITY asked us to commit 1 instance(s); 0 held",
        "PACS committed 1 of 2 instance(s)",
        "storage commitment of 2 instance(s) asked of PACS",
        "storage commitment reported to MODALITY",
    ]


def test_cleanup_spares_a_study_with_an_instance_committed_within_commitment_retention(
    database_url: str, tmp_path: Path, make_settings: Any
) -> None:
    settings = make_settings('[dicom]\nretention = "1d"\ncommitment_retention = "7d"\n', database=database_url)
    database = open_database(settings.database_url)
    writer = InstanceWriter(InstanceIndex(database), settings.storage_dir, settings.tmp_dir)
    cleaner = with_cleanup(settings, database, writer)
    [committed] = study("CT", images=1, seed=11)
    [other] = study("CT", images=1, seed=12)
    for ds in (committed, other):
        writer.write(ds, "received")
    with database.writes.begin() as session:
        session.execute(update(Instance).values(created_at=datetime.now(UTC) - timedelta(days=30)))
    service = StorageCommitment(settings, database)
    service.receive(
        "MODALITY",
        None,
        commitment.action_information(generate_uid(), [Reference(CT, committed.SOPInstanceUID)]),
        report_here=False,
    )
    assert [r.study_instance_uid for r in cleaner.clean(dry_run=True)] == [other.StudyInstanceUID]
    with database.writes.begin() as session:  # committed eight days ago: past the protection
        session.execute(update(Commitment).values(created_at=datetime.now(UTC) - timedelta(days=8)))
    assert sorted(r.study_instance_uid for r in cleaner.clean()) == sorted(
        [committed.StudyInstanceUID, other.StudyInstanceUID]
    )
