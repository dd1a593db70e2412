"""The OpenAPI document of `/api/v1`, made from the route table so that it cannot drift from it."""

from __future__ import annotations

import re
from typing import Any

from fabricatord import __version__
from fabricatord.servers.http.routing import Router

_ACCESS = {
    "open": "No credentials.",
    "status": "No credentials, unless `[http] status_requires_login`.",
    "user": "Any role.",
    "change": "Roles admin, test_write, prod_write.",
    "admin": "Role admin.",
}


def document(router: Router) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in router.routes:
        if not route.pattern.startswith("/api/"):
            continue
        operation: dict[str, Any] = {
            "summary": route.summary,
            "description": _ACCESS[route.access],
            "operationId": route.handler.__name__,
            "responses": {"200": {"description": "success"}},
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", route.pattern)
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.access in ("open", "status"):
            operation["security"] = []
        else:
            operation["responses"].update(
                {"401": {"description": "no credentials"}, "403": {"description": "the role may not"}}
            )
        if route.method in ("POST", "PUT", "PATCH"):
            operation["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
        paths.setdefault(route.pattern, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "fabricatord", "version": __version__},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "`fabricatord users token NAME`"},
                "session": {"type": "apiKey", "in": "cookie", "name": "fabricatord_session"},
            }
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
    }
