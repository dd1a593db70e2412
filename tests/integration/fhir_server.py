"""A FHIR server for the tests, the agreed stand-in (none runs here: HAPI needs Maven): it takes
transaction Bundles at its base URL as a FHIR R4B server would. Each Bundle is validated by
`fhir.resources`; every entry must be a conditional create (POST with ifNoneExist) or a
conditional update (PUT to `Type?identifier=system|value`) with a `urn:uuid` full URL. The
transaction is atomic: 412 when a condition matches several resources, else 201 per resource
made and 200 per resource found (create) or updated (update), references to the full URLs
rewritten to the resources they resolved to. `outages` answers 503 that many times first."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.conftest import free_port


class FhirServer:
    def __init__(self, token: str = "", port: int = 0) -> None:
        self.token = token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        """Resource type → id → resource."""
        self.bundles: list[dict[str, Any]] = []
        """Every Bundle POSTed, as sent."""
        self.answers: list[int] = []
        """The HTTP status of every POST, in order."""
        self.responses: list[dict[str, Any]] = []
        """What was answered to every POST, in order."""
        self.outages = 0
        self.refusals: list[str] = []
        self._lock = threading.Lock()
        self._next = 0

    def __enter__(self) -> FhirServer:
        """Listening from here on (made but not entered, its port refuses connections)."""
        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.resources.get(kind, {}).values())

    def add(self, resource: dict[str, Any]) -> str:
        """A resource the server holds already (another system's), its id."""
        with self._lock:
            return self._store(resource)

    def _store(self, resource: dict[str, Any]) -> str:
        self._next += 1
        resource = {**resource, "id": str(self._next)}
        self.resources.setdefault(resource["resourceType"], {})[resource["id"]] = resource
        return resource["id"]

    def _matches(self, kind: str, search: str) -> list[str]:
        """Ids of `kind` whose identifier matches `identifier=system|value`, the only search used."""
        wanted = str(parse_qs(search).get("identifier", [""])[0])
        system, value = (re.sub(r"\\(.)", r"\1", part) for part in re.split(r"(?<!\\)\|", wanted, maxsplit=1))
        return [
            rid
            for rid, resource in self.resources.get(kind, {}).items()
            if any(i.get("system") == system and i.get("value") == value for i in resource.get("identifier", []))
        ]

    def transaction(self, bundle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from fhir.resources.R4B.bundle import Bundle

        try:
            Bundle.model_validate(bundle)
        except Exception as exc:
            return 400, _outcome("invalid", f"not a valid R4B Bundle: {exc}")
        if bundle.get("type") != "transaction":
            return 400, _outcome("invalid", "only transaction Bundles are taken here")
        plans = []
        for entry in bundle.get("entry", []):
            request, resource = entry.get("request", {}), entry.get("resource", {})
            kind = resource.get("resourceType", "")
            if not str(entry.get("fullUrl", "")).startswith("urn:uuid:"):
                return 400, _outcome("invalid", "every entry needs a urn:uuid fullUrl")
            if request.get("method") == "POST" and request.get("url") == kind and request.get("ifNoneExist"):
                search = request["ifNoneExist"]
            elif request.get("method") == "PUT" and str(request.get("url", "")).startswith(f"{kind}?"):
                search = request["url"].split("?", 1)[1]
            else:
                return 400, _outcome("invalid", f"{kind}: only conditional create or update is taken here")
            found = self._matches(kind, search)
            if len(found) > 1:
                return 412, _outcome("multiple-matches", f"{kind}?{search} matches {len(found)} resources")
            plans.append((entry, kind, request["method"], found[0] if found else None))
        resolved: dict[str, str] = {}
        for entry, kind, _, found in plans:
            resolved[entry["fullUrl"]] = f"{kind}/{found}" if found else ""
        answers = []
        for entry, kind, method, found in plans:
            resource = _rewritten(entry["resource"], resolved)
            if found is not None and method == "POST":
                answers.append({"status": "200 OK", "location": f"{kind}/{found}"})
                continue
            if found is not None:
                resource["id"] = found
                self.resources[kind][found] = resource
                answers.append({"status": "200 OK", "location": f"{kind}/{found}"})
            else:
                rid = self._store(resource)
                resolved[entry["fullUrl"]] = f"{kind}/{rid}"
                answers.append({"status": "201 Created", "location": f"{kind}/{rid}"})
        # References made before the resources they point at existed: point them now.
        for kind_table in self.resources.values():
            for rid, resource in kind_table.items():
                kind_table[rid] = _rewritten(resource, resolved)
        response = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": answer} for answer in answers],
        }
        return 200, response

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server._lock:
                    status, answer = self._answer(body)
                    server.answers.append(status)
                    server.responses.append(answer)
                    if status >= 400:
                        server.refusals.append(json.dumps(answer))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
                if urlsplit(self.path).path.rstrip("/") != "/fhir":
                    return 404, _outcome("not-found", f"no endpoint {self.path}")
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return 401, _outcome("login", "a bearer token is required")
                if not self.headers.get("Content-Type", "").startswith("application/fhir+json"):
                    return 415, _outcome("not-supported", "send application/fhir+json")
                if server.outages > 0:
                    server.outages -= 1
                    return 503, _outcome("transient", "down for maintenance")
                bundle = json.loads(body)
                server.bundles.append(bundle)
                return server.transaction(bundle)

        return Handler


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def _rewritten(value: Any, resolved: dict[str, str]) -> Any:
    """`value` with every `reference` to a full URL of the transaction pointing at its resource."""
    if isinstance(value, dict):
        return {
            k: (resolved.get(v) or v) if k == "reference" and isinstance(v, str) else _rewritten(v, resolved)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewritten(v, resolved) for v in value]
    return value


def references(resource: dict[str, Any]) -> Iterator[str]:
    """Every reference a resource holds."""
    if isinstance(resource, dict):
        for k, v in resource.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from references(v)
    elif isinstance(resource, list):
        for v in resource:
            yield from references(v)
