"""Storage Commitment (PS3.4 J, Push Model), both roles.

As SCP: a peer's N-ACTION is checked, each instance decided against the index (committed when
we hold it as that SOP Class, its file on disk), and the transaction kept before the N-ACTION
is answered. The report goes on the requesting association while it is open; otherwise, or when
that fails, a worker thread sends it on an association of ours to the requester's `[[peers]]`
entry, retrying like a route job, from whichever node holds the job (a restart still reports).
A requester without an entry gets its report on its own association or not at all.

As SCU: a request of ours (a route with `verify = "commitment"`, `fabricatord commit`) is kept,
sent, and its report taken on the requesting association or on our listener, on any node of
the database, matched by Transaction UID; the route jobs that sent the instances learn the outcome.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset

from fabricatord.config import PeerSettings, Settings
from fabricatord.config.values import parse_duration
from fabricatord.db import Database
from fabricatord.db.audit import AuditLog, AuditRecord
from fabricatord.db.commitments import Commitments, Item, Transaction
from fabricatord.dicom import commitment, scu
from fabricatord.dicom.commitment import CommitmentError, Reference, Report
from fabricatord.dicom.storage import STORAGE_CLASSES
from fabricatord.obs import metrics
from fabricatord.obs.faults import faultpoint
from fabricatord.obs.logging import get_logger
from fabricatord.synth.uids import UidFactory
from fabricatord.workflow.routing import reschedule, send_claimed

log = get_logger(__name__)

REPORT_ATTEMPTS = 10
"""Sends of a report on an association of ours before it is kept as failed (about 15 minutes)."""
POLL = 0.5
SAME_ASSOCIATION_MARGIN = 10.0
"""Seconds past `[dicom] dimse_timeout` before a report the requesting association was to take
falls due for the sender thread: by then that attempt has been answered or aborted."""


@dataclass(frozen=True)
class Owed:
    """A report we owe a peer for its request: what it says, and to whom."""

    report: Report
    calling_ae: str
    peer: str
    """The requester's `[[peers]]` name; empty when it has none."""


class StorageCommitment:
    def __init__(self, settings: Settings, database: Database) -> None:
        self._settings = settings
        lease = timedelta(seconds=parse_duration(settings.node.lease))
        self.transactions = Commitments(database, settings.node_name, lease)
        self._audit = AuditLog(database)
        self._uids = UidFactory(settings.node.uid_root, random.Random())
        self._uid_lock = threading.Lock()

    def reload(self, settings: Settings) -> None:
        """New `[[peers]]` (SIGHUP): the next report or request uses them."""
        self._settings = settings

    # -- a peer asks us ------------------------------------------------------------------------

    def receive(self, calling_ae: str, peer: PeerSettings | None, information: Dataset, report_here: bool) -> Owed:
        """A peer's request, decided and kept; CommitmentError (with the status to answer) when
        its Action Information is wrong. `report_here`: the caller sends the report on the
        requesting association and settles it with `reported_here`."""
        request = commitment.read_request(information)
        held = self.transactions.held([r.sop_instance_uid for r in request.references])
        outcomes = commitment.decide(
            request.references, {uid: h.sop_class_uid for uid, h in held.items()}, STORAGE_CLASSES
        )
        items: list[Item] = []
        for reference, decided in outcomes:
            found = held.get(reference.sop_instance_uid)
            reason = decided
            if not decided and found is not None and not (self._settings.storage_dir / found.path).is_file():
                reason = commitment.PROCESSING_FAILURE  # indexed, yet its file is gone: nothing to promise
            study = found.study_instance_uid if found is not None else ""
            items.append(Item(reference.sop_class_uid, reference.sop_instance_uid, reason, study))
        name = peer.name if peer is not None else ""
        dimse = parse_duration(self._settings.dicom.dimse_timeout) or 30.0
        wait = dimse + SAME_ASSOCIATION_MARGIN if report_here else 0.0
        kept = self.transactions.received(request.transaction_uid, calling_ae, name, items, wait)
        report = _report(request.transaction_uid, kept)
        metrics.COMMITMENT_REQUESTS.labels("scp", name or "other", "accepted").inc()
        log.info(
            "storage commitment requested",
            transaction_uid=request.transaction_uid,
            calling_ae=calling_ae,
            instances=len(items),
            committed=len(report.committed),
            failed=len(report.failed),
        )
        return Owed(report, calling_ae, name)

    def information(self, report: Report) -> Dataset:
        """The Event Information of a report of ours: we are where the instances are retrieved."""
        return commitment.event_information(report, self._settings.node.ae_title)

    def reported_here(self, owed: Owed, error: str = "") -> None:
        """After the attempt on the requesting association: done when the peer answered success;
        else the report is owed on a new association (due now), or, for a requester without a
        `[[peers]]` entry, failed: nobody knows where to send it."""
        uid = owed.report.transaction_uid
        if not error:
            self.transactions.reported_here(uid, "", nobody=False)
            self._counted(owed, "same_association", "")
        elif owed.peer:
            self.transactions.reported_here(uid, error, nobody=False)
            log.info("storage commitment report owed on a new association", transaction_uid=uid,
                     calling_ae=owed.calling_ae, why=error)  # fmt: skip
        else:
            why = f"{error}; {owed.calling_ae} has no [[peers]] entry to report to on an association of ours"
            self.transactions.reported_here(uid, why, nobody=True)
            self._counted(owed, "failed", why)

    def send_owed(self, transaction: Transaction) -> None:
        """A claimed report, on an association of ours to the requester's `[[peers]]` entry."""
        report = _report(transaction.transaction_uid, transaction.items)
        owed = Owed(report, transaction.peer_ae, transaction.peer)
        settings = self._settings
        peer = settings.peer(transaction.peer) or next(
            (p for p in settings.peers if p.ae_title == transaction.peer_ae), None
        )
        retry: dict[int, tuple[datetime, str]] = {}
        failed: dict[int, str] = {}
        try:
            if peer is None:
                raise scu.ScuError(f"no [[peers]] entry is named {transaction.peer!r} or has AE title "
                                   f"{transaction.peer_ae!r}", True)  # fmt: skip
            faultpoint("commitment.before_report")
            scu.report_commitment(
                scu.Peer.of(peer), settings.node.ae_title, report.event_type, self.information(report),
                scu.Timeouts.of(settings.dicom),
            )  # fmt: skip
        except Exception as exc:  # whatever it was, the claimed report is settled, never left "sending"
            if not isinstance(exc, (scu.ScuError, OSError)):
                log.exception("storage commitment report failed", transaction_uid=transaction.transaction_uid)
            reschedule(transaction, str(exc), REPORT_ATTEMPTS, getattr(exc, "permanent", False), retry, failed)
            self.transactions.settle([], retry, failed)
            outcome = "failed" if failed else "retry"
            self._counted(owed, outcome, str(exc))
            return
        self.transactions.settle([transaction.id], {}, {})
        self._counted(owed, "new_association", "")

    def _counted(self, owed: Owed, outcome: str, error: str) -> None:
        report = owed.report
        metrics.COMMITMENT_REPORTS.labels("scp", owed.peer or "other", outcome).inc()
        if outcome in ("same_association", "new_association"):
            metrics.COMMITMENT_INSTANCES.labels("scp", "committed").inc(len(report.committed))
            metrics.COMMITMENT_INSTANCES.labels("scp", "failed").inc(len(report.failed))
        (log.warning if error else log.info)(
            "storage commitment reported" if not error else "storage commitment report not delivered",
            transaction_uid=report.transaction_uid,
            calling_ae=owed.calling_ae,
            how=outcome,
            committed=len(report.committed),
            failed=len(report.failed),
            error=error or None,
        )
        if outcome != "retry":
            self._record("COMMITMENT-REPORT", owed.calling_ae, outcome, report, error)

    # -- we ask a peer -------------------------------------------------------------------------

    def request(
        self,
        peer: scu.Peer,
        study_instance_uid: str,
        instances: Sequence[tuple[str, str, int | None]],
        wait: float,
    ) -> Transaction:
        """Ask `peer` to commit `instances` (SOP Class UID, SOP Instance UID, the route job that
        sent it or None) and keep our association open up to `wait` seconds for the report; the
        transaction as it stands then (`requested` while no report came, `refused` when the
        peer would not take the request, with why in `last_error`)."""
        with self._uid_lock:
            transaction_uid = self._uids.new()
        items = [Item(sop_class, uid, None, study_instance_uid, job) for sop_class, uid, job in instances]
        pk = self.transactions.requested(transaction_uid, peer.ae_title, peer.name, study_instance_uid, items)
        action = commitment.action_information(transaction_uid, [Reference(c, i) for c, i, _ in instances])
        try:
            scu.request_commitment(
                peer,
                self._settings.node.ae_title,
                action,
                scu.Timeouts.of(self._settings.dicom),
                lambda event_type, information: self.take_report(event_type, information, peer.ae_title, True)[0],
                lambda: self.transactions.state(pk) != "requested",
                wait,
            )
            metrics.COMMITMENT_REQUESTS.labels("scu", peer.name, "accepted").inc()
            log.info("storage commitment asked", peer=peer.name, transaction_uid=transaction_uid, instances=len(items))
        except Exception as exc:  # whatever it was, the request is settled, never left waiting for a report
            if not isinstance(exc, (scu.ScuError, OSError)):
                log.exception("storage commitment request failed", peer=peer.name, transaction_uid=transaction_uid)
            self.transactions.refused(pk, str(exc) or type(exc).__name__)
            metrics.COMMITMENT_REQUESTS.labels("scu", peer.name, "refused").inc()
            log.warning("storage commitment not asked", peer=peer.name, transaction_uid=transaction_uid, error=str(exc))
        transaction = self.transactions.transaction(transaction_uid, "out")
        assert transaction is not None
        return transaction

    def take_report(self, event_type: int, information: Dataset, calling_ae: str, same: bool) -> tuple[int, str]:
        """A peer's report on a request of ours (`same`: on the requesting association; else on
        our listener): the status to answer, and an Error Comment."""
        try:
            report = commitment.read_report(event_type, information)
        except CommitmentError as exc:
            metrics.COMMITMENT_REPORTS.labels("scu", "other", "refused").inc()
            log.warning("storage commitment report refused", calling_ae=calling_ae, reason=str(exc))
            return exc.status, str(exc)
        asked = self.transactions.transaction(report.transaction_uid, "out")
        if asked is not None and asked.peer_ae != calling_ae:
            metrics.COMMITMENT_REPORTS.labels("scu", asked.peer or "other", "refused").inc()
            log.warning("storage commitment report from another AE than the one asked", calling_ae=calling_ae,
                        asked=asked.peer_ae, transaction_uid=report.transaction_uid)  # fmt: skip
            return commitment.PROCESSING_FAILURE, f"this transaction was asked of {asked.peer_ae}"
        if asked is not None and asked.state in ("committed", "failed"):
            log.info("storage commitment report again, kept as first reported", calling_ae=calling_ae,
                     transaction_uid=report.transaction_uid)  # fmt: skip
            return 0, ""
        failures = {reference.sop_instance_uid: reason for reference, reason in report.failed}
        transaction = self.transactions.reported(
            report.transaction_uid, failures, [r.sop_instance_uid for r in report.committed]
        )
        if transaction is None:
            metrics.COMMITMENT_REPORTS.labels("scu", "other", "unknown").inc()
            log.warning("storage commitment report for no request of ours", calling_ae=calling_ae,
                        transaction_uid=report.transaction_uid)  # fmt: skip
            return commitment.PROCESSING_FAILURE, "no request of ours has this Transaction UID"
        failed = transaction.failed
        outcome = "failures" if failed else "committed"
        metrics.COMMITMENT_REPORTS.labels("scu", transaction.peer or "other", outcome).inc()
        metrics.COMMITMENT_INSTANCES.labels("scu", "committed").inc(len(transaction.committed))
        metrics.COMMITMENT_INSTANCES.labels("scu", "failed").inc(len(failed))
        (log.warning if failed else log.info)(
            "storage commitment report received",
            transaction_uid=report.transaction_uid,
            calling_ae=calling_ae,
            how="same_association" if same else "new_association",
            study_instance_uid=transaction.study_instance_uid,
            committed=len(transaction.committed),
            failed=len(failed),
        )
        self._record("COMMITMENT-RESULT", calling_ae, outcome, report, "")
        return 0, ""

    def _record(self, operation: str, peer_ae: str, status: str, report: Report, error: str) -> None:
        if not self._settings.dicom.audit:
            return
        detail = f"transaction {report.transaction_uid}: {len(report.committed)} committed, {len(report.failed)} failed"
        if error:
            detail += f"; {error}"
        try:
            self._audit.append(
                [
                    AuditRecord(
                        at=datetime.now(UTC),
                        operation=operation,
                        calling_ae=self._settings.node.ae_title[:16],
                        called_ae=peer_ae[:16],
                        status=status,
                        instances=len(report.committed) + len(report.failed),
                        detail=detail[:256],
                    )
                ]
            )
        except Exception as exc:  # the trail is a record of traffic: the commitment goes on
            log.error("audit event could not be written", operation=operation, error=str(exc))


def _report(transaction_uid: str, items: Sequence[Item]) -> Report:
    """What a report says of decided items."""
    committed = [Reference(i.sop_class_uid, i.sop_instance_uid) for i in items if i.failure_reason == 0]
    failed = [(Reference(i.sop_class_uid, i.sop_instance_uid), i.failure_reason) for i in items if i.failure_reason]
    return Report(transaction_uid, committed, failed)


class Reporter:
    """The worker thread that sends the reports we owe on associations of ours."""

    def __init__(self, commitments: StorageCommitment) -> None:
        self._commitments = commitments
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        recovered = self._commitments.transactions.recover()
        if recovered:
            log.info("storage commitment reports resumed after a restart", reports=recovered)
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        def claim() -> list[Transaction]:
            claimed = self._commitments.transactions.claim()
            return [claimed] if claimed is not None else []

        send_claimed(
            self._stop,
            claim,
            lambda claimed: self._commitments.send_owed(claimed[0]),
            "commitment-",
            "storage commitment reports",
            lambda: self._stop.wait(POLL),
        )
