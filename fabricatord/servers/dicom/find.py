"""C-FIND (Patient and Study Root) and Modality Worklist: one SQL query, the answers encoded
straight from the index's values and sent as they are made, C-CANCEL seen between them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from io import BytesIO
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

from fabricatord.dicom import query, worklist
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger
from fabricatord.servers.dicom.context import Request, Response, Status
from fabricatord.workflow.proxy import Proxy

log = get_logger(__name__)
T = TypeVar("T")


def identifier(request: Request) -> Dataset:
    """The request's identifier, decoded (it was walked and found sound before)."""
    data = request.message.dataset or b""
    decoded = decode(BytesIO(data), *request.encoding)
    return decoded if decoded is not None else Dataset()


def serve(request: Request) -> Response:
    if request.sop_class == worklist.MODALITY_WORKLIST_FIND:
        return _worklist(request)
    return _find(request)


def _find(request: Request) -> Response:
    if request.refused("C-FIND"):
        return Response(Status.NOT_AUTHORIZED, "this AE may not query here")
    proxies = request.parts.proxies
    proxy = proxies.called(request.served.called_ae) if proxies is not None else None
    if proxy is not None:
        return _relayed(request, proxy)

    def search(limit: int) -> tuple[query.FindQuery, list[Any]]:
        find = query.build(identifier(request), request.sop_class)
        return find, query.run(request.parts.database, find, limit)

    result = _matches(request, "C-FIND", search)
    if isinstance(result, Response):
        return result
    find, rows = result
    retrieve_ae = request.settings.node.ae_title
    answers = query.answers(request.parts.database, find, rows, retrieve_ae, request.implicit)
    if not _send_all(request, answers, bool(find.unsupported)):
        return Response(Status.CANCEL)
    log.info("c-find", level=find.level, matches=len(rows), unsupported=find.unsupported or None)
    return Response(Status.SUCCESS)


def _relayed(request: Request, proxy: Proxy) -> Response:
    """A C-FIND sent to a proxy's AE title: asked of its backend with de-identified keys, the
    answers passed on as the backend holds them."""
    from pynetdicom.dsutils import encode

    from fabricatord.dicom.scu import ScuError, Timeouts

    try:
        matches = proxy.query(identifier(request), request.settings, Timeouts.of(request.settings.dicom))
    except ScuError as exc:
        log.warning("c-find not relayed", proxy=proxy.settings.name, backend=proxy.settings.to, error=str(exc))
        return Response(Status.OUT_OF_RESOURCES, f"the backend did not answer: {exc}"[:64])
    implicit, little, _ = request.encoding
    answers = (encode(match, implicit, little) or b"" for match in matches or [])
    if not _send_all(request, answers, False):
        return Response(Status.CANCEL)
    log.info("c-find relayed", proxy=proxy.settings.name, matches=len(matches or []))
    return Response(Status.SUCCESS)


def _worklist(request: Request) -> Response:
    """Modality Worklist C-FIND (PS3.4 K): actionable steps from one SQL query; fetches recorded."""
    peer = request.served.peer_label
    if request.refused("MWL"):
        return Response(Status.NOT_AUTHORIZED, "this AE may not query the worklist")
    calling = request.served.calling_ae

    def search(limit: int) -> tuple[worklist.WorklistQuery, list[Any]]:
        by_calling = request.settings.dicom.worklist_filter_by_calling_ae
        find = worklist.build(identifier(request), calling, by_calling)
        return find, worklist.run(request.parts.database, find, limit)

    result = _matches(request, "MWL", search)
    if isinstance(result, Response):
        return result
    find, rows = result
    answered: list[int] = []

    def answers() -> Iterable[bytes]:
        for step_pk, answer in worklist.answers(find, rows, request.implicit):
            answered.append(step_pk)
            yield answer

    try:
        complete = _send_all(request, answers(), bool(find.unsupported))
    finally:
        request.parts.fetches.record(answered, calling)
    if not complete:
        return Response(Status.CANCEL)
    metrics.MWL_QUERIES.labels(peer, "hit" if rows else "miss").inc()
    log.info("worklist query", items=len(rows), unsupported=find.unsupported or None)
    return Response(Status.SUCCESS)


def _send_all(request: Request, answers: Iterable[bytes], unsupported_keys: bool) -> bool:
    """Each answer as a pending response; False when a C-CANCEL stopped them."""
    status = Status.PENDING_UNSUPPORTED_KEYS if unsupported_keys else Status.PENDING
    for answer in answers:
        if request.cancelled.is_set():
            return False
        request.pending(Response(status, identifier=answer))
    return not request.cancelled.is_set()


def _matches(
    request: Request, service: str, search: Callable[[int], tuple[T, list[Any]]]
) -> tuple[T, list[Any]] | Response:
    """The query and its matches, or the failure to answer with instead."""
    limit = request.settings.dicom.max_find_results
    try:
        found, rows = search(limit)
    except query.QueryError as exc:
        failure = Response(Status.DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except Exception as exc:
        log.error("query failed", service=service, error=str(exc))
        failure = Response(Status.CANNOT_UNDERSTAND, f"cannot process the query: {exc}")
    else:
        if len(rows) <= limit:
            return found, rows
        # C-FIND has no warning status: refusing is the only honest answer (PS3.4 C.4.1.1.4).
        failure = Response(Status.OUT_OF_RESOURCES, f"more than {limit} matches; narrow the query")
    return failure
