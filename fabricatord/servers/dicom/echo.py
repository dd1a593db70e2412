"""C-ECHO: Verification, refused to a peer that may not echo."""

from __future__ import annotations

from fabricatord.obs import metrics
from fabricatord.servers.dicom.context import Request, Response, Status


def serve(request: Request) -> Response:
    if request.refused("C-ECHO"):
        return Response(Status.NOT_AUTHORIZED)
    metrics.DIMSE_OPERATIONS.labels("C-ECHO", request.served.peer_label, "success").inc()
    return Response(Status.SUCCESS)
