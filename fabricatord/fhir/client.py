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
AGAIN = frozenset({408, 425, 429})
"""4xx statuses that say "later", not "never"."""


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
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = _diagnostics(exc.read())
        permanent = 400 <= exc.code < 500 and exc.code not in AGAIN
        raise FhirError(f"HTTP {exc.code} {exc.reason}{': ' + detail if detail else ''}", permanent) from None
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
        reason = getattr(exc, "reason", exc)
        raise FhirError(f"cannot reach {url}: {reason}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise FhirError("the server's answer is not JSON") from None
    if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle":
        raise FhirError("the server's answer is not a transaction-response Bundle")
    responses = [entry.get("response") or {} for entry in answer.get("entry") or []]
    statuses = [str(r.get("status", "")) for r in responses]
    failed = [s for s in statuses if not s.startswith("2")]
    if failed:
        raise FhirError(f"entries refused: {', '.join(failed)}", all(s.startswith("4") for s in failed))
    return Outcome(statuses, [str(r.get("location", "")) for r in responses])


def _diagnostics(body: bytes) -> str:
    """An OperationOutcome's first diagnostics (or details), what a server says of a refusal."""
    try:
        outcome = json.loads(body)
        issue = (outcome.get("issue") or [{}])[0]
        return str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")[:300]
    except (ValueError, AttributeError, IndexError):
        return body[:200].decode("utf-8", "replace").strip()
