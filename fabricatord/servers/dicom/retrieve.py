"""C-MOVE and C-GET: the identifier selects instances as a C-FIND would; each stored file goes
as it is stored (no decode, no encode) unless the receiver declined its transfer syntax.

A C-MOVE's sub-operations go on an association we request of the destination
(`dicom.ul.requestor`, blocking, in the worker's own thread); a C-GET's go back over the
association we accepted. Either way a pending response with the counts follows
each sub-operation, and the final one lists the instances that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from fabricatord.config.values import parse_duration
from fabricatord.dicom import query, scu
from fabricatord.dicom.scu import MAX_CONTEXTS, ScuError, storage_contexts
from fabricatord.dicom.scu import Timeouts as ScuTimeouts
from fabricatord.dicom.stored import StoredDataset, outgoing
from fabricatord.dicom.ul.dimse import CommandField, encode_command
from fabricatord.dicom.ul.requestor import AssociationLost, AssociationRefused, Requestor, Timeouts
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger
from fabricatord.servers.dicom.context import Request, Response, Status
from fabricatord.servers.dicom.find import identifier

log = get_logger(__name__)

MAX_SUBOPERATIONS = 65535
"""The sub-operation counts are US (PS3.7 C.4.2.1.4)."""
STUDY_ROOT_RETRIEVE = frozenset({"1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"})
TAKEN = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
"""C-STORE statuses that mean the receiver kept the instance (PS3.4 B.2.3: success and warnings)."""


@dataclass
class Progress:
    """The sub-operations of one retrieve, as its responses count them."""

    total: int
    completed: int = 0
    warnings: int = 0
    failed: list[str] = field(default_factory=list)

    def counts(self, done: int) -> dict[str, int]:
        return {
            "NumberOfRemainingSuboperations": self.total - done,
            "NumberOfCompletedSuboperations": self.completed,
            "NumberOfFailedSuboperations": len(self.failed),
            "NumberOfWarningSuboperations": self.warnings,
        }

    def final(self, encoding: tuple[bool, bool, bool], cancelled_at: int | None = None) -> Response:
        """PS3.4 C.4.2.1.5: success when all went, a warning when some failed or warned, a
        failure when all failed; a cancel counts what remained."""
        done = self.total if cancelled_at is None else cancelled_at
        fields: dict[str, Any] = self.counts(done)
        if cancelled_at is None:
            fields["NumberOfRemainingSuboperations"] = None
        if cancelled_at is not None:
            status = Status.CANCEL
        elif not self.failed and not self.warnings:
            status = Status.SUCCESS
        elif self.failed and len(self.failed) == self.total:
            status = Status.SUBOPERATIONS_REFUSED
        else:
            status = Status.SUBOPERATIONS_WARNING
        listed = None
        if self.failed and status != Status.SUCCESS:
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = self.failed
            listed = encode(failed, *encoding)
        return Response(status, identifier=listed, fields=fields)


def instances(request: Request, keys: Dataset | None = None) -> list[Any]:
    """The stored instances a C-MOVE or C-GET identifier (or `keys` in its place) names, at any
    level, relationally."""
    ds = keys if keys is not None else identifier(request)
    level = str(ds.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in query.LEVELS:
        raise query.QueryError(f"Query/Retrieve Level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    if level == "PATIENT" and request.sop_class in STUDY_ROOT_RETRIEVE:
        raise query.QueryError("the Study Root model has no PATIENT level")
    ds.QueryRetrieveLevel = "IMAGE"
    find = query.build(ds, query.PATIENT_ROOT)
    return [row[-1] for row in query.run(request.parts.database, find, MAX_SUBOPERATIONS)]


def _found(request: Request, service: str) -> list[Any] | Response:
    """The instances to send, or the 0xA900 for an identifier that names none properly (for a
    C-MOVE to a proxy, once the backend has moved them here; or why not)."""
    keys, answer = _relayed(request) if service == "C-MOVE" else (None, None)
    if answer is not None:
        return answer
    try:
        found = instances(request, keys)
    except query.QueryError as exc:
        return Response(Status.DOES_NOT_MATCH_SOP_CLASS, str(exc))
    if len(found) > MAX_SUBOPERATIONS:  # the counts are US: more cannot be reported
        return Response(Status.TOO_MANY_MATCHES, f"more than {MAX_SUBOPERATIONS} instances; narrow the request")
    return found


def _sent_counter(request: Request, service: str, peer: str) -> Callable[[int], None]:
    """What counts the bytes of each sub-operation the receiver took: metric and audit."""
    counter = metrics.SENT_BYTES.labels(service, peer)
    served = request.served

    def sent(size: int) -> None:
        counter.inc(size)
        served.operation_bytes += size
        served.bytes += size

    return sent


def serve_move(request: Request) -> Response:
    """C-MOVE to a `[[peers]]` AE title (DESIGN.md: destinations are looked up by ae_title)."""
    destination = _destination(request)
    if isinstance(destination, Response):
        return destination
    found = _found(request, "C-MOVE")
    if isinstance(found, Response):
        return found
    progress = Progress(len(found))
    if not found:
        return progress.final(request.encoding)
    requestor = _associate(request, destination, found)
    if requestor is None:
        log.warning("c-move destination unreachable", why="destination_unreachable", destination=destination.name)
        progress.failed = [i.sop_instance_uid for i in found]
        response = progress.final(request.encoding)
        response.comment = f"{destination.name[:40]} did not accept an association"
        return response
    sent = _sent_counter(request, "C-MOVE", destination.name)
    storage = request.settings.storage_dir
    try:
        for done, instance in enumerate(found):
            if request.cancelled.is_set():
                return progress.final(request.encoding, cancelled_at=done)
            status = _store_over(requestor, instance, storage / instance.path, done + 1)
            _count(progress, instance, status, sent)
            request.pending(Response(Status.PENDING, fields=progress.counts(done + 1)))
    finally:
        requestor.release()
    log.info("c-move", destination=destination.name, instances=len(found))
    return progress.final(request.encoding)


def _relayed(request: Request) -> tuple[Dataset | None, Response | None]:
    """A C-MOVE to a proxy's AE title: the backend first moves the de-identified instances the
    keys name to us; then the keys, to move them on from here (or the answer instead: nothing
    could match, or the backend did not move). Nothing to do for the node's own AE title."""
    proxies = request.parts.proxies
    proxy = proxies.called(request.served.called_ae) if proxies is not None else None
    if proxy is None:
        return None, None
    try:
        keys = proxy.fetch(identifier(request), request.settings, ScuTimeouts.of(request.settings.dicom))
    except ScuError as exc:
        log.warning("c-move not relayed", proxy=proxy.settings.name, backend=proxy.settings.to, error=str(exc))
        return None, Response(Status.SUBOPERATIONS_REFUSED, f"the backend did not move: {exc}"[:64])
    return keys, (Progress(0).final(request.encoding) if keys is None else None)


def _destination(request: Request) -> Any:
    """The `[[peers]]` entry to move to, or the 0xA801 that refuses the move."""
    if request.refused("C-MOVE"):
        return Response(Status.MOVE_DESTINATION_UNKNOWN, "this AE may not retrieve from here")
    wanted = str(request.command.get("MoveDestination", "")).strip()
    destination = request.parts.peer_by_ae(wanted)
    if destination is None:
        log.warning("c-move to an unknown destination", destination=wanted)
        return Response(
            Status.MOVE_DESTINATION_UNKNOWN, "move destination unknown: no [[peers]] entry has its AE title"
        )
    if destination.environment == "prod" and not request.settings.dicom.allow_move_to_prod:
        log.warning(
            "c-move to a production destination refused",
            why="prod_destination",
            destination=destination.name,
            hint="[dicom] allow_move_to_prod = true allows it",
        )
        return Response(Status.MOVE_DESTINATION_UNKNOWN, "production destination: [dicom] allow_move_to_prod is false")
    return destination


def _count(progress: Progress, instance: Any, status: int | None, sent: Callable[[int], None]) -> None:
    if status in TAKEN:
        sent(int(instance.size))
        if status == 0x0000:
            progress.completed += 1
        else:
            progress.warnings += 1
    else:
        progress.failed.append(instance.sop_instance_uid)


def _associate(request: Request, destination: Any, found: list[Any]) -> Requestor | None:
    """An association with the destination proposing exactly the instances' SOP classes and
    transfer syntaxes, one syntax per context so that each file can go as stored; None when
    it does not accept."""
    dicom = request.settings.dicom
    pairs = storage_contexts((i.sop_class_uid, i.transfer_syntax_uid) for i in found)
    contexts = [(sop_class, [syntax]) for sop_class, syntaxes in pairs for syntax in syntaxes]
    if len(contexts) > MAX_CONTEXTS:
        contexts = [(sop_class, list(syntaxes)) for sop_class, syntaxes in pairs]
    timeouts = Timeouts(
        connect=parse_duration(dicom.connect_timeout),
        acse=parse_duration(dicom.acse_timeout),
        dimse=parse_duration(dicom.dimse_timeout),
    )
    try:
        tls = scu.tls_for(destination)
        return Requestor.open(
            destination.host,
            destination.port,
            destination.ae_title,
            request.settings.node.ae_title,
            contexts,
            timeouts,
            tls,
        )
    except (AssociationRefused, scu.ScuError) as exc:
        log.warning("c-move association refused", destination=destination.name, error=str(exc))
        return None


def _store_over(requestor: Requestor, instance: Any, path: Path, message_id: int) -> int | None:
    """One stored file as a C-STORE on our association with the destination, as stored when it
    took the file's syntax; the status, None if it could not go or was not answered."""
    if not requestor.established:
        return None
    sendable = _sendable(requestor.contexts, instance, path)
    if sendable is None:
        return None
    context, source = sendable
    data = source if isinstance(source, bytes) else source.chunks()
    try:
        return requestor.store(context.id, instance.sop_class_uid, instance.sop_instance_uid, message_id, data)
    except (AssociationLost, OSError, ValueError) as exc:
        log.warning("c-store sub-operation failed", error=str(exc), sop_instance_uid=instance.sop_instance_uid)
        return None


# -- C-GET ---------------------------------------------------------------------------------------


def serve_get(request: Request) -> Response:
    """C-GET: the sub-operations go back over the requestor's own association."""
    peer = request.served.peer_label
    if request.refused("C-GET"):
        return Response(Status.NOT_AUTHORIZED, "this AE may not retrieve from here")
    found = _found(request, "C-GET")
    if isinstance(found, Response):
        return found
    progress = Progress(len(found))
    negotiation = request.served.negotiation
    sendable = [c for c in (negotiation.contexts.values() if negotiation else ()) if c.we_are_scu]
    if found and not any(c.abstract_syntax == i.sop_class_uid for i in found for c in sendable):
        # PS3.4 C.4.3.3: the sub-operations need a Storage context on which the requestor
        # took the SCP role; without one none can be attempted.
        log.warning("c-get refused", why="no_scp_role", instances=len(found))
        progress.failed = [i.sop_instance_uid for i in found]
        response = progress.final(request.encoding)
        response.comment = "no Storage context with the SCP role was negotiated"
        return response
    sent = _sent_counter(request, "C-GET", peer)
    storage = request.settings.storage_dir
    for done, instance in enumerate(found):
        if request.cancelled.is_set():
            return progress.final(request.encoding, cancelled_at=done)
        status = _store_back(request, sendable, instance, storage / instance.path)
        _count(progress, instance, status, sent)
        request.pending(Response(Status.PENDING, fields=progress.counts(done + 1)))
    log.info("c-get", instances=len(found))
    return progress.final(request.encoding)


def _sendable(contexts: Iterable[Any], instance: Any, path: Path) -> tuple[Any, StoredDataset | bytes] | None:
    """The context an instance goes on and its dataset (`stored.outgoing`), logged when none."""
    try:
        found = outgoing(contexts, instance.sop_class_uid, instance.transfer_syntax_uid, path)
    except (OSError, ValueError) as exc:
        log.warning("sub-operation failed", error=str(exc), sop_instance_uid=instance.sop_instance_uid)
        return None
    if found is None:
        log.warning("no context for the instance", sop_instance_uid=instance.sop_instance_uid,
                    sop_class_uid=instance.sop_class_uid, transfer_syntax=instance.transfer_syntax_uid)  # fmt: skip
    return found


def _store_back(request: Request, sendable: list[Any], instance: Any, path: Path) -> int | None:
    """One C-STORE over the accepted association: on a context for the instance's class where
    we may be the SCU, in the file's own syntax when one was accepted, converted otherwise."""
    if request.sub_request is None:
        return None
    chosen = _sendable(sendable, instance, path)
    if chosen is None:
        return None
    context, source = chosen
    message_id = request.served.next_message_id()
    command = encode_command(
        {
            "AffectedSOPClassUID": instance.sop_class_uid,
            "CommandField": CommandField.C_STORE_RQ,
            "MessageID": message_id,
            "Priority": 0,
            "CommandDataSetType": 0x0000,
            "AffectedSOPInstanceUID": instance.sop_instance_uid,
        }
    )
    answer = request.sub_request(context.id, message_id, command, source)
    if answer is None:
        return None
    return int(answer.command.get("Status", 0xC000))
