"""Storage Commitment, both roles, over real sockets: a pynetdicom modality asks us and takes
its report on its own association or on its listener (DCMTK has no storage commitment tool);
Orthanc asks us (it always takes the report on a new association) and commits what we route to
it; `fabricatord commit` asks and waits; a kill -9 with a report owed still reports."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from tests.conftest import free_port, run_cli
from tests.integration.conftest import BOTH_BACKENDS, Daemon, Orthanc, generated, storescu

pytestmark = pytest.mark.integration

SOP_INSTANCE = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def action(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    dataset.ReferencedSOPSequence = items
    return dataset


class Modality:
    """A modality as pynetdicom plays one: asks for commitment, and takes reports on its
    association (when `on_association`) and on a listener of its own."""

    def __init__(self, ae_title: str = "MODALITY") -> None:
        self.ae_title = ae_title
        self.reports: list[tuple[int, Dataset, Any]] = []
        self.arrived = threading.Event()
        self.listener: Any = None
        self.port = 0

    def _take(self, event: Any) -> tuple[int, None]:
        self.reports.append((int(event.request.EventTypeID), event.event_information, event.assoc))
        self.arrived.set()
        return 0x0000, None

    def listen(self) -> int:
        ae = AE(ae_title=self.ae_title)
        # The SCP reporting on its own association takes the SCP role (SCU-role 0, SCP-role 1).
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.port = free_port()
        self.listener = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._take)]
        )
        return self.port

    def ask(self, daemon: Daemon, dataset: Dataset, on_association: bool = True, wait: float = 10.0) -> Dataset:
        """The N-ACTION's status; with `on_association`, the association stays open until a
        report came on it (or `wait` passed); without, the report on it is refused (0x0110) and
        the association released only after that answer went out: pynetdicom cannot answer a
        request once it asked to release."""
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        refused = threading.Event()

        def refuse(event: Any) -> tuple[int, None]:
            refused.set()
            return 0x0110, None

        handlers = [(evt.EVT_N_EVENT_REPORT, self._take if on_association else refuse)]
        assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD", evt_handlers=handlers)
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_action(dataset, 1, StorageCommitmentPushModel, SOP_INSTANCE)
            if status.Status == 0:
                (self.arrived if on_association else refused).wait(wait)
                time.sleep(0.2)  # the answer is sent once the handler returned
        finally:
            assoc.release()
        return status

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.shutdown()


def stored_ct(tmp_path: Path, daemon: Daemon, images: int = 2) -> list[tuple[str, str, str]]:
    """(SOP Class, SOP Instance, Study Instance UID) of CT instances stored into the daemon by DCMTK."""
    files = generated(tmp_path, "CT", images)
    assert storescu(daemon.port, files).returncode == 0
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    return [(str(h.SOPClassUID), str(h.SOPInstanceUID), str(h.StudyInstanceUID)) for h in headers]


def test_a_modality_gets_its_report_on_its_association_with_what_we_do_not_hold(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(
        '[[peers]]\nname = "nocommit"\nae_title = "NOCOMMIT"\nport = 104\nallow_storage_commitment = false\n'
    )
    held = stored_ct(tmp_path, daemon)
    unknown = generate_uid()
    wrong_class = (MR, held[1][1])  # we hold it as CT
    modality = Modality("ANYONE")  # in no [[peers]] entry: its association is the only way back
    transaction = generate_uid()
    references = [(c, i) for c, i, _ in held] + [(CT, unknown), wrong_class]
    status = modality.ask(daemon, action(transaction, references))
    assert status.Status == 0x0000
    assert modality.arrived.is_set(), daemon.log.read_text()[-3000:]
    event_type, report, _ = modality.reports[0]
    assert event_type == 2  # some failed
    assert report.TransactionUID == transaction
    assert report.RetrieveAETitle == "FABRICATORD"
    committed = [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence]
    assert committed == [(c, i) for c, i, _ in held]
    failed = {i.ReferencedSOPInstanceUID: (i.ReferencedSOPClassUID, i.FailureReason) for i in report.FailedSOPSequence}
    assert failed == {unknown: (CT, 0x0112), held[1][1]: (MR, 0x0119)}
    settled = "SELECT state, peer_ae, reported_at FROM commitments WHERE transaction_uid = ?"
    rows = wait_until(lambda: (r := daemon.query(settled, (transaction,))) and r[0][0] == "done" and r,
                      what="the report settled")  # fmt: skip
    assert rows[0][1] == "ANYONE" and rows[0][2] is not None
    assert daemon.metric("fabricatord_commitment_reports_total", role="scp", peer="other",
                         outcome="same_association") == 1  # fmt: skip
    # Asked again with the same Transaction UID: decided and reported anew, once.
    again = Modality("ANYONE")
    assert again.ask(daemon, action(transaction, references[:2])).Status == 0x0000
    assert len(again.reports) == 1 and again.reports[0][0] == 1  # now all committed
    assert len(modality.reports) == 1
    assert len(daemon.query("SELECT id FROM commitments WHERE transaction_uid = ?", (transaction,))) == 1

    # A peer its [[peers]] entry does not allow: refused, nothing kept.
    refused = Modality("NOCOMMIT").ask(daemon, action(generate_uid(), references[:1]))
    assert refused.Status == 0x0124
    # An Action Information without a Transaction UID: a failure that names it.
    broken = action(transaction, references[:1])
    del broken.TransactionUID
    answer = Modality("ANYONE").ask(daemon, broken)
    assert answer.Status == 0x0115
    assert "Transaction UID" in str(answer.ErrorComment)
    # A requester without an entry that refuses its report on the association: nobody to report to.
    gone = generate_uid()
    assert Modality("ANYONE").ask(daemon, action(gone, references[:1]), on_association=False).Status == 0
    state = wait_until(
        lambda: (r := daemon.query("SELECT state, last_error FROM commitments WHERE transaction_uid = ?", (gone,)))
        and r[0][0] == "failed" and r[0],
        what="the report owed to a gone requester given up",
    )  # fmt: skip
    assert "no [[peers]] entry" in state[1]


@BOTH_BACKENDS
def test_a_report_owed_when_the_daemon_is_killed_goes_out_after_the_restart(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    modality = Modality("MODALITY")
    port = modality.listen()
    peers = f'[[peers]]\nname = "modality"\nae_title = "MODALITY"\nport = {port}\n'
    try:
        daemon = start_daemon(peers, env={"FABRICATORD_FAULTPOINT": "commitment.before_report:kill"})
        held = stored_ct(tmp_path, daemon, images=3)
        transaction = generate_uid()
        # The modality refuses the report on its association (0x0110) and releases: the report is
        # owed on an association of ours.
        status = modality.ask(daemon, action(transaction, [(c, i) for c, i, _ in held]), on_association=False)
        assert status.Status == 0x0000
        daemon.process.wait(timeout=30)
        assert daemon.process.returncode == -9  # killed before the report went out
        assert not modality.arrived.is_set()
        assert daemon.query("SELECT state FROM commitments WHERE transaction_uid = ?", (transaction,)) == [("sending",)]

        restarted = start_daemon(peers)
        assert modality.arrived.wait(30), restarted.log.read_text()[-3000:]
        time.sleep(1)  # a second report would come now
        assert len(modality.reports) == 1
        event_type, report, assoc = modality.reports[0]
        assert event_type == 1
        assert report.TransactionUID == transaction
        assert sorted(i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence) == sorted(i for _, i, _ in held)
        assert "FailedSOPSequence" not in report
        role = assoc.requestor.role_selection[StorageCommitmentPushModel]  # what we proposed
        assert (role.scu_role, role.scp_role) == (False, True)
        wait_until(
            lambda: (
                restarted.query("SELECT state FROM commitments WHERE transaction_uid = ?", (transaction,))
                == [("done",)]
            ),
            what="the report settled",
        )
        assert restarted.metric("fabricatord_commitment_reports_total", role="scp", peer="modality",
                                outcome="new_association") == 1  # fmt: skip
    finally:
        modality.stop()


def silent_scp() -> tuple[Any, int]:
    """A Storage Commitment SCP that accepts every N-ACTION and never reports."""
    ae = AE(ae_title="SILENT")
    ae.add_supported_context(StorageCommitmentPushModel)
    port = free_port()

    def accepted(event: Any) -> tuple[int, None]:
        return 0x0000, None

    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_ACTION, accepted)]), port


def delete(orthanc: Orthanc, path: str) -> None:
    request = urllib.request.Request(orthanc.http + path, method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def test_orthanc_commits_what_we_route_and_asks_us_to_commit(
    tmp_path: Path, start_daemon: Callable[..., Daemon], orthanc: Callable[..., Orthanc]
) -> None:
    orthanc_port = free_port()
    silent, silent_port = silent_scp()
    route = (
        f'[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nport = {orthanc_port}\n'
        f'[[peers]]\nname = "silent"\nae_title = "SILENT"\nport = {silent_port}\n'
        '[[routes]]\nname = "committed"\nmatch = { calling_ae = "MODALITY" }\nto = ["orthanc"]\n'
        'verify = "commitment"\n'
    )
    try:
        daemon = start_daemon(route)
        pacs = orthanc(orthanc_port, daemon.port)
        held = stored_ct(tmp_path, daemon, images=3)
        study = held[0][2]

        # As SCU: the routed instances, committed by Orthanc on an association of its own.
        verified = wait_until(
            lambda: (rows := daemon.query("SELECT state, verified_at FROM route_jobs")) and all(r[1] for r in rows)
            and rows,
            what="every route job verified by Orthanc's report",
        )  # fmt: skip
        assert [state for state, _ in verified] == ["done"] * 3
        out = daemon.query("SELECT state, peer FROM commitments WHERE direction = 'out'")
        assert out == [("committed", "orthanc")]

        # As SCP: Orthanc asks (it takes the report on a new association only).
        unknown = generate_uid()
        asked = pacs.call(
            "/modalities/fabricatord/storage-commitment",
            {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i, _ in held]
             + [{"SOPClassUID": CT, "SOPInstanceUID": unknown}]},
        )  # fmt: skip
        result = wait_until(
            lambda: (r := pacs.call(f"/storage-commitment/{asked['ID']}"))["Status"] != "Pending" and r,
            what="Orthanc's storage commitment report",
        )
        assert result["Status"] == "Failure"
        assert sorted(s["SOPInstanceUID"] for s in result["Success"]) == sorted(i for _, i, _ in held)
        assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in result["Failures"]] == [(unknown, 0x0112)]

        # `fabricatord commit`: everything committed, then one instance Orthanc no longer holds.
        config = ["--config", str(daemon.config)]
        answer = run_cli("commit", "orthanc", study, "--timeout", "30", *config)
        assert "3 of 3 instances committed, 0 failed" in answer.stdout
        gone = pacs.call("/tools/lookup", held[2][1])[0]["ID"]
        delete(pacs, f"/instances/{gone}")
        answer = run_cli("commit", "orthanc", study, "--timeout", "30", *config, check=False)
        assert answer.returncode == 69, answer.stdout + answer.stderr
        assert f"failed: {held[2][1]} ({CT}): 0x0112 (no such object instance)" in answer.stdout

        # No report in time, an unknown study, a peer nobody answers for.
        answer = run_cli("commit", "silent", study, "--timeout", "2", *config, check=False)
        assert answer.returncode == 75, answer.stdout + answer.stderr
        assert "no report within 2 s" in answer.stdout
        assert run_cli("commit", "orthanc", generate_uid(), *config, check=False).returncode == 65
        nobody = f"NOBODY@127.0.0.1:{free_port()}"
        answer = run_cli("commit", nobody, study, *config, check=False)
        assert answer.returncode == 69 and "cannot connect" in answer.stderr
        assert daemon.metric("fabricatord_commitment_reports_total", role="scu", peer="orthanc",
                             outcome="failures") == 1  # fmt: skip
        audit = daemon.query("SELECT operation, status FROM audit_events WHERE operation LIKE 'COMMITMENT%'")
        assert ("COMMITMENT-REPORT", "new_association") in audit and ("COMMITMENT-RESULT", "failures") in audit
    finally:
        silent.shutdown()
