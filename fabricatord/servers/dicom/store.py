"""C-STORE: the dataset is kept, as the peer sent it, behind our file meta (in memory, or in
data_dir/tmp once it is large) while it arrives; the service writes it out, walks it, checks it
against the command and hands it to the writer, which fsyncs, links and indexes it before success
goes out.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import SQLAlchemyError

from fabricatord import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fabricatord.config.values import is_valid_uid
from fabricatord.db import is_busy
from fabricatord.dicom.storage import INDEXED_TAGS, InvalidInstance, OutOfSpace
from fabricatord.dicom.walk import Malformed, read_received
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger
from fabricatord.servers.dicom.context import Request, Response, Status
from fabricatord.workflow.proxy import BurnedInRefused

log = get_logger(__name__)


SPOOL_LIMIT = 1024 * 1024
"""Bytes of a C-STORE dataset held in memory as it arrives; a larger one goes to its file from
there on. File creation and writes block on the journal while another thread fsyncs, and the
reactor that reads every association must not: a dataset this size is written by its worker."""


class ReceivedFile:
    """Where a C-STORE dataset goes as it arrives: a Part 10 file in data_dir/tmp, our file meta
    first (the transfer syntax the context agreed), the peer's bytes after it unchanged; held in
    memory until it passes SPOOL_LIMIT, so most files are written by the worker (`written`)."""

    def __init__(self, tmp_dir: Path, sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
        self.path = tmp_dir / f"received-{uuid.uuid4().hex}.dcm"
        self._held = [file_meta(sop_class, sop_instance, transfer_syntax)]
        self._held_size = 0
        self._file: BinaryIO | None = None

    def write(self, data: memoryview) -> None:
        if self._file is None:
            if self._held_size + len(data) <= SPOOL_LIMIT:
                self._held.append(bytes(data))
                self._held_size += len(data)
                return
            self._file = self._spill()
        self._file.write(data)

    def close(self) -> ReceivedFile:
        """The dataset is complete (on the reactor): what the message carries as `stored`."""
        if self._file is not None:
            self._file.close()
        return self

    def written(self) -> Path:
        """The complete file (on a worker): written now if it was held in memory."""
        if self._file is None:
            self._file = self._spill()
            self._file.close()
        return self.path

    def remove(self) -> None:
        """Nothing of it will be stored: the file goes, if there is one."""
        self._held = []
        self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        """The association ended inside the C-STORE: nothing was acknowledged, so the part goes."""
        if self._file is not None:
            self._file.close()
        self.remove()
        log.warning("connection closed during a c-store: the partial dataset was removed")

    def _spill(self) -> BinaryIO:
        file = self.path.open("wb")
        file.writelines(self._held)
        self._held = []
        return file


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, DICM and the file meta group (PS3.10 7.1), Explicit VR Little Endian."""
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class)),
            _element(0x0003, b"UI", _uid(sop_instance)),
            _element(0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        )
    )
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(elements))
    return bytes(128) + b"DICM" + group_length + elements


def _uid(value: str) -> bytes:
    return _even(value.encode("ascii", "replace")[:64], b"\x00")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def serve(request: Request) -> Response:
    received: ReceivedFile | None = request.message.stored
    try:
        if request.refused("C-STORE"):
            return Response(Status.NOT_AUTHORIZED, "this AE may not store here")
        code, comment, why = _store(request, received)
        if comment:
            log.warning("c-store refused", why=why, status=f"0x{code:04X}", reason=comment)
        return Response(code, comment)
    finally:
        if received is not None:
            received.remove()  # adopted files were renamed away already


def _store(request: Request, received: ReceivedFile | None) -> tuple[int, str, str]:
    """Write the instance durably; (status, Error Comment, why it was refused)."""
    try:
        if received is None:
            raise Malformed("the C-STORE carried no dataset")
        file = received.written()
        ds = read_received(file, INDEXED_TAGS, request.parts.walk_limits)
        _check_match(request.command, ds)
        dataset_bytes = file.stat().st_size - _dataset_offset(ds)
        metrics.RECEIVED_BYTES.inc(dataset_bytes)
        served = request.served
        served.operation_bytes = dataset_bytes
        served.bytes += dataset_bytes
        proxies = request.parts.proxies
        proxy = proxies.called(served.called_ae) if proxies is not None else None
        if proxy is not None and not proxy.from_backend(served.calling_ae, served.address, request.settings):
            # De-identified, sealed, stored and forwarded.
            result = proxy.receive(file, served.calling_ae, request.parts.writer)
        else:
            result = request.parts.writer.adopt(file, ds, "received", served.calling_ae)
    except Exception as exc:
        return _store_refusal(exc)
    request.served.stored += 1
    log.info("c-store", sop_instance_uid=result.sop_instance_uid, outcome=result.outcome, bytes=result.size)
    return Status.SUCCESS, "", ""


class _Mismatch(ValueError):
    """The dataset does not belong to the request it came with (PS3.4 B.2.3)."""


def _check_match(command: dict[str, Any], ds: Any) -> None:
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if not is_valid_uid(sop_instance):
        raise _Mismatch("SOP Instance UID missing or not a UID")
    if not is_valid_uid(sop_class):
        raise _Mismatch("SOP Class UID missing or not a UID")
    if sop_instance != str(command.get("AffectedSOPInstanceUID", "")):
        raise _Mismatch("SOP Instance UID differs from the command's")
    if sop_class != str(command.get("AffectedSOPClassUID", "")):
        raise _Mismatch("SOP Class UID differs from the command's")


def _dataset_offset(ds: Any) -> int:
    """Where the dataset starts in a Part 10 file: preamble, DICM, the group length element, the group."""
    return 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)


def _store_refusal(exc: Exception) -> tuple[int, str, str]:
    """The C-STORE status, Error Comment and counted reason for what stopped a store."""
    counted = True
    if isinstance(exc, Malformed):
        status, comment, why = Status.CANNOT_UNDERSTAND, str(exc), "malformed"
    elif isinstance(exc, _Mismatch):
        status, comment, why = Status.DOES_NOT_MATCH_SOP_CLASS, str(exc), "mismatch"
    elif isinstance(exc, InvalidInstance):  # counted by the writer
        status, comment, why, counted = Status.DOES_NOT_MATCH_SOP_CLASS, str(exc), "invalid", False
    elif isinstance(exc, BurnedInRefused):
        status, comment, why = Status.CANNOT_UNDERSTAND, str(exc)[:64], "burned_in"
    elif isinstance(exc, OutOfSpace):  # counted by the writer
        status, comment, why, counted = Status.OUT_OF_RESOURCES, str(exc), "out_of_space", False
    elif isinstance(exc, OSError):
        status, comment, why = Status.OUT_OF_RESOURCES, f"cannot store: {exc.strerror}", "write"
    elif isinstance(exc, SQLAlchemyError):  # nothing was committed: the sender may send it again
        busy = is_busy(exc)
        why = "database_busy" if busy else "database"
        status = Status.OUT_OF_RESOURCES
        comment = "the database is busy: send it again" if busy else "the index cannot be written: send it again"
    else:
        status, comment, why = Status.CANNOT_UNDERSTAND, f"cannot store the dataset: {exc}", "exception"
    if counted:
        metrics.STORAGE_WRITE_FAILURES.labels(why).inc()
    if why in ("write", "database_busy", "database", "exception"):  # ours, not the peer's: the whole story
        log.exception("c-store failed", why=why, error=str(exc))  # called in the except block
    return status, comment, why


def sink(tmp_dir: Path, command: dict[str, Any], transfer_syntax: str) -> ReceivedFile:
    """The file a C-STORE-RQ's dataset is received into."""
    return ReceivedFile(
        tmp_dir,
        str(command.get("AffectedSOPClassUID", "")),
        str(command.get("AffectedSOPInstanceUID", "")),
        transfer_syntax,
    )
