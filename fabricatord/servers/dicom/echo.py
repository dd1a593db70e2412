"""C-ECHO: Verification, refused to a peer that may not echo."""

from __future__ import annotations

from fabricatord.servers.dicom.context import Request, Response, Status


def serve(request: Request) -> Response:
    if request.refused("C-ECHO"):
        return Response(Status.NOT_AUTHORIZED)
    return Response(Status.SUCCESS)
