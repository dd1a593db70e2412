"""The web console: server-rendered pages over the same work as the API.

Pages only read; every button and form posts to `/api/v1` through `static/app.js` (with the
session's CSRF token), so that what a page offers a script can do too. A button for an action
the user's role may not take is not drawn.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

from fabricatord import __version__
from fabricatord.db import InstanceIndex
from fabricatord.db.jobs import Acquisitions, FhirJobs, RouteJobs
from fabricatord.db.messages import MessageLog
from fabricatord.db.status import counts
from fabricatord.db.timeline import timeline
from fabricatord.db.worklist import STEP_STATES, Worklist
from fabricatord.servers.http import api
from fabricatord.servers.http.department import Department
from fabricatord.servers.http.routing import Call, HttpError, Reply, Router, is_number, new_csrf, redirect
from fabricatord.synth.templates import TEMPLATES
from fabricatord.workflow.access import ROLES, BadCredentials, LockedOut, may_administer, may_change

if TYPE_CHECKING:
    from jinja2 import Environment

_STATIC = {"app.css": "text/css", "app.js": "text/javascript"}
SEARCH_KEYS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy", "StudyDescription")
PAGE = 50


def _local(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _person(name: str) -> str:
    """A DICOM PN for people: family^given as `family, given`."""
    family, _, rest = (name or "").partition("^")
    given = rest.split("^")[0]
    return f"{family}, {given}" if given else family


@functools.cache
def _templates() -> Environment:
    """Built at the first page, not at the daemon's start: most daemons serve no browser."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(
        loader=PackageLoader("fabricatord.servers.http", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["local"] = _local
    environment.filters["person"] = _person
    return environment


def render(call: Call, template: str, code: int = 200, **values: Any) -> Reply:
    identity = call.identity
    page = (
        _templates()
        .get_template(template)
        .render(
            me=identity,
            may_change=bool(identity and may_change(identity.role)),
            may_administer=bool(identity and may_administer(identity.role)),
            csrf=identity.csrf_token if identity and identity.kind == "session" else "",
            path=call.path,
            version=__version__,
            **values,
        )
    )
    return Reply(code, page.encode(), "text/html; charset=utf-8")


def error_page(call: Call, exc: HttpError) -> Reply:
    return render(call, "error.html", exc.status, status=exc.status, message=exc.message)


_OUR_PATH = re.compile(r"/(?![/\\])[^\\\x00-\x1f\x7f]*")


def _safe_next(target: str) -> str:
    """Only a path of ours: a login must not become an open redirect (`//host`, `/\\host`)."""
    if not _OUR_PATH.fullmatch(target) or urlparse(target).netloc:
        return "/"
    return target


def install(router: Router, department: Department) -> None:
    d = department
    router.page_error = error_page

    @router.add("GET", "/static/{name}", "open", "The console's stylesheet and script")
    def static(call: Call) -> Reply:
        name = call.params["name"]
        if name not in _STATIC:
            raise HttpError(404, f"nothing at {call.path}")
        data = importlib.resources.files("fabricatord.servers.http").joinpath("static", name).read_bytes()
        return Reply(200, data, _STATIC[name])

    # -- signing in --------------------------------------------------------------------------

    @router.add("GET", "/login", "open", "The sign-in form")
    def login_form(call: Call) -> Reply:
        token = new_csrf()
        reply = render(
            call,
            "login.html",
            csrf_login=token,
            next=_safe_next(call.arg("next", "/")),
            first_user=not d.directory.has_users(),
            error="",
        )
        return Reply(
            reply.status, reply.body, reply.content_type, (("Set-Cookie", router.login_csrf_cookie(call, token)),)
        )

    @router.add("POST", "/login", "open", "Sign in: a session cookie")
    def login(call: Call) -> Reply:
        form = call.form()
        name, password = form.get("username", ""), form.get("password", "")
        target = _safe_next(form.get("next", "/"))
        expected = call.cookies.get("fabricatord_login_csrf", "")
        if not expected or form.get("csrf_token", "") != expected:
            raise HttpError(403, "the sign-in form has expired: reload it and try again")
        try:
            signed_in = d.directory.sign_in(name, password)
        except LockedOut as exc:
            router.audit_login(call, name, "locked")
            token = new_csrf()
            reply = render(call, "login.html", 429, csrf_login=token, next=target, first_user=False, error=str(exc))
            headers = (("Retry-After", str(exc.retry_after)), ("Set-Cookie", router.login_csrf_cookie(call, token)))
            return Reply(429, reply.body, reply.content_type, headers)
        except BadCredentials as exc:
            router.audit_login(call, name, "failed")
            token = new_csrf()
            reply = render(call, "login.html", 401, csrf_login=token, next=target, first_user=False, error=str(exc))
            return Reply(401, reply.body, reply.content_type, (("Set-Cookie", router.login_csrf_cookie(call, token)),))
        router.audit_login(call, name, "signed in")
        return redirect(target, (("Set-Cookie", router.session_cookie(call, signed_in.secret)),))

    @router.add("POST", "/logout", "user", "Sign out: the session ends")
    def logout(call: Call) -> Reply:
        d.directory.sign_out(call.user())
        return redirect("/login", (("Set-Cookie", router.session_cookie(call, "", max_age=0)),))

    # -- pages -------------------------------------------------------------------------------

    @router.add("GET", "/", "user", "The dashboard")
    def dashboard(call: Call) -> Reply:
        ready, checks = api.readiness(d)
        peers = api.peer_listing(d, call.user().role, reach=True)
        failed_routes = RouteJobs(d.database).listing(["failed"], "", 10)
        failed_messages = [m for m in MessageLog(d.database).recent(50) if m.outcome not in ("AA", "CA")][:10]
        return render(
            call,
            "dashboard.html",
            ready=ready,
            checks=checks,
            listeners=d.listeners,
            counts=counts(d.database),
            peers=peers,
            failed_routes=failed_routes,
            failed_messages=failed_messages,
            activity=d.audit.search(limit=15),
        )

    @router.add("GET", "/studies", "user", "Study search")
    def studies(call: Call) -> Reply:
        filters = {key: call.arg(key) for key in SEARCH_KEYS if call.arg(key)}
        offset = call.int_arg("offset", 0, 0, 10_000_000)
        page = api.search(d, filters, PAGE, offset)
        return render(
            call, "studies.html", filters=filters, keys=SEARCH_KEYS, page=page, offset=offset, limit=PAGE, quote=quote
        )

    @router.add("GET", "/studies/{uid}", "user", "A study: series, images, tags")
    def study(call: Call) -> Reply:
        uid = call.params["uid"]
        tree = InstanceIndex(d.database).study_tree(api._uid(uid))
        if tree is None:
            raise HttpError(404, f"no stored study has Study Instance UID {uid}")
        instances = [i for s in tree.series for i in s.instances]
        chosen = call.arg("instance") or (instances[0].sop_instance_uid if instances else "")
        tags = _tags(d, chosen) if chosen else []
        peers = [p for p in api.peer_listing(d, call.user().role, reach=False) if p["may_send"]]
        return render(call, "study.html", study=tree, chosen=chosen, tags=tags, peers=peers)

    @router.add("GET", "/generate", "user", "The generate form")
    def generate(call: Call) -> Reply:
        peers = [p for p in api.peer_listing(d, call.user().role, reach=False) if p["may_send"]]
        return render(call, "generate.html", modalities=list(TEMPLATES), peers=peers)

    @router.add("GET", "/worklist", "user", "The worklist")
    def worklist(call: Call) -> Reply:
        wanted = call.arg("status", "").upper()
        statuses = list(STEP_STATES) if wanted in ("", "ALL") else [wanted]
        if wanted and wanted != "ALL" and wanted not in STEP_STATES:
            raise HttpError(400, f"status {wanted!r} is not one of {', '.join(STEP_STATES)}")
        items = Worklist(d.database).items(statuses, call.arg("station"), call.arg("date"), 200)
        return render(
            call,
            "worklist.html",
            items=items,
            states=STEP_STATES,
            status=wanted,
            station=call.arg("station"),
            date=call.arg("date"),
            modalities=list(TEMPLATES),
        )

    @router.add("GET", "/hl7", "user", "The HL7 log, and a message to paste")
    def hl7(call: Call) -> Reply:
        outcome = call.arg("outcome").upper()
        return render(
            call,
            "hl7.html",
            messages=MessageLog(d.database).recent(100, outcome),
            outcome=outcome,
            modalities=list(TEMPLATES),
        )

    @router.add("GET", "/hl7/{id}", "user", "One HL7 message, its segments and its ACK")
    def hl7_message(call: Call) -> Reply:
        pk = call.params["id"]
        message = MessageLog(d.database).get(int(pk)) if is_number(pk, 9) else None
        if message is None:
            raise HttpError(404, f"no HL7 message {pk}")
        text = message.raw.decode("utf-8", errors="replace")
        segments = [s.split("|") for s in text.replace("\n", "\r").split("\r") if s]
        ack = [s for s in message.ack.decode("utf-8", errors="replace").replace("\n", "\r").split("\r") if s]
        return render(call, "hl7_message.html", message=message, segments=segments, ack=ack)

    @router.add("GET", "/jobs", "user", "Acquisition, route and FHIR jobs")
    def jobs(call: Call) -> Reply:
        state = call.arg("state")
        states = [state] if state else []
        return render(
            call,
            "jobs.html",
            acquisitions=Acquisitions(d.database).listing(states, 100),
            routes=RouteJobs(d.database).listing(states, call.arg("study"), 200),
            exports=FhirJobs(d.database).listing(states, call.arg("study"), 100),
            sendable={peer.name for peer, _, may_send in d.peers_for(call.user().role) if may_send},
            state=state,
            study=call.arg("study"),
        )

    @router.add("GET", "/trace", "user", "Trace an accession number")
    def trace_form(call: Call) -> Reply:
        accession = call.arg("accession")
        if accession:
            return redirect(f"/trace/{quote(accession, safe='')}")
        return render(call, "trace.html", found=None, accession="")

    @router.add("GET", "/trace/{accession}", "user", "An order's timeline")
    def trace(call: Call) -> Reply:
        accession = call.params["accession"]
        found = timeline(d.database, accession)
        if found is None:
            raise HttpError(404, f"no order has the accession number {accession!r}")
        first = found.events[0].at if found.events else None
        events = [(e, (e.at - first).total_seconds() if first else 0.0) for e in found.events]
        return render(call, "trace.html", found=found, events=events, accession=accession)

    @router.add("GET", "/peers", "user", "Peers: reachability, echo, query across peers, move")
    def peers(call: Call) -> Reply:
        return render(call, "peers.html", peers=api.peer_listing(d, call.user().role, reach=True))

    @router.add("GET", "/audit", "user", "The audit trail")
    def audit(call: Call) -> Reply:
        records = d.audit.search(
            call.arg("operation"), call.arg("calling_ae"), "", None, call.arg("failures") == "1", 200, call.arg("user")
        )
        return render(
            call,
            "audit.html",
            records=records,
            operation=call.arg("operation"),
            calling_ae=call.arg("calling_ae"),
            user=call.arg("user"),
            failures=call.arg("failures") == "1",
        )

    @router.add("GET", "/users", "admin", "Users and their roles")
    def users(call: Call) -> Reply:
        return render(call, "users.html", users=d.directory.users(), roles=ROLES)


def _tags(d: Department, sop_instance_uid: str) -> list[tuple[str, str, str, str]]:
    """(tag, keyword, VR, value) of an instance's top-level attributes, pixel data left out."""
    from pydicom import dcmread

    stored = InstanceIndex(d.database).lookup([sop_instance_uid]).get(sop_instance_uid)
    if stored is None:
        return []
    ds = dcmread(d.settings.storage_dir / stored.path, stop_before_pixels=True)
    rows = []
    for element in [*ds.file_meta, *ds]:
        if element.VR == "SQ":
            value = f"({len(element.value)} item{'s' if len(element.value) != 1 else ''})"
        elif element.VR in ("OB", "OW", "OF", "OD", "OL", "UN"):
            value = f"({len(element.value or b'')} bytes)"
        else:
            value = str(element.value)
        rows.append((f"({element.tag.group:04X},{element.tag.element:04X})", element.keyword, element.VR, value[:200]))
    return rows
