"""The HTTP endpoint (twisted.web): `/metrics`, `/healthz`, `/readyz`, the REST API `/api/v1`
with its OpenAPI document, and the web console, behind users and roles.

Everything but `/metrics` and `/healthz` runs on the reactor's thread pool: it reads the database."""

from __future__ import annotations

from twisted.web.server import Site

from fabricatord.config.values import parse_duration
from fabricatord.obs.metrics import exposition
from fabricatord.servers.http import api, pages
from fabricatord.servers.http.department import Department, ReadinessCheck
from fabricatord.servers.http.openapi import document
from fabricatord.servers.http.routing import Call, Front, Reply, Router, json_reply

__all__ = ["Department", "ReadinessCheck", "router", "session_idle", "site"]


def session_idle(department: Department) -> float:
    return parse_duration(department.settings.http.session_idle)


def router(department: Department) -> Router:
    """Every route of the daemon's HTTP side, in one table."""
    d = department
    table = Router(
        d.directory,
        d.audit,
        cookie_secure=lambda: d.settings.http.cookie_secure,
        status_requires_login=lambda: d.settings.http.status_requires_login,
    )

    @table.add("GET", "/metrics", "open", "Prometheus metrics", threaded=False)
    def metrics(call: Call) -> Reply:
        body, content_type = exposition()
        return Reply(200, body, content_type)

    @table.add("GET", "/healthz", "open", "The process is alive and its reactor turns", threaded=False)
    def healthz(call: Call) -> Reply:
        from fabricatord.obs.faults import faultpoint

        faultpoint("http.healthz")  # `hang` here blocks the reactor: the watchdog must notice
        return json_reply({"status": "ok"})

    @table.add("GET", "/readyz", "open", "Every part is up: 200, else 503 with the checks")
    def readyz(call: Call) -> Reply:
        ready, checks = api.readiness(d)
        return json_reply({"ready": ready, "checks": checks}, 200 if ready else 503)

    @table.add("GET", "/api/v1/openapi.json", "open", "This API, described (OpenAPI 3.1)")
    def openapi(call: Call) -> Reply:
        return json_reply(document(table))

    api.install(table, d)
    pages.install(table, d)
    return table


def site(department: Department) -> Site:
    return Site(Front(router(department)))
