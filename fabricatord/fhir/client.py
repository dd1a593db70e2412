"""POST a transaction Bundle to a FHIR server and read its transaction-response: which failures
are worth another try (the server down or overloaded) and which it would repeat (a 4xx)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

FHIR_JSON = "application/fhir+json"
AGAIN = frozenset({408, 409, 425, 429})
"""4xx statuses that say "later", not "never" (409: a conflict of concurrent writes, as HAPI says)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: object, **__: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class FhirError(Exception):
    """The server did not take the Bundle; `permanent` when sending it again would not help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Outcome:
    """What the server answered for each entry, in order: `201 Created`, `200 OK`…"""

    statuses: list[str]
    locations: list[str]


def post_transaction(url: str, bundle: dict[str, Any], bearer_token: str = "", timeout: float = 30.0) -> Outcome:
    """The Bundle POSTed to the server's base `url`; FhirError unless every entry succeeded."""
    headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON}
    if bearer_token:
        headers["Authorization"] = f"Bearer {bearer_token}"
    request = urllib.request.Request(url, json.dumps(bundle).encode(), headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:  # urllib would follow it as a GET: the Bundle would never arrive
            where = exc.headers.get("Location", "")
            raise FhirError(f"HTTP {exc.code} redirects to {where}: give that URL as the destination", True) from None
        try:
            detail = _diagnostics(exc.read())
        except (OSError, http.client.HTTPException):
            detail = ""
        permanent = 400 <= exc.code < 500 and exc.code not in AGAIN
        raise FhirError(f"HTTP {exc.code} {exc.reason}{': ' + detail if detail else ''}", permanent) from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
        reason = getattr(exc, "reason", exc)
        raise FhirError(f"cannot reach {url}: {reason}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise FhirError("the server's answer is not JSON") from None
    if not isinstance(answer, dict) or answer.get("type") != "transaction-response":
        raise FhirError("the server's answer is not a transaction-response Bundle")
    entries = answer.get("entry")
    listed = entries if isinstance(entries, list) else []
    responses: list[dict[str, Any]] = [
        e["response"] for e in listed if isinstance(e, dict) and isinstance(e.get("response"), dict)
    ]
    sent = len(bundle.get("entry", []))
    if len(responses) != sent or len(listed) != sent:
        raise FhirError(f"the server answered {len(responses)} entries for {sent}")
    statuses = [str(r.get("status", "")) for r in responses]
    failed = [s for s in statuses if not s.startswith("2")]
    if failed:
        permanent = all(s.startswith("4") and int(s[:3]) not in AGAIN for s in failed if s[:3].isdigit())
        raise FhirError(f"entries refused: {', '.join(failed)}", permanent)
    return Outcome(statuses, [str(r.get("location", "")) for r in responses])


def _diagnostics(body: bytes) -> str:
    """An OperationOutcome's first diagnostics (or details), what a server says of a refusal."""
    try:
        outcome = json.loads(body)
        issue = (outcome.get("issue") or [{}])[0]
        return str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")[:300]
    except (ValueError, AttributeError, IndexError):
        return body[:200].decode("utf-8", "replace").strip()
