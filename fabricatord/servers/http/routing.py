"""Routes in one table, each saying who may call it; one dispatcher that signs callers in, checks
CSRF and roles, runs the handler off the reactor and audits what changed something.

A handler is a plain function from a `Call` to a `Reply`: the pages and the API share the same
checks, so that no page offers what the API would refuse.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlencode

from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from fabricatord.db.audit import AuditLog, AuditRecord
from fabricatord.obs.logging import get_logger
from fabricatord.workflow.access import Directory, Identity, may_administer, may_change

log = get_logger(__name__)

SESSION_COOKIE = "fabricatord_session"
LOGIN_CSRF_COOKIE = "fabricatord_login_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
MAX_BODY = 16 * 1024 * 1024
"""A pasted HL7 message may be large (the listener takes 10 MiB); nothing else comes close."""
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Access = Literal["open", "status", "user", "change", "admin"]
"""open: anyone; status: anyone unless `[http] status_requires_login`; user: any role;
change: a write role; admin: admin only."""


def is_number(text: str, digits: int = 12) -> bool:
    """ASCII digits only, and not so many that a database integer overflows."""
    return text.isascii() and text.isdigit() and len(text) <= digits


class HttpError(Exception):
    """An answer other than success, with the words the caller reads."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(value: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps(value, ensure_ascii=False, default=str).encode(), "application/json", headers)


def redirect(location: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """303 to `location`, percent-encoded where a header could not carry it."""
    return Reply(303, b"", "text/plain", (("Location", quote(location, safe="/?&=%#:;,+@!$'()*~")), *headers))


@dataclass
class Call:
    """One request as a handler sees it."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    cookies: dict[str, str]
    client: str
    secure: bool = False
    """Over HTTPS: the cookies set are Secure whatever `[http] cookie_secure` says."""
    identity: Identity | None = None
    set_cookies: list[str] = field(default_factory=list)
    audit_detail: str = ""
    """What a changing handler did, in a few words for the audit trail."""

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    def int_arg(self, name: str, default: int, low: int = 0, high: int = 10_000) -> int:
        text = self.arg(name)
        if not text:
            return default
        if not is_number(text) or not low <= int(text) <= high:
            raise HttpError(400, f"{name} is a whole number from {low} to {high}, not {text!r}")
        return int(text)

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            value = json.loads(self.body)
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HttpError(400, "the body is a JSON object")
        return value

    def form(self) -> dict[str, str]:
        fields = parse_qs(self.body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return {name: values[0] for name, values in fields.items()}

    def user(self) -> Identity:
        assert self.identity is not None, "a route with access 'open' asked who called it"
        return self.identity

    @property
    def wants_html(self) -> bool:
        return not self.path.startswith("/api/")


Handler = Callable[[Call], Reply]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    """`/api/v1/studies/{uid}`: a `{name}` is one path segment."""
    handler: Handler
    access: Access
    summary: str
    threaded: bool = True
    """False only for answers that touch nothing blocking (`/healthz`, `/metrics`)."""
    regex: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        expression = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(self.pattern))
        object.__setattr__(self, "regex", re.compile(f"^{expression}$"))


class Router:
    def __init__(
        self,
        directory: Directory,
        audit: AuditLog,
        cookie_secure: Callable[[], bool],
        status_requires_login: Callable[[], bool],
    ) -> None:
        self.routes: list[Route] = []
        self._directory = directory
        self._audit = audit
        self._cookie_secure = cookie_secure
        self._status_requires_login = status_requires_login
        self.page_error: Callable[[Call, HttpError], Reply] | None = None
        """How a page shows a refusal (the console sets it); the API answers JSON."""

    def add(
        self, method: str, pattern: str, access: Access, summary: str, threaded: bool = True
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes.append(Route(method, pattern, handler, access, summary, threaded))
            return handler

        return register

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            found = route.regex.match(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, {name: unquote(value) for name, value in found.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise HttpError(405, f"{method} is not allowed here", (("Allow", ", ".join(sorted(set(allowed)))),))
        raise HttpError(404, f"nothing at {path}")

    # -- the checks every call passes ----------------------------------------------------------

    def session_cookie(self, call: Call, secret: str, max_age: int | None = None) -> str:
        parts = [f"{SESSION_COOKIE}={secret}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if call.secure or self._cookie_secure():
            parts.append("Secure")
        return "; ".join(parts)

    def login_csrf_cookie(self, call: Call, value: str) -> str:
        parts = [f"{LOGIN_CSRF_COOKIE}={value}", "Path=/login", "HttpOnly", "SameSite=Strict"]
        if call.secure or self._cookie_secure():
            parts.append("Secure")
        return "; ".join(parts)

    def _identify(self, call: Call) -> Identity | None:
        authorization = call.headers.get("authorization", "")
        if authorization:
            scheme, _, secret = authorization.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise HttpError(401, "Authorization takes a bearer token: `Authorization: Bearer TOKEN`")
            identity = self._directory.identify(secret.strip(), "token")
            if identity is None:
                raise HttpError(401, "the token is unknown, revoked, or its user disabled", _CHALLENGE)
            return identity
        secret = call.cookies.get(SESSION_COOKIE, "")
        return self._directory.identify(secret, "session") if secret else None

    def _check_csrf(self, call: Call, identity: Identity) -> None:
        if identity.kind != "session" or call.method not in CHANGING:
            return
        sent = call.headers.get(CSRF_HEADER, "")
        if not sent and call.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            sent = call.form().get(CSRF_FIELD, "")
        if not sent or not hmac.compare_digest(sent.encode(), identity.csrf_token.encode()):
            raise HttpError(403, "the CSRF token is missing or wrong: reload the page and try again")

    def _permit(self, route: Route, call: Call) -> None:
        access = route.access
        if access == "open" or (access == "status" and not self._status_requires_login()):
            return
        identity = self._identify(call)
        if identity is None:
            if call.wants_html:
                raise _SignIn(call.path + (f"?{urlencode(call.query, doseq=True)}" if call.query else ""))
            raise HttpError(
                401, "sign in first: a session cookie from /login, or `Authorization: Bearer TOKEN`", _CHALLENGE
            )
        call.identity = identity
        self._check_csrf(call, identity)
        if access == "change" and not may_change(identity.role):
            raise HttpError(403, f"the role {identity.role} may not change anything here")
        if access == "admin" and not may_administer(identity.role):
            raise HttpError(403, f"only admin may do this, and {identity.name} is {identity.role}")

    def handle(self, route: Route, call: Call) -> Reply:
        """Sign-in, CSRF, role, the handler, the audit record: on a thread (they read the database)."""
        try:
            self._permit(route, call)
            reply = route.handler(call)
        except _SignIn as exc:
            reply = redirect(f"/login?next={quote(exc.path)}")
        except HttpError as exc:
            reply = self.error(call, exc)
        except Exception as exc:
            log.exception("http handler failed", method=call.method, path=call.path)
            reply = self.error(call, HttpError(500, f"internal error: {type(exc).__name__}"))
        if call.method in CHANGING and call.identity is not None:
            self._record(call, reply)
        return reply

    def error(self, call: Call, exc: HttpError) -> Reply:
        if call.wants_html and exc.status != 401 and self.page_error is not None:
            return self.page_error(call, exc)
        return json_reply({"error": exc.message}, exc.status, exc.headers)

    def _record(self, call: Call, reply: Reply) -> None:
        identity = call.user()
        detail = f"{call.method} {call.path}" + (f": {call.audit_detail}" if call.audit_detail else "")
        try:
            self._audit.append(
                [
                    AuditRecord(
                        at=datetime.now(UTC),
                        operation="HTTP",
                        peer_address=call.client,
                        status=str(reply.status),
                        detail=detail[:256],
                        username=identity.name,
                    )
                ]
            )
        except Exception:
            log.exception("audit record of an HTTP action not written", detail=detail)

    def audit_login(self, call: Call, name: str, outcome: str) -> None:
        self._audit.append(
            [
                AuditRecord(
                    at=datetime.now(UTC),
                    operation="LOGIN",
                    peer_address=call.client,
                    status=outcome,
                    detail=f"sign-in of {name[:64]}",
                    username=name[:64],
                )
            ]
        )


_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="fabricatord"'),)


class _SignIn(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


_SECURITY_HEADERS = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"same-origin"),
    (
        b"Content-Security-Policy",
        b"default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; frame-ancestors 'none'",
    ),
)


class Front(Resource):
    """Every HTTP request enters here and leaves through the router."""

    isLeaf = True

    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router

    def render(self, request: Request) -> Any:
        method = (request.method or b"GET").decode("ascii", errors="replace")
        raw_path = (request.path or b"/").decode("utf-8", errors="replace")
        call = Call(
            method=method,
            path=raw_path,
            params={},
            query={
                k.decode("utf-8", errors="replace"): [v.decode("utf-8", errors="replace") for v in values]
                for k, values in (request.args or {}).items()
            },
            headers={
                name.decode("latin-1").lower(): values[-1].decode("latin-1")
                for name, values in request.requestHeaders.getAllRawHeaders()
                if values
            },
            body=b"",
            cookies=_cookies(request),
            client=_client(request),
            secure=bool(request.isSecure()),
        )
        try:
            route, call.params = self._router.resolve(method, raw_path)
            call.body = _body(request)
        except HttpError as exc:
            self._send(request, self._router.error(call, exc))
            return NOT_DONE_YET
        if not route.threaded:
            self._send(request, self._router.handle(route, call))
            return NOT_DONE_YET

        def failed(failure: Any) -> None:
            log.error("http dispatch failed", error=failure.getErrorMessage(), path=raw_path)
            self._send(request, json_reply({"error": "internal error"}, 500))

        deferToThread(self._router.handle, route, call).addCallbacks(lambda reply: self._send(request, reply), failed)
        return NOT_DONE_YET

    def _send(self, request: Request, reply: Reply) -> None:
        try:
            self._write(request, reply)
        except Exception:
            log.exception("http answer not sent", path=request.path)
            if not request.finished:
                request.setResponseCode(500)
                request.finish()

    def _write(self, request: Request, reply: Reply) -> None:
        if request.finished or getattr(request, "_disconnected", False):  # the client went away while we worked
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", reply.content_type.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        for fixed_name, fixed_value in _SECURITY_HEADERS:
            request.setHeader(fixed_name, fixed_value)
        for name, value in reply.headers:
            if name.lower() == "set-cookie":
                request.responseHeaders.addRawHeader(b"Set-Cookie", value.encode())
            else:
                request.setHeader(name.encode(), value.encode("latin-1"))
        if request.method != b"HEAD":
            request.write(reply.body)
        request.finish()


def _cookies(request: Request) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in request.requestHeaders.getRawHeaders(b"cookie", []):
        try:
            jar.load(header.decode("latin-1"))
        except Exception:  # a malformed cookie header counts as none
            continue
    return {name: morsel.value for name, morsel in jar.items()}


def _client(request: Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", "")
    port = getattr(peer, "port", "")
    return f"{host}:{port}" if host else ""


def _body(request: Request) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise HttpError(413, f"a request body is at most {MAX_BODY // (1024 * 1024)} MiB")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise HttpError(413, f"a request body is at most {MAX_BODY // (1024 * 1024)} MiB")
    return bytes(data)
