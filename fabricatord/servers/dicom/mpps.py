"""Modality Performed Procedure Step N-CREATE and N-SET (PS3.4 F): what a modality says it did,
kept and checked; a refusal answers its PS3.7 status with an Error Comment."""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from sqlalchemy.exc import SQLAlchemyError

from fabricatord.dicom.mpps import MppsError
from fabricatord.obs.logging import get_logger
from fabricatord.servers.dicom.context import Request, Response, Status
from fabricatord.servers.dicom.find import identifier

log = get_logger(__name__)


def serve_create(request: Request) -> Response:
    return _kept(request, "AffectedSOPInstanceUID", request.parts.performed.create)


def serve_set(request: Request) -> Response:
    return _kept(request, "RequestedSOPInstanceUID", request.parts.performed.update)


def _kept(request: Request, uid_field: str, keep: Callable[[str, Dataset, str], Dataset]) -> Response:
    """The step named by the command's `uid_field`, created or updated; the response names it."""
    uid = str(request.command.get(uid_field) or "")
    response = _apply(request, lambda: keep(uid, identifier(request), request.served.calling_ae))
    response.fields.setdefault("AffectedSOPInstanceUID", uid or None)
    return response


def _apply(request: Request, apply: Callable[[], Dataset]) -> Response:
    if request.refused("MPPS"):
        return Response(Status.NOT_AUTHORIZED, "this AE may not send MPPS here")
    try:
        attributes = apply()
    except MppsError as refusal:
        log.warning("mpps refused", status=f"0x{refusal.status:04X}", reason=refusal.comment)
        answer = refusal.status_dataset()
        fields = {e.keyword: e.value for e in answer if e.keyword not in ("Status", "ErrorComment")}
        return Response(refusal.status, refusal.comment, fields=fields)
    except (SQLAlchemyError, OSError, ValueError) as exc:
        log.error("mpps not kept", error=str(exc))
        return Response(Status.PROCESSING_FAILURE, "the Performed Procedure Step could not be kept")
    return Response(Status.SUCCESS, identifier=encode(attributes, *request.encoding))
