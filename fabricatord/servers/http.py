"""The HTTP endpoint (twisted.web): `/metrics`, `/healthz`, `/readyz`, `/api/v1/status`.

The status and readiness reads run on a thread, off the reactor that also carries MLLP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from fabricatord import __version__
from fabricatord.db import Database
from fabricatord.db.status import counts, reachable
from fabricatord.obs.faults import faultpoint

ReadinessCheck = tuple[str, Callable[[], bool]]
"""(name, check): `/readyz` is 200 only when every check is true."""


class _Metrics(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest()


class _Health(Resource):
    """The process is alive and its reactor turns."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        faultpoint("http.healthz")  # `hang` here blocks the reactor: the watchdog must notice
        return _json(request, {"status": "ok"})


Answer = Callable[[], tuple[int, dict[str, Any]]]


class _Threaded(Resource):
    """A JSON answer computed on a thread (it reads the database)."""

    isLeaf = True

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self._answer = answer

    def render_GET(self, request: Request) -> Any:
        def send(result: tuple[int, dict[str, Any]]) -> None:
            code, body = result
            request.setResponseCode(code)
            request.write(_json(request, body))
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(_json(request, {"error": failure.getErrorMessage()}))
            request.finish()

        deferToThread(self._answer).addCallbacks(send, failed)
        return NOT_DONE_YET


def _readiness(database: Database, checks: list[ReadinessCheck]) -> Answer:
    every: list[ReadinessCheck] = [("database", lambda: reachable(database)), *checks]

    def answer() -> tuple[int, dict[str, Any]]:
        results = {name: bool(check()) for name, check in every}
        ready = all(results.values())
        return (200 if ready else 503), {"ready": ready, "checks": results}

    return answer


def _status(database: Database, listeners: dict[str, str]) -> Answer:
    started = time.time()

    def answer() -> tuple[int, dict[str, Any]]:
        return 200, {
            "version": __version__,
            "uptime_seconds": round(time.time() - started, 1),
            "listeners": listeners,
            **counts(database),
        }

    return answer


def _json(request: Request, body: dict[str, Any]) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


def site(database: Database, checks: list[ReadinessCheck], listeners: dict[str, str]) -> Site:
    # Twisted types putChild's argument as IResource, which its own Resource does not declare.
    v1: Any = Resource()
    v1.putChild(b"status", _Threaded(_status(database, listeners)))
    api: Any = Resource()
    api.putChild(b"v1", v1)
    root = Resource()
    children: dict[bytes, Any] = {
        b"metrics": _Metrics(),
        b"healthz": _Health(),
        b"readyz": _Threaded(_readiness(database, checks)),
        b"api": api,
    }
    for path, child in children.items():
        root.putChild(path, child)
    return Site(root)
