"""Storage Commitment Push Model (PS3.4 J) on the listener: a peer's N-ACTION (we are the SCP),
answered once the transaction is kept, its report then sent on the same association; and a
peer's N-EVENT-REPORT (we are the SCU) on a request of ours, which may come on any association."""

from __future__ import annotations

from pynetdicom.dsutils import encode
from sqlalchemy.exc import SQLAlchemyError

from fabricatord.dicom import commitment
from fabricatord.dicom.commitment import CommitmentError
from fabricatord.dicom.ul.dimse import CommandField, Message
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger
from fabricatord.servers.dicom.context import Request, Response, Status
from fabricatord.servers.dicom.find import identifier
from fabricatord.workflow.commitment import Owed, StorageCommitment

log = get_logger(__name__)


def serve_action(request: Request) -> Response:
    fields = {"AffectedSOPInstanceUID": request.command.get("RequestedSOPInstanceUID") or None}
    service = request.parts.commitments
    refused = (
        _refused_action(request)
        if service is not None
        else Response(Status.NO_SUCH_SOP_CLASS, "Storage Commitment is not served here")
    )
    if refused is not None:
        refused.fields.update(fields)
        metrics.COMMITMENT_REQUESTS.labels("scp", request.served.peer_label, "refused").inc()
        return refused
    assert service is not None
    fields["ActionTypeID"] = commitment.REQUEST_COMMITMENT
    served = request.served
    try:
        owed = service.receive(served.calling_ae, served.peer, identifier(request), report_here=True)
        information = encode(service.information(owed.report), *request.encoding) or b""
    except CommitmentError as exc:
        metrics.COMMITMENT_REQUESTS.labels("scp", served.peer_label, "refused").inc()
        log.warning("storage commitment refused", status=f"0x{exc.status:04X}", reason=str(exc))
        return Response(exc.status, str(exc), fields=fields)
    except (SQLAlchemyError, OSError) as exc:
        metrics.COMMITMENT_REQUESTS.labels("scp", served.peer_label, "refused").inc()
        log.error("storage commitment not kept", error=str(exc))
        return Response(Status.PROCESSING_FAILURE, "the request could not be kept", fields=fields)
    served.answers = len(owed.report.committed)
    served.detail = f"transaction {owed.report.transaction_uid} failed={len(owed.report.failed)}"

    def report() -> None:
        """On the reactor, once the N-ACTION-RSP is written: the report on the same association."""
        command = {
            "AffectedSOPClassUID": commitment.SOP_CLASS,
            "CommandField": CommandField.N_EVENT_REPORT_RQ,
            "CommandDataSetType": 0x0000,
            "AffectedSOPInstanceUID": commitment.SOP_INSTANCE,
            "EventTypeID": owed.report.event_type,
        }
        request.notify(command, information, lambda answer: _answered(service, owed, answer))

    return Response(Status.SUCCESS, fields=fields, then=report)


def _refused_action(request: Request) -> Response | None:
    """Why an N-ACTION is answered with a failure before its Action Information is read."""
    if not request.context.we_are_scp:
        return Response(Status.UNRECOGNIZED_OPERATION, "this context made us the SCU, not the SCP")
    if request.refused("STORAGE-COMMITMENT"):
        return Response(Status.NOT_AUTHORIZED, "this AE may not ask for storage commitment here")
    action = request.command.get("ActionTypeID")
    if action != commitment.REQUEST_COMMITMENT:
        return Response(commitment.NO_SUCH_ACTION, f"Action Type ID {action} is not 1")
    if request.command.get("RequestedSOPInstanceUID") != commitment.SOP_INSTANCE:
        return Response(Status.NO_SUCH_SOP_INSTANCE, f"the SOP Instance is {commitment.SOP_INSTANCE}")
    if not request.message.has_dataset:
        return Response(commitment.INVALID_ARGUMENT_VALUE, "no Action Information")
    return None


def _answered(service: StorageCommitment, owed: Owed, answer: Message | None) -> None:
    """On a worker: how the requester answered our report (None: it did not). If this fails,
    the report falls due for the sender thread once the requesting association's time is up."""
    if answer is None:
        error = "the requesting association ended before the report was answered"
    elif (status := int(answer.command.get("Status", 0xC000))) != Status.SUCCESS:
        comment = str(answer.command.get("ErrorComment") or "")
        error = f"the report on the requesting association was answered 0x{status:04X} {comment}".strip()
    else:
        error = ""
    try:
        service.reported_here(owed, error)
    except Exception as exc:
        log.error("storage commitment report not settled", transaction_uid=owed.report.transaction_uid, error=str(exc))


def serve_report(request: Request) -> Response:
    service = request.parts.commitments
    event_type = int(request.command.get("EventTypeID") or 0)
    fields = {"AffectedSOPInstanceUID": request.command.get("AffectedSOPInstanceUID") or None}
    fields["EventTypeID"] = event_type
    if service is None:
        return Response(Status.NO_SUCH_SOP_CLASS, "Storage Commitment is not served here", fields=fields)
    if request.command.get("AffectedSOPInstanceUID") != commitment.SOP_INSTANCE:
        return Response(Status.NO_SUCH_SOP_INSTANCE, f"the SOP Instance is {commitment.SOP_INSTANCE}", fields=fields)
    if not request.message.has_dataset:
        return Response(commitment.INVALID_ARGUMENT_VALUE, "no Event Information", fields=fields)
    try:
        status, comment = service.take_report(event_type, identifier(request), request.served.calling_ae, False)
    except (SQLAlchemyError, OSError) as exc:
        log.error("storage commitment report not kept", error=str(exc))
        return Response(Status.PROCESSING_FAILURE, "the report could not be kept", fields=fields)
    request.served.detail = f"event type {event_type}"
    return Response(status, comment, fields=fields)
