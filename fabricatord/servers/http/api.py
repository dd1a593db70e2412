"""The REST API, `/api/v1`: every action the console offers, for scripts. JSON in and out."""

from __future__ import annotations

import io
import math
import socket
import time
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from fabricatord import __version__
from fabricatord.config import PeerSettings
from fabricatord.config.values import is_valid_uid, parse_duration
from fabricatord.db import InstanceIndex, PatientRegistry
from fabricatord.db.jobs import Acquisitions, FhirJobs, RouteJobs
from fabricatord.db.messages import MessageLog
from fabricatord.db.status import counts, reachable
from fabricatord.db.timeline import timeline
from fabricatord.db.worklist import ACTIONABLE, STEP_STATES, UnknownPatient, Worklist
from fabricatord.dicom import keys as query_keys
from fabricatord.dicom import query, scu
from fabricatord.dicom.preview import NoPixels, render_png
from fabricatord.hl7.codec import Hl7Error
from fabricatord.hl7.mllp import MllpClient, as_wire
from fabricatord.servers.http.department import Department
from fabricatord.servers.http.routing import Call, HttpError, Reply, Router, is_number, json_reply
from fabricatord.synth.templates import TEMPLATES
from fabricatord.workflow import remote
from fabricatord.workflow.access import (
    MAX_PASSWORD,
    MIN_PASSWORD,
    ROLES,
    NoSuchUser,
    PasswordRules,
    UserExists,
    may_reach,
)
from fabricatord.workflow.fhir import Exports
from fabricatord.workflow.generation import GenerateOptions, StudyGenerator
from fabricatord.workflow.hl7 import Inbox
from fabricatord.workflow.worklist import Scheduler, WorklistRequest, parse_code

THUMBNAIL = 128
MAX_IMAGES = 5_000
"""The largest study one generate request makes (series × images)."""
PAGE_LIMIT = 1_000


def install(router: Router, department: Department) -> None:
    """Register every `/api/v1` route."""
    d = department
    api = "/api/v1"

    # -- status ------------------------------------------------------------------------------

    @router.add("GET", f"{api}/status", "status", "Counts, listeners and uptime (no PHI)")
    def status(call: Call) -> Reply:
        return json_reply(
            {
                "version": __version__,
                "node": d.settings.node_name,
                "uptime_seconds": round(time.time() - d.started, 1),
                "listeners": d.listeners,
                **counts(d.database),
            }
        )

    @router.add("GET", f"{api}/me", "user", "Who the credentials belong to, with the CSRF token of a session")
    def me(call: Call) -> Reply:
        user = call.user()
        answer: dict[str, Any] = {"name": user.name, "role": user.role, "by": user.kind}
        if user.kind == "session":
            answer["csrf_token"] = user.csrf_token
        return json_reply(answer)

    # -- studies -----------------------------------------------------------------------------

    @router.add("GET", f"{api}/studies", "user", "Search studies by C-FIND keywords, newest first")
    def studies(call: Call) -> Reply:
        limit = call.int_arg("limit", 100, 1, PAGE_LIMIT)
        offset = call.int_arg("offset", 0, 0, 10_000_000)
        page = search(d, {k: v[0] for k, v in call.query.items() if k not in ("limit", "offset")}, limit, offset)
        return json_reply({"total": page.total, "limit": limit, "offset": offset, "studies": page.studies})

    @router.add("GET", f"{api}/studies/{{uid}}", "user", "A study with its series and instances")
    def study(call: Call) -> Reply:
        tree = InstanceIndex(d.database).study_tree(_uid(call.params["uid"]))
        if tree is None:
            raise HttpError(404, f"no stored study has Study Instance UID {call.params['uid']}")
        return json_reply(asdict(tree))

    @router.add("GET", f"{api}/studies/{{uid}}/archive", "user", "A study's files as a ZIP")
    def archive(call: Call) -> Reply:
        uid = _uid(call.params["uid"])
        stored = InstanceIndex(d.database).study_instances(uid)
        if not stored:
            raise HttpError(404, f"no stored study has Study Instance UID {uid}")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for number, instance in enumerate(stored, 1):
                name = f"{uid}/{number:05d}_{instance.sop_instance_uid}.dcm"
                try:
                    archive.write(d.settings.storage_dir / instance.path, name)
                except FileNotFoundError:
                    raise HttpError(410, f"the file of instance {instance.sop_instance_uid} is gone") from None
        disposition = f'attachment; filename="{uid}.zip"'
        return Reply(200, buffer.getvalue(), "application/zip", (("Content-Disposition", disposition),))

    @router.add("GET", f"{api}/studies/{{uid}}/thumbnail", "user", "The study's first image as a small PNG")
    def study_thumbnail(call: Call) -> Reply:
        stored = InstanceIndex(d.database).study_instances(_uid(call.params["uid"]))
        if not stored:
            raise HttpError(404, f"no stored study has Study Instance UID {call.params['uid']}")
        return _png(d.settings.storage_dir / stored[0].path, 0, THUMBNAIL)

    @router.add("DELETE", f"{api}/studies/{{uid}}", "admin", "Delete a stored study (rows, then files)")
    def delete_study(call: Call) -> Reply:
        uid = _uid(call.params["uid"])
        if d.writer is None:
            raise HttpError(503, "this process holds no storage writer")
        deleted = d.writer.delete_study(uid)
        if deleted is None:
            raise HttpError(404, f"no stored study has Study Instance UID {uid}")
        call.audit_detail = f"study {uid}, {deleted.files} files"
        return json_reply({"deleted": uid, "files": deleted.files})

    @router.add(
        "POST", f"{api}/studies/{{uid}}/reidentify", "admin", "A de-identified study's original values (a proxy's key)"
    )
    def reidentify(call: Call) -> Reply:
        uid = _uid(call.params["uid"])
        if d.proxies is None:
            raise HttpError(503, "this process holds no proxies")
        restored = d.proxies.reidentify(uid, who=call.user().name)
        if restored is None:
            raise HttpError(404, f"no proxy de-identified a study with Study Instance UID {uid}")
        call.audit_detail = f"study {uid}, {len(restored)} attributes"
        return json_reply({"study": uid, "attributes": [r.__dict__ for r in restored]})

    @router.add("POST", f"{api}/studies/{{uid}}/send", "change", "C-STORE a stored study to a peer")
    def send_study(call: Call) -> Reply:
        uid = _uid(call.params["uid"])
        name = call.json().get("peer")
        if not isinstance(name, str) or not name:
            raise HttpError(400, "peer: the [[peers]] name to send to")
        peer = _peer_for(d, call, name, write=True)
        stored = InstanceIndex(d.database).study_instances(uid)
        if not stored:
            raise HttpError(404, f"no stored study has Study Instance UID {uid}")
        report = scu.send(
            scu.Peer.of(peer),
            d.settings.node.ae_title,
            [d.settings.storage_dir / s.path for s in stored],
            scu.Timeouts.of(d.settings.dicom),
        )
        call.audit_detail = f"study {uid} to {peer.name}: {report.sent} of {len(stored)}"
        return json_reply(
            {
                "peer": peer.name,
                "sent": report.sent,
                "warnings": report.warnings,
                "failed": [{"file": p.name, "why": why} for p, why in report.failed],
                "seconds": round(report.seconds, 3),
            },
            200 if not report.failed else 502,
        )

    # -- instances ---------------------------------------------------------------------------

    @router.add("GET", f"{api}/instances/{{uid}}/tags", "user", "An instance's attributes, DICOM JSON (PS3.18 F)")
    def tags(call: Call) -> Reply:
        uid, path = _instance(d, call)
        ds = _read(path, stop_before_pixels=False)
        bulk = f"{api}/instances/{uid}/file"
        return json_reply(ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _: bulk))

    @router.add("GET", f"{api}/instances/{{uid}}/rendered", "user", "A frame as PNG (`frame` from 1)")
    def rendered(call: Call) -> Reply:
        _, path = _instance(d, call)
        return _png(path, call.int_arg("frame", 1, 1, 100_000) - 1, None)

    @router.add("GET", f"{api}/instances/{{uid}}/thumbnail", "user", "The first frame as a small PNG")
    def thumbnail(call: Call) -> Reply:
        _, path = _instance(d, call)
        return _png(path, 0, THUMBNAIL)

    @router.add("GET", f"{api}/instances/{{uid}}/file", "user", "The DICOM file as stored")
    def instance_file(call: Call) -> Reply:
        uid, path = _instance(d, call)
        disposition = f'attachment; filename="{uid}.dcm"'
        try:
            return Reply(200, path.read_bytes(), "application/dicom", (("Content-Disposition", disposition),))
        except FileNotFoundError:
            raise HttpError(410, f"the file of instance {uid} is gone from storage") from None

    # -- generate ----------------------------------------------------------------------------

    @router.add("POST", f"{api}/generate", "user", "Generate a study into our node (and send it to a peer)")
    def generate(call: Call) -> Reply:
        body = call.json()
        made = generate_study(d, call, body)
        return json_reply(made, 201)

    # -- worklist ----------------------------------------------------------------------------

    @router.add("GET", f"{api}/worklist", "user", "Scheduled steps by start time (`status`, `station`, `date`)")
    def worklist(call: Call) -> Reply:
        wanted = call.arg("status").upper()
        statuses = STEP_STATES if wanted == "ALL" else ([s for s in wanted.split(",") if s] or list(ACTIONABLE))
        for status in statuses:
            if status not in STEP_STATES:
                raise HttpError(400, f"status {status!r} is not one of {', '.join(STEP_STATES)} (or ALL)")
        items = Worklist(d.database).items(
            statuses,
            call.arg("station"),
            call.arg("date"),
            call.int_arg("limit", 100, 1, PAGE_LIMIT),
            call.arg("patient_id"),
        )
        return json_reply({"items": [asdict(item) for item in items]})

    @router.add("POST", f"{api}/worklist", "change", "Schedule an order: one requested procedure with one step")
    def add_worklist(call: Call) -> Reply:
        return json_reply(schedule(d, call, call.json()), 201)

    @router.add("POST", f"{api}/worklist/{{sps_id}}/status", "change", "Set a step's status")
    def step_status(call: Call) -> Reply:
        status = str(call.json().get("status", "")).upper()
        return json_reply(change_step(d, call, call.params["sps_id"], status))

    @router.add("POST", f"{api}/worklist/{{sps_id}}/cancel", "change", "Cancel a step (it is not acquired)")
    def cancel_step(call: Call) -> Reply:
        return json_reply(change_step(d, call, call.params["sps_id"], "CANCELED"))

    # -- patients ----------------------------------------------------------------------------

    @router.add("GET", f"{api}/patients", "user", "The registry: `search` (wildcards * ?), `limit`, `offset`")
    def patients(call: Call) -> Reply:
        registry = PatientRegistry(d.database)
        limit = call.int_arg("limit", 100, 1, PAGE_LIMIT)
        text = call.arg("search")
        found = registry.search(text, limit) if text else registry.page(limit, call.int_arg("offset", 0, 0, 10**7))
        return json_reply({"patients": [asdict(p) for p in found]})

    @router.add("POST", f"{api}/patients", "user", "Register a synthetic patient (`patient_id`, `sex` optional)")
    def add_patient(call: Call) -> Reply:
        body = call.json()
        sex = str(body.get("sex", "")).upper() or None
        if sex not in (None, "M", "F", "O"):
            raise HttpError(400, "sex is M, F or O")
        if len(str(body.get("patient_id", ""))) > 64:
            raise HttpError(400, "patient_id has at most 64 characters")
        patient, created = StudyGenerator(d.settings, d.database).new_patient(str(body.get("patient_id", "")), sex)
        call.audit_detail = f"patient {patient.patient_id}"
        return json_reply({"patient": asdict(patient), "created": created}, 201 if created else 200)

    @router.add("GET", f"{api}/patients/{{patient_id}}", "user", "A patient with their studies and orders")
    def patient(call: Call) -> Reply:
        patient_id = call.params["patient_id"]
        found = PatientRegistry(d.database).summary(patient_id)
        if not found:
            raise HttpError(404, f"no patient with ID {patient_id!r}")
        page = search(d, {"PatientID": patient_id.replace("*", "").replace("?", "")}, PAGE_LIMIT, 0)
        orders = Worklist(d.database).items(STEP_STATES, limit=PAGE_LIMIT, patient_id=patient_id)
        return json_reply(
            {
                "patients": [
                    {**asdict(item.patient), "studies": item.studies, "instances": item.instances} for item in found
                ],
                "studies": page.studies,
                "orders": [asdict(item) for item in orders],
            }
        )

    # -- HL7 ---------------------------------------------------------------------------------

    @router.add("GET", f"{api}/hl7/messages", "user", "The HL7 message log, newest first (`outcome`, `control_id`)")
    def messages(call: Call) -> Reply:
        found = MessageLog(d.database).recent(
            call.int_arg("limit", 100, 1, PAGE_LIMIT), call.arg("outcome").upper(), call.arg("control_id")
        )
        return json_reply({"messages": [_message(m, whole=False) for m in found]})

    @router.add("GET", f"{api}/hl7/messages/{{id}}", "user", "One HL7 message with its ACK and what it did")
    def message(call: Call) -> Reply:
        pk = call.params["id"]
        found = MessageLog(d.database).get(int(pk)) if is_number(pk, 9) else None
        if found is None:
            raise HttpError(404, f"no HL7 message {pk}")
        return json_reply(_message(found, whole=True))

    @router.add("POST", f"{api}/hl7/preview", "user", "What a pasted message would make; nothing is kept")
    def preview(call: Call) -> Reply:
        return json_reply(preview_message(d, str(call.json().get("message", ""))))

    @router.add("POST", f"{api}/hl7/send", "change", "Send a pasted (or generated) message to us or HOST:PORT")
    def send_hl7(call: Call) -> Reply:
        return json_reply(send_message(d, call, call.json()))

    # -- jobs --------------------------------------------------------------------------------

    @router.add("GET", f"{api}/jobs", "user", "Acquisition (a1), route (r1), FHIR (f1) jobs (`kind`, `state`, `study`)")
    def jobs(call: Call) -> Reply:
        kind = call.arg("kind", "all")
        if kind not in ("all", "acquisitions", "routes", "fhir"):
            raise HttpError(400, "kind is all, acquisitions, routes or fhir")
        states = [call.arg("state")] if call.arg("state") else []
        limit = call.int_arg("limit", 100, 1, PAGE_LIMIT)
        found: list[dict[str, Any]] = []
        if kind in ("all", "acquisitions"):
            found += [_acquisition(a) for a in Acquisitions(d.database).listing(states, limit)]
        if kind in ("all", "routes"):
            found += [_route(r) for r in RouteJobs(d.database).listing(states, call.arg("study"), limit)]
        if kind in ("all", "fhir"):
            found += [_fhir(f) for f in FhirJobs(d.database).listing(states, call.arg("study"), limit)]
        return json_reply({"jobs": found})

    @router.add("GET", f"{api}/jobs/{{id}}", "user", "One job")
    def job(call: Call) -> Reply:
        found = _jobs(d, [call.params["id"]])
        if not found:
            raise HttpError(404, f"no job {call.params['id']}")
        return json_reply(found[0])

    @router.add(
        "POST", f"{api}/jobs/{{id}}/retry", "change", "A failed, canceled or waiting job due again now (FHIR: or done)"
    )
    def retry(call: Call) -> Reply:
        return json_reply(act_on_jobs(d, call, "retry", [call.params["id"]]))

    @router.add("POST", f"{api}/jobs/{{id}}/cancel", "change", "A pending job stops here")
    def cancel(call: Call) -> Reply:
        return json_reply(act_on_jobs(d, call, "cancel", [call.params["id"]]))

    @router.add("POST", f"{api}/jobs/retry", "change", "Retry in bulk: `ids`, or a filter `kind`, `state`, `study`")
    def retry_many(call: Call) -> Reply:
        return json_reply(act_on_jobs(d, call, "retry", _selected_jobs(d, call.json())))

    @router.add("POST", f"{api}/jobs/cancel", "change", "Cancel in bulk: `ids`, or a filter `kind`, `state`, `study`")
    def cancel_many(call: Call) -> Reply:
        return json_reply(act_on_jobs(d, call, "cancel", _selected_jobs(d, call.json())))

    # -- trace and audit ---------------------------------------------------------------------

    @router.add("GET", f"{api}/trace/{{accession}}", "user", "An order's timeline, by accession number")
    def trace(call: Call) -> Reply:
        found = timeline(d.database, call.params["accession"])
        if found is None:
            raise HttpError(404, f"no order has the accession number {call.params['accession']!r}")
        return json_reply(
            {
                "accession_number": found.accession_number,
                "study_instance_uids": found.study_instance_uids,
                "events": [{"at": e.at.isoformat(), "what": e.what} for e in found.events],
            }
        )

    @router.add("GET", f"{api}/audit", "user", "Audit events, newest first (`operation`, `user`, `since`, ...)")
    def audit(call: Call) -> Reply:
        since = None
        if call.arg("since"):
            try:
                since = datetime.now(UTC) - timedelta(seconds=parse_duration(call.arg("since")))
            except ValueError as exc:
                raise HttpError(400, f"since: {exc}") from None
        records = d.audit.search(
            call.arg("operation"),
            call.arg("calling_ae"),
            call.arg("association"),
            since,
            call.arg("failures") in ("1", "true", "yes"),
            call.int_arg("limit", 100, 1, PAGE_LIMIT),
            call.arg("user"),
        )
        return json_reply({"events": [{**asdict(r), "at": r.at.isoformat()} for r in records]})

    # -- peers -------------------------------------------------------------------------------

    @router.add("GET", f"{api}/peers", "user", "Configured peers, what your role may do with each, reachability")
    def peers(call: Call) -> Reply:
        return json_reply({"peers": peer_listing(d, call.user().role, call.arg("reach", "1") != "0")})

    @router.add("POST", f"{api}/peers/{{name}}/echo", "user", "C-ECHO a peer")
    def echo(call: Call) -> Reply:
        peer = _peer_for(d, call, call.params["name"], write=False)
        try:
            seconds = scu.echo(scu.Peer.of(peer), d.settings.node.ae_title, scu.Timeouts.of(d.settings.dicom))
        except scu.ScuError as exc:
            return json_reply({"peer": peer.name, "ok": False, "error": str(exc)}, 502)
        return json_reply({"peer": peer.name, "ok": True, "milliseconds": round(seconds * 1000, 1)})

    @router.add("POST", f"{api}/find", "user", "C-FIND at one or more peers side by side")
    def find(call: Call) -> Reply:
        return json_reply(find_at_peers(d, call, call.json()))

    @router.add("POST", f"{api}/move", "change", "Ask a peer to C-MOVE studies to another peer (or to us)")
    def move(call: Call) -> Reply:
        return json_reply(move_studies(d, call, call.json()))

    # -- users -------------------------------------------------------------------------------

    @router.add("GET", f"{api}/users", "admin", "Every user with role and state")
    def users(call: Call) -> Reply:
        return json_reply({"users": [_user(u) for u in d.directory.users()]})

    @router.add("POST", f"{api}/users", "admin", "A new user: `name`, `role`, `password`")
    def add_user(call: Call) -> Reply:
        body = call.json()
        try:
            user = d.directory.add(str(body.get("name", "")), str(body.get("role", "")), str(body.get("password", "")))
        except UserExists as exc:
            raise HttpError(409, str(exc)) from None
        except (PasswordRules, ValueError) as exc:
            raise HttpError(400, str(exc)) from None
        call.audit_detail = f"user {user.name} ({user.role})"
        return json_reply(_user(user), 201)

    @router.add("POST", f"{api}/users/{{name}}", "admin", "Change a user: `role`, `password`, `disabled`")
    def change_user(call: Call) -> Reply:
        return json_reply(change_user_of(d, call, call.params["name"], call.json()))

    @router.add("POST", f"{api}/users/{{name}}/token", "admin", "A new API token for the user, shown once")
    def token(call: Call) -> Reply:
        name = call.params["name"]
        try:
            secret = d.directory.new_token(name)
        except NoSuchUser:
            raise HttpError(404, f"no user named {name!r}") from None
        except ValueError as exc:
            raise HttpError(409, str(exc)) from None
        call.audit_detail = f"token for {name}"
        return json_reply({"name": name, "token": secret}, 201)


# -- the work behind the routes (the console's forms call these too) --------------------------


def search(d: Department, filters: dict[str, str], limit: int, offset: int) -> query.StudyPage:
    try:
        keys = [query_keys.parse_key(f"{name}={value}") for name, value in filters.items()]
        identifier = query_keys.identifier("study", keys)
        return query.search_studies(d.database, identifier, limit, offset)
    except (query_keys.BadKey, query.QueryError) as exc:
        raise HttpError(400, str(exc)) from None


def generate_study(d: Department, call: Call, body: dict[str, Any]) -> dict[str, Any]:
    modality = str(body.get("modality", "")).upper()
    if modality not in TEMPLATES:
        raise HttpError(400, f"modality is one of {', '.join(TEMPLATES)}, not {body.get('modality')!r}")
    series, images = _count(body, "series"), _count(body, "images")
    if (series or 1) * (images or 1) > MAX_IMAGES:
        raise HttpError(400, f"at most {MAX_IMAGES} images in one study")
    target = str(body.get("send", "") or "")
    peer = _peer_for(d, call, target, write=True) if target else None
    options = GenerateOptions(
        modality=modality,
        series=series,
        images=images,
        study_description=str(body.get("description", "")),
        patient_id=str(body.get("patient_id", "")),
        accession_number=str(body.get("accession", "")),
        transfer_syntax=str(body.get("transfer_syntax", "")),
    )
    try:
        study = StudyGenerator(d.settings, d.database, d.writer).generate(options)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    Exports(d.settings).complete(d.database, [study.study_instance_uid])
    made: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "accession_number": study.accession_number,
        "patient": asdict(study.patient),
        "patient_created": study.patient_created,
        "modality": study.modality,
        "instances": len(study.files),
        "bytes": study.bytes,
        "seconds": round(study.seconds, 3),
    }
    if peer is not None:
        report = scu.send(scu.Peer.of(peer), d.settings.node.ae_title, study.files, scu.Timeouts.of(d.settings.dicom))
        made["sent"] = {"peer": peer.name, "sent": report.sent, "failed": [why for _, why in report.failed]}
    call.audit_detail = f"{modality} study {study.study_instance_uid}" + (f" sent to {peer.name}" if peer else "")
    return made


def schedule(d: Department, call: Call, body: dict[str, Any]) -> dict[str, Any]:
    start = None
    if body.get("start"):
        try:
            start = datetime.fromisoformat(str(body["start"]))
        except ValueError:
            raise HttpError(
                400, f"start is an ISO date and time such as 2026-11-23T14:30, not {body['start']!r}"
            ) from None
    request = WorklistRequest(
        modality=str(body.get("modality", "")),
        station_ae=str(body.get("station", "")),
        station_name=str(body.get("station_name", "")),
        location=str(body.get("location", "")),
        start=start,
        patient_id=str(body.get("patient_id", "")),
        accession_number=str(body.get("accession", "")),
        procedure_description=str(body.get("description", "")),
        procedure_code=_code(str(body.get("procedure_code", ""))),
        referring_physician=str(body.get("referring", "")),
        requesting_physician=str(body.get("requesting", "")),
        performing_physician=str(body.get("performing", "")),
        priority=str(body.get("priority", "")).upper(),
    )
    try:
        made = Scheduler(d.settings, d.database).add(request)
    except (ValueError, UnknownPatient) as exc:
        raise HttpError(400, str(exc)) from None
    d.wake_acquirer()
    call.audit_detail = f"step {made.sps_id} accession {made.accession_number}"
    return {
        "sps_id": made.sps_id,
        "accession_number": made.accession_number,
        "requested_procedure_id": made.requested_procedure_id,
        "study_instance_uid": made.study_instance_uid,
        "patient": asdict(made.patient),
        "start": made.start.isoformat(),
    }


def change_step(d: Department, call: Call, sps_id: str, status: str) -> dict[str, Any]:
    try:
        changed = Scheduler(d.settings, d.database).change_step(sps_id, status)
    except LookupError as exc:
        raise HttpError(404, str(exc)) from None
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    call.audit_detail = f"step {sps_id} to {status}"
    return {"sps_id": sps_id, "status": status, "changed": changed}


def preview_message(d: Department, text: str) -> dict[str, Any]:
    if not text.strip():
        raise HttpError(400, "message: paste an HL7 v2 message")
    try:
        previews = Inbox(d.settings, d.database).preview(as_wire(text.encode()))
    except Hl7Error as exc:
        return {"ok": False, "acknowledgment": exc.acknowledgment, "code": int(exc.code), "error": str(exc)}
    return {
        "ok": True,
        "messages": [
            {
                "message_type": p.message_type,
                "profile": p.profile,
                "patient": asdict(p.patient) if p.patient else None,
                "orders": [{"effect": effect, "order": asdict(plan)} for effect, plan in p.orders],
            }
            for p in previews
        ],
    }


def send_message(d: Department, call: Call, body: dict[str, Any]) -> dict[str, Any]:
    text = str(body.get("message", ""))
    if isinstance(body.get("orm"), dict):
        text = _generated_orm(d, body["orm"])
    if not text.strip():
        raise HttpError(400, "message: paste an HL7 v2 message, or give `orm` to generate one")
    target = str(body.get("to", "self") or "self")
    tls = None
    if target == "self":  # our listener: its TLS port when the plain one is closed
        hl7 = d.settings.hl7
        host, port = hl7.host, hl7.port if hl7.plain else hl7.tls_port
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        tls = None if hl7.plain else scu.client_tls()
    else:
        host, _, port_text = target.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise HttpError(400, f"to is self or HOST:PORT, not {target!r}")
        port = int(port_text)
    try:
        with MllpClient(host, port, 30.0, tls) as client:
            ack = client.send(as_wire(text.encode())).decode("utf-8", errors="replace")
    except OSError as exc:
        raise HttpError(502, f"{host}:{port}: {exc}") from None
    segments = [s for s in ack.replace("\n", "\r").split("\r") if s]
    msa = next((s.split("|") for s in segments if s.startswith("MSA|")), [])
    code = msa[1] if len(msa) > 1 else ""
    call.audit_detail = f"HL7 to {host}:{port}: {code}"
    return {
        "to": f"{host}:{port}",
        "code": code,
        "message": text,
        "ack": "\r".join(segments),
        "accepted": code in ("AA", "CA"),
    }


def _generated_orm(d: Department, order: dict[str, Any]) -> str:
    """A realistic ORM^O01 for a synthetic (or registered) patient, as `fabricatord hl7 orm` writes it."""
    request = WorklistRequest(
        modality=str(order.get("modality", "")),
        patient_id=str(order.get("patient_id", "")),
        accession_number=str(order.get("accession", "")),
        procedure_description=str(order.get("description", "")),
    )
    try:
        return Scheduler(d.settings, d.database).order_text(request, str(order.get("version", "2.5.1")))[1]
    except (ValueError, UnknownPatient) as exc:
        raise HttpError(400, str(exc)) from None


def act_on_jobs(d: Department, call: Call, action: str, names: Iterable[str]) -> dict[str, Any]:
    """Retry or cancel jobs; a route job to a peer the caller's role may not send to is refused
    (403 when it is the only one asked for, else listed under `refused`)."""
    wanted = _job_ids(names)
    acquisitions, routes, exports = Acquisitions(d.database), RouteJobs(d.database), FhirJobs(d.database)
    role = call.user().role
    refused = []
    for job in routes.by_ids(wanted["r"]):
        peer = d.settings.peer(job.peer)
        if not may_reach(role, peer.environment if peer else "test", True):
            refused.append(f"r{job.id}")
    if refused and sum(len(pks) for pks in wanted.values()) == 1:
        raise HttpError(403, f"{refused[0]} sends to a production peer, and the role {role} may not send to it")
    wanted["r"] = [pk for pk in wanted["r"] if f"r{pk}" not in refused]
    if action == "retry":
        touched = (
            [f"a{pk}" for pk in acquisitions.retry(wanted["a"])]
            + [f"r{pk}" for pk in routes.retry(wanted["r"])]
            + [f"f{pk}" for pk in exports.retry(wanted["f"])]
        )
    else:
        touched = (
            [f"a{pk}" for pk in acquisitions.cancel_jobs(wanted["a"])]
            + [f"r{pk}" for pk in routes.cancel(wanted["r"])]
            + [f"f{pk}" for pk in exports.cancel(wanted["f"])]
        )
    if wanted["a"] and action == "retry":
        d.wake_acquirer()
    asked = [f"{kind}{pk}" for kind, pks in wanted.items() for pk in pks]
    call.audit_detail = f"{action} {len(touched)} of {len(asked) + len(refused)} jobs"
    return {
        "action": action,
        "done": touched,
        "left": [name for name in asked if name not in touched],
        "refused": refused,
    }


def peer_listing(d: Department, role: str, reach: bool) -> list[dict[str, Any]]:
    entries = d.peers_for(role)

    def answers(peer: PeerSettings) -> bool:
        try:
            with socket.create_connection((peer.host, peer.port), timeout=1.0):
                return True
        except OSError:
            return False

    reachable_now: list[bool | None] = [None] * len(entries)
    if reach and entries:
        # Only peers the role may query are probed: a look at the dashboard opens no
        # connection to a production peer on behalf of a test role.
        with ThreadPoolExecutor(max_workers=min(len(entries), 16)) as pool:
            reachable_now = list(pool.map(lambda entry: answers(entry[0]) if entry[1] else None, entries))
    return [
        {
            "name": peer.name,
            "ae_title": peer.ae_title,
            "host": peer.host,
            "port": peer.port,
            "environment": peer.environment,
            "may_query": may_read,
            "may_send": may_write,
            "reachable": up,
        }
        for (peer, may_read, may_write), up in zip(entries, reachable_now, strict=True)
    ]


def find_at_peers(d: Department, call: Call, body: dict[str, Any]) -> dict[str, Any]:
    names = body.get("peers") or []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise HttpError(400, "peers: name one or more [[peers]] names, or self")
    names = list(dict.fromkeys(names))
    if len(names) > len(d.settings.peers) + 1:
        raise HttpError(400, "peers: each [[peers]] name (and self) once")
    level = str(body.get("level", "study")).lower()
    if level not in ("study", "series", "image"):
        raise HttpError(400, "level is study, series or image")
    for name in names:
        _reachable_source(d, call, name)
    given = body.get("keys") or {}
    if not isinstance(given, (dict, list)):
        raise HttpError(400, 'keys: {"PatientID": "…"} or ["PatientID=…"]')
    texts = [f"{k}={v}" for k, v in given.items()] if isinstance(given, dict) else [str(k) for k in given]
    try:
        keys = [query_keys.parse_key(text) for text in texts]
    except query_keys.BadKey as exc:
        raise HttpError(400, str(exc)) from None
    answers = remote.find(d.settings, names, level, keys, _seconds(body, 30.0, 300.0) or 30.0)
    return {
        "warnings": query_keys.query_warnings(level, keys),
        "answers": [
            {"peer": a.name, "matches": a.matches, "error": a.error, "seconds": round(a.seconds, 3)} for a in answers
        ],
    }


def move_studies(d: Department, call: Call, body: dict[str, Any]) -> dict[str, Any]:
    source_name, destination_name = str(body.get("from", "")), str(body.get("to", ""))
    source = _reachable_source(d, call, source_name)
    # The destination is a [[peers]] name or self, never a bare AE title: the production guard
    # must know which peer receives.
    if destination_name == remote.SELF and d.settings.peer(remote.SELF) is None:
        destination = d.settings.node.ae_title
    else:
        destination = _peer_for(d, call, destination_name, write=True).ae_title
    studies = body.get("studies") or []
    if not isinstance(studies, list) or not studies or not all(isinstance(u, str) and is_valid_uid(u) for u in studies):
        raise HttpError(400, "studies: one or more Study Instance UIDs")
    timeouts = remote.move_timeouts(d.settings, _seconds(body, None, 3600.0))
    results = []
    for uid in dict.fromkeys(studies):
        try:
            report = scu.move(source, d.settings.node.ae_title, destination, remote.study_query(uid), timeouts)
        except scu.ScuError as exc:
            results.append({"study": uid, "ok": False, "error": str(exc)})
            continue
        results.append(
            {
                "study": uid,
                "ok": report.outcome in ("success", "warning") and not report.failed,
                "status": None if report.status is None else f"0x{report.status:04X}",
                "completed": report.completed,
                "warnings": report.warnings,
                "failed": report.failed,
                "seconds": round(report.seconds, 3),
            }
        )
    call.audit_detail = f"{len(results)} studies from {source_name} to {destination}"
    return {"from": source_name, "to": destination, "results": results}


def change_user_of(d: Department, call: Call, name: str, body: dict[str, Any]) -> dict[str, Any]:
    if d.directory.get(name) is None:
        raise HttpError(404, f"no user named {name!r}")
    role, password, disabled = body.get("role"), body.get("password"), body.get("disabled")
    if role is not None and role not in ROLES:
        raise HttpError(400, f"role is one of {', '.join(ROLES)}")
    if password is not None and (not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD):
        raise HttpError(400, f"password: {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if disabled is not None and not isinstance(disabled, bool):
        raise HttpError(400, "disabled is true or false")
    changes = []
    if role is not None:
        d.directory.set_role(name, role)
        changes.append(f"role {role}")
    if password is not None:
        d.directory.set_password(name, password)
        changes.append("password (sessions and tokens ended)")
    if disabled is not None:
        (d.directory.disable if disabled else d.directory.enable)(name)
        changes.append("disabled" if disabled else "enabled")
    call.audit_detail = f"user {name}: {', '.join(changes) or 'nothing'}"
    user = d.directory.get(name)
    assert user is not None
    return _user(user)


# -- helpers --------------------------------------------------------------------------------


def _uid(text: str) -> str:
    if not is_valid_uid(text):
        raise HttpError(400, f"{text!r} is not a UID")
    return text


def _instance(d: Department, call: Call) -> tuple[str, Path]:
    uid = _uid(call.params["uid"])
    stored = InstanceIndex(d.database).lookup([uid]).get(uid)
    if stored is None:
        raise HttpError(404, f"no stored instance has SOP Instance UID {uid}")
    return uid, d.settings.storage_dir / stored.path


def _read(path: Path, stop_before_pixels: bool) -> Any:
    try:
        return dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise HttpError(410, "the instance's file is gone from storage") from None
    except (OSError, InvalidDicomError) as exc:
        raise HttpError(500, f"the stored file cannot be read: {exc}") from None


def _png(path: Path, frame: int, size: int | None) -> Reply:
    try:
        return Reply(200, render_png(_read(path, False), frame, size), "image/png")
    except NoPixels as exc:
        raise HttpError(404, str(exc)) from None
    except (ValueError, NotImplementedError, RuntimeError) as exc:  # no decoder for the stored syntax
        raise HttpError(415, f"cannot render this instance: {exc}") from None


def _seconds(body: dict[str, Any], default: float | None, longest: float) -> float | None:
    value = body.get("timeout", default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HttpError(400, f"timeout: seconds, a number up to {longest:g}")
    if not 0 < value <= longest:
        raise HttpError(400, f"timeout: seconds, more than 0 and at most {longest:g}")
    return float(value)


def _reachable_source(d: Department, call: Call, name: str) -> scu.Peer:
    """A peer to query or move from: `self` (our node, unless a [[peers]] entry has that name, as
    `remote.resolve` decides) or a [[peers]] entry the caller's role may query."""
    if name == remote.SELF and d.settings.peer(remote.SELF) is None:
        return remote.own_node(d.settings)
    return scu.Peer.of(_peer_for(d, call, name, write=False))


def _peer_for(d: Department, call: Call, name: str, write: bool) -> PeerSettings:
    """A `[[peers]]` entry the caller's role may query (`write` false) or send to."""
    peer = d.settings.peer(name)
    if peer is None:
        known = ", ".join(p.name for p in d.settings.peers) or "none configured"
        raise HttpError(404, f"no peer named {name!r} (peers: {known})")
    role = call.user().role
    if not may_reach(role, peer.environment, write):
        if peer.environment == "prod":
            raise HttpError(403, f"{peer.name} is a production peer, and the role {role} may not reach it")
        raise HttpError(403, f"the role {role} may not send to {peer.name}")
    return peer


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name, 0) or 0
    if isinstance(value, str) and is_number(value, 6):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_IMAGES:
        raise HttpError(400, f"{name} is a whole number up to {MAX_IMAGES} (0 or none: the template's)")
    return value


def _code(text: str) -> tuple[str, str, str]:
    try:
        return parse_code(text)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None


def _message(m: Any, whole: bool) -> dict[str, Any]:
    answer = {
        "id": m.id,
        "received_at": m.received_at.isoformat(),
        "peer": m.peer,
        "sending_application": m.sending_application,
        "sending_facility": m.sending_facility,
        "control_id": m.control_id,
        "message_type": m.message_type,
        "version": m.version,
        "profile": m.profile,
        "outcome": m.outcome,
        "error": m.error,
        "detail": m.detail,
    }
    if whole:
        text = m.raw.decode("utf-8", errors="replace")
        answer["message"] = text
        answer["segments"] = [s for s in text.replace("\n", "\r").split("\r") if s]
        answer["ack"] = m.ack.decode("utf-8", errors="replace")
    return answer


def _acquisition(a: Any) -> dict[str, Any]:
    return {"id": f"a{a.id}", "kind": "acquisition", **{k: v for k, v in asdict(a).items() if k != "id"}}


def _route(r: Any) -> dict[str, Any]:
    return {"id": f"r{r.id}", "kind": "route", **{k: v for k, v in asdict(r).items() if k != "id"}}


def _fhir(f: Any) -> dict[str, Any]:
    return {"id": f"f{f.id}", "kind": "fhir", **{k: v for k, v in asdict(f).items() if k != "id"}}


def _job_ids(names: Iterable[str]) -> dict[str, list[int]]:
    wanted: dict[str, list[int]] = {"a": [], "r": [], "f": []}
    for name in names:
        kind, number = str(name)[:1].lower(), str(name)[1:]
        if kind not in wanted or not is_number(number, 9):
            raise HttpError(400, f"{name!r}: a job is a1 (acquisition), r1 (route) or f1 (FHIR)")
        wanted[kind].append(int(number))
    return wanted


def _jobs(d: Department, names: list[str]) -> list[dict[str, Any]]:
    wanted = _job_ids(names)
    return (
        [_acquisition(a) for a in Acquisitions(d.database).by_ids(wanted["a"])]
        + [_route(r) for r in RouteJobs(d.database).by_ids(wanted["r"])]
        + [_fhir(f) for f in FhirJobs(d.database).by_ids(wanted["f"])]
    )


def _selected_jobs(d: Department, body: dict[str, Any]) -> list[str]:
    """Jobs named by `ids`, or every job a filter selects (`kind`, `state`, `study`)."""
    if body.get("ids"):
        if not isinstance(body["ids"], list):
            raise HttpError(400, 'ids: a list of job names, ["a1", "r2"]')
        return [str(i) for i in body["ids"]]
    kind, state = str(body.get("kind", "all")), str(body.get("state", ""))
    if not state:
        raise HttpError(400, "name the jobs: ids, or a filter with at least state")
    names: list[str] = []
    if kind in ("all", "acquisitions"):
        names += [f"a{a.id}" for a in Acquisitions(d.database).listing([state], 100_000)]
    if kind in ("all", "routes"):
        names += [f"r{r.id}" for r in RouteJobs(d.database).listing([state], str(body.get("study", "")), 100_000)]
    if kind in ("all", "fhir"):
        names += [f"f{f.id}" for f in FhirJobs(d.database).listing([state], str(body.get("study", "")), 100_000)]
    return names


def _user(u: Any) -> dict[str, Any]:
    return {"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at.isoformat()}


def readiness(d: Department) -> tuple[bool, dict[str, bool]]:
    results = {"database": reachable(d.database), **{name: bool(check()) for name, check in d.checks}}
    return all(results.values()), results
