"""The REST API over real HTTP against a running daemon: each route, each role, sign-in, CSRF,
the lockout, tokens, and the work behind them checked with DCMTK and the files on disk."""

from __future__ import annotations

import io
import re
import urllib.parse
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from pydicom import dcmread

from tests.conftest import free_port
from tests.integration.conftest import Daemon, findscu, halt, launch, running_peer
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import order
from tests.integration.web import PASSWORD, Client, add_user, users

ROLES = ("admin", "test_write", "test_read", "prod_write", "prod_read")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    """One daemon for the module, with a test peer (DCMTK storescp when a test starts it), a
    production peer nobody answers for, a route to the test peer, and a user of every role."""
    folder = tmp_path_factory.mktemp("api")
    pacs_port = free_port()
    peers = (
        f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nport = {pacs_port}\n'
        f'[[peers]]\nname = "prodpacs"\nae_title = "PRODPACS"\nport = {free_port()}\nenvironment = "prod"\n'
        '[[routes]]\nname = "to-pacs"\nmatch = { study_description = "ROUTED*" }\nto = ["pacs"]\nattempts = 1\n'
        '[[routes]]\nname = "to-prod"\nmatch = { study_description = "PRODROUTED*" }\nto = ["prodpacs"]\n'
        "allow_prod = true\nattempts = 1\n"
    )
    daemon = launch(folder, extra=peers)
    try:
        for role in ROLES:
            add_user(daemon.config, role, role)
        yield daemon, pacs_port
    finally:
        halt(daemon)


def client(daemon: Daemon, role: str) -> Client:
    signed = Client(daemon.http_port)
    assert signed.login(role).status == 303
    return signed


def bearer(daemon: Daemon, role: str) -> Client:
    return Client(daemon.http_port, token=users(daemon.config, "token", role))


def protected(anyone: Client) -> list[tuple[str, str, str, str]]:
    """(method, path, the path with dummy parameters, who may call it) of every route of the
    OpenAPI document that needs credentials."""
    document = anyone.get("/api/v1/openapi.json").json()
    return [
        (method.upper(), path, re.sub(r"\{\w+\}", "1.2.3", path), operation["description"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if operation.get("security") != []
    ]


def test_open_endpoints_answer_without_a_user(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    anyone = Client(daemon.http_port)
    assert anyone.get("/healthz").json() == {"status": "ok"}
    assert anyone.get("/readyz").json()["ready"] is True
    assert "fabricatord_build_info" in anyone.get("/metrics").text
    status = anyone.get("/api/v1/status").json()
    assert {"studies", "instances", "listeners"} <= set(status)
    assert "PatientName" not in anyone.get("/api/v1/status").text
    document = anyone.get("/api/v1/openapi.json").json()
    assert document["openapi"].startswith("3.")
    for path in (
        "/api/v1/studies",
        "/api/v1/studies/{uid}",
        "/api/v1/instances/{uid}/tags",
        "/api/v1/instances/{uid}/rendered",
        "/api/v1/studies/{uid}/send",
        "/api/v1/generate",
        "/api/v1/worklist",
        "/api/v1/hl7/messages",
        "/api/v1/jobs",
        "/api/v1/jobs/{id}/retry",
        "/api/v1/peers/{name}/echo",
        "/api/v1/find",
        "/api/v1/move",
        "/api/v1/status",
    ):
        assert path in document["paths"], path


def test_every_route_but_the_open_ones_answers_401_without_credentials(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    anyone = Client(daemon.http_port)
    routes = protected(anyone)
    for method, path, concrete, _ in routes:
        answer = anyone.request(method, concrete, {} if method != "GET" else None)
        assert answer.status == 401, (method, path, answer.status)
        assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert len(routes) >= 30
    # A page sends the browser to the login form, and back afterwards.
    page = anyone.get("/worklist")
    assert page.status == 303 and page.headers["Location"] == "/login?next=/worklist"
    forged = Client(daemon.http_port, token="fbt_not-a-token")
    assert forged.get("/api/v1/studies").status == 401


def test_a_wrong_password_is_refused_and_five_failures_lock_the_name_out(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    add_user(daemon.config, "forgetful", "test_read")
    browser = Client(daemon.http_port)
    for _ in range(5):
        answer = browser.login("forgetful", "wrong password")
        assert answer.status == 401 and "wrong user name or password" in answer.text
    locked = browser.login("forgetful", PASSWORD)  # even the right password, now
    assert locked.status == 429
    assert 1 <= int(locked.headers["Retry-After"]) <= 15 * 60
    # Another name is not locked out by these failures.
    assert Client(daemon.http_port).login("test_read").status == 303
    events = bearer(daemon, "admin").get("/api/v1/audit?operation=LOGIN&user=forgetful").json()["events"]
    assert [e["status"] for e in events][:2] == ["locked", "failed"]


def test_a_session_needs_its_csrf_token_and_a_bearer_token_does_not(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    browser = client(daemon, "test_write")
    item = {"modality": "CR", "station": "CSRFSTATION"}
    assert browser.post("/api/v1/worklist", item, csrf=False).status == 403
    assert browser.post("/api/v1/worklist", item, headers={"X-CSRF-Token": "forged"}).status == 403
    assert browser.post("/api/v1/worklist", item).status == 201
    assert bearer(daemon, "test_write").post("/api/v1/worklist", item).status == 201
    listed = browser.get("/api/v1/worklist?station=CSRFSTATION").json()["items"]
    assert len(listed) == 2
    # The session cookie is HttpOnly and SameSite=Strict.
    raw = Client(daemon.http_port)
    form = raw.get("/login")
    cookie = form.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_each_role_may_do_what_its_name_says(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    reader, writer, admin = bearer(daemon, "test_read"), bearer(daemon, "test_write"), bearer(daemon, "admin")
    prod_reader = bearer(daemon, "prod_read")
    made = reader.post("/api/v1/generate", {"modality": "CR", "images": 1}).json()  # read roles generate
    uid = made["study_instance_uid"]
    assert reader.get(f"/api/v1/studies/{uid}").status == 200
    assert reader.post("/api/v1/worklist", {"modality": "CR", "station": "X"}).status == 403
    assert reader.post(f"/api/v1/studies/{uid}/send", {"peer": "pacs"}).status == 403
    assert reader.post("/api/v1/jobs/r1/retry").status == 403
    assert reader.get("/api/v1/users").status == 403
    assert writer.request("DELETE", f"/api/v1/studies/{uid}").status == 403
    assert writer.get("/api/v1/users").status == 403
    # The production guard: a test role never reaches a prod peer, and is told which peer.
    refused = writer.post(f"/api/v1/studies/{uid}/send", {"peer": "prodpacs"})
    assert refused.status == 403 and "prodpacs" in refused.json()["error"]
    refused = writer.post("/api/v1/generate", {"modality": "CR", "send": "prodpacs"})
    assert refused.status == 403 and "prodpacs" in refused.json()["error"]
    assert reader.post("/api/v1/peers/prodpacs/echo").status == 403
    assert writer.post("/api/v1/move", {"from": "self", "to": "prodpacs", "studies": [uid]}).status == 403
    assert writer.post("/api/v1/find", {"peers": ["prodpacs"]}).status == 403
    # A prod role passes the guard (the peer is down: 502, not 403).
    assert prod_reader.post("/api/v1/peers/prodpacs/echo").status == 502
    peers = {p["name"]: p for p in writer.get("/api/v1/peers").json()["peers"]}
    assert (peers["pacs"]["may_send"], peers["prodpacs"]["may_send"], peers["prodpacs"]["may_query"]) == (
        True,
        False,
        False,
    )
    assert admin.get("/api/v1/users").status == 200


def test_a_disabled_user_loses_its_sessions_and_tokens(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    add_user(daemon.config, "leaver", "test_write")
    token = bearer(daemon, "leaver")
    session = client(daemon, "leaver")
    assert token.get("/api/v1/studies").status == 200 and session.get("/api/v1/me").status == 200
    users(daemon.config, "disable", "leaver")
    assert token.get("/api/v1/studies").status == 401
    assert session.get("/api/v1/me").status == 401
    assert Client(daemon.http_port).login("leaver").status == 401


def test_a_study_is_searched_shown_rendered_downloaded_and_deleted(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    writer, admin = bearer(daemon, "test_write"), bearer(daemon, "admin")
    made = writer.post("/api/v1/generate", {"modality": "CT", "series": 2, "images": 2, "description": "API CT"})
    assert made.status == 201
    uid, accession = made.json()["study_instance_uid"], made.json()["accession_number"]
    found = writer.get(f"/api/v1/studies?AccessionNumber={accession}").json()
    assert found["total"] == 1
    [row] = found["studies"]
    assert row["StudyInstanceUID"] == uid and row["ModalitiesInStudy"] == ["CT"]
    assert row["NumberOfStudyRelatedInstances"] == "4"
    listed = writer.get("/api/v1/studies").json()["studies"]
    moments = [(s["StudyDate"], s["StudyTime"]) for s in listed]
    assert len(moments) >= 2 and moments == sorted(moments, reverse=True)  # newest first
    second = writer.get("/api/v1/studies?limit=1&offset=1").json()
    assert second["studies"][0]["StudyInstanceUID"] == listed[1]["StudyInstanceUID"]
    assert writer.get("/api/v1/studies?NoSuchKeyword=1").status == 400
    tree = writer.get(f"/api/v1/studies/{uid}").json()
    assert [len(s["instances"]) for s in tree["series"]] == [2, 2]
    sop = tree["series"][0]["instances"][0]["sop_instance_uid"]

    tags = writer.get(f"/api/v1/instances/{sop}/tags").json()
    assert tags["00080018"] == {"vr": "UI", "Value": [sop]}
    assert tags["00080050"]["Value"] == [accession]
    assert tags["7FE00010"]["BulkDataURI"] == f"/api/v1/instances/{sop}/file"
    rendered = writer.get(f"/api/v1/instances/{sop}/rendered")
    assert rendered.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(rendered.body))
    ds = dcmread(io.BytesIO(writer.get(f"/api/v1/instances/{sop}/file").body))
    assert ds.SOPInstanceUID == sop and image.size == (ds.Columns, ds.Rows)
    assert max(Image.open(io.BytesIO(writer.get(f"/api/v1/instances/{sop}/thumbnail").body)).size) <= 128
    assert writer.get(f"/api/v1/instances/{sop}/rendered?frame=2").status == 404
    assert writer.get("/api/v1/instances/1.2.3/tags").status == 404
    assert writer.get("/api/v1/instances/not-a-uid/tags").status == 400

    archive = zipfile.ZipFile(io.BytesIO(writer.get(f"/api/v1/studies/{uid}/archive").body))
    assert len(archive.namelist()) == 4

    before = daemon.files()
    deleted = admin.request("DELETE", f"/api/v1/studies/{uid}")
    assert deleted.status == 200 and deleted.json()["files"] == 4
    assert writer.get(f"/api/v1/studies/{uid}").status == 404
    assert len(before - daemon.files()) == 4
    assert not [path for path in daemon.files() if uid in path]


def test_a_worklist_item_made_over_the_api_is_found_by_findscu(node: tuple[Daemon, int], tmp_path: Path) -> None:
    daemon, _ = node
    writer = bearer(daemon, "test_write")
    made = writer.post("/api/v1/worklist", {"modality": "MR", "station": "MRAPI", "description": "MR BRAIN"})
    assert made.status == 201
    accession, sps_id = made.json()["accession_number"], made.json()["sps_id"]
    [item] = findscu(daemon, tmp_path, "-W", f"AccessionNumber={accession}", "ScheduledProcedureStepSequence")
    assert item.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "MRAPI"
    assert writer.post(f"/api/v1/worklist/{sps_id}/cancel").json()["changed"] == 1
    assert findscu(daemon, tmp_path, "-W", f"AccessionNumber={accession}") == []
    listed = writer.get("/api/v1/worklist?status=CANCELED&station=MRAPI").json()["items"]
    assert [i["sps_id"] for i in listed] == [sps_id]
    assert writer.post("/api/v1/worklist/NOSUCH/status", {"status": "READY"}).status == 404
    assert writer.post(f"/api/v1/worklist/{sps_id}/status", {"status": "BOGUS"}).status == 400
    assert writer.post("/api/v1/worklist", {"modality": "XX", "station": "A"}).status == 400


def test_hl7_is_logged_previewed_and_sent_from_the_api(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    writer = bearer(daemon, "test_write")
    text = order("APIHL7-1", "NW", "SC", "ACCAPI1").decode().replace("\r", "\n")
    orders_before = writer.get("/api/v1/status").json()["orders"]
    preview = writer.post("/api/v1/hl7/preview", {"message": text}).json()
    assert preview["ok"] and preview["messages"][0]["orders"][0]["order"]["accession_number"] == "ACCAPI1"
    assert writer.get("/api/v1/status").json()["orders"] == orders_before  # a preview keeps nothing
    sent = writer.post("/api/v1/hl7/send", {"message": text, "to": "self"}).json()
    assert sent["code"] == "AA" and sent["accepted"]
    [logged] = writer.get("/api/v1/hl7/messages?control_id=APIHL7-1").json()["messages"]
    assert logged["outcome"] == "AA"
    whole = writer.get(f"/api/v1/hl7/messages/{logged['id']}").json()
    assert whole["segments"][0].startswith("MSH|") and "MSA|AA|APIHL7-1" in whole["ack"]
    trace = writer.get("/api/v1/trace/ACCAPI1").json()
    assert any("HL7" in event["what"] or "ORM" in event["what"] for event in trace["events"])
    generated = writer.post("/api/v1/hl7/send", {"orm": {"modality": "US", "accession": "ACCORM1"}}).json()
    assert generated["code"] == "AA" and "ORM^O01" in generated["message"]
    assert writer.get("/api/v1/trace/ACCORM1").status == 200
    bad = writer.post("/api/v1/hl7/preview", {"message": "MSH|^~\\&|X\nPID|broken"}).json()
    assert bad["ok"] is False and bad["acknowledgment"] in ("AE", "AR")
    assert writer.post("/api/v1/hl7/send", {"message": text, "to": "nowhere"}).status == 400


def test_a_failed_route_job_is_retried_once_its_peer_is_back(node: tuple[Daemon, int], tmp_path: Path) -> None:
    daemon, pacs_port = node
    writer = bearer(daemon, "test_write")
    made = writer.post("/api/v1/generate", {"modality": "CR", "images": 1, "description": "ROUTED CR"}).json()
    uid, count = made["study_instance_uid"], made["instances"]

    def jobs() -> list[dict[str, object]]:
        return list(writer.get(f"/api/v1/jobs?kind=routes&study={uid}").json()["jobs"])

    wait_for(lambda: bool(jobs()) and all(job["state"] == "failed" for job in jobs()))
    folder = tmp_path / "pacs"
    folder.mkdir()
    storescp = ["storescp", "-aet", "PACS", "-od", str(folder), "--accept-all", str(pacs_port)]
    with running_peer(storescp, pacs_port, "ANY"):
        assert writer.post("/api/v1/peers/pacs/echo").json()["ok"] is True
        retried = writer.post("/api/v1/jobs/retry", {"kind": "routes", "state": "failed"}).json()
        assert set(retried["done"]) >= {job["id"] for job in jobs()}
        wait_for(lambda: all(job["state"] == "done" for job in jobs()))
        assert len(list(folder.iterdir())) == count

        # Send, find and move, as the CLI's `send`, `find` and `move`: each delivers the study again.
        for received in folder.iterdir():
            received.unlink()
        sent = writer.post(f"/api/v1/studies/{uid}/send", {"peer": "pacs"}).json()
        assert sent["sent"] == count and sent["failed"] == []
        assert len(list(folder.iterdir())) == count
        found = writer.post("/api/v1/find", {"peers": ["self"], "keys": {"StudyInstanceUID": uid}}).json()
        assert [a["peer"] for a in found["answers"]] == ["self"]
        assert [m["StudyInstanceUID"] for m in found["answers"][0]["matches"]] == [uid]
        for received in folder.iterdir():
            received.unlink()
        moved = writer.post("/api/v1/move", {"from": "self", "to": "pacs", "studies": [uid]}).json()
        assert moved["results"][0]["ok"] and moved["results"][0]["completed"] == count
        assert len(list(folder.iterdir())) == count
    assert writer.get("/api/v1/jobs/r999999").status == 404
    assert writer.post("/api/v1/jobs/x1/retry").status == 400


def test_users_are_managed_by_admin_and_every_change_is_audited(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    admin = client(daemon, "admin")
    assert admin.post("/api/v1/users", {"name": "newcomer", "role": "test_read", "password": "short"}).status == 400
    assert admin.post("/api/v1/users", {"name": "newcomer", "role": "wizard", "password": PASSWORD}).status == 400
    made = admin.post("/api/v1/users", {"name": "newcomer", "role": "test_read", "password": PASSWORD})
    assert made.status == 201 and made.json()["role"] == "test_read"
    assert admin.post("/api/v1/users", {"name": "newcomer", "role": "test_read", "password": PASSWORD}).status == 409
    assert admin.post("/api/v1/users/newcomer", {"role": "test_write"}).json()["role"] == "test_write"
    token = admin.post("/api/v1/users/newcomer/token").json()["token"]
    newcomer = Client(daemon.http_port, token=token)
    assert newcomer.get("/api/v1/me").json() == {"name": "newcomer", "role": "test_write", "by": "token"}
    events = admin.get("/api/v1/audit?operation=HTTP&user=admin").json()["events"]
    details = [e["detail"] for e in events]
    assert any("POST /api/v1/users/newcomer/token" in d for d in details)
    assert any(d.startswith("POST /api/v1/users: user newcomer") for d in details)
    assert all(e["username"] == "admin" for e in events)


def test_a_test_role_cannot_resend_to_production_by_retrying_a_job(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    admin, writer = bearer(daemon, "admin"), bearer(daemon, "test_write")
    made = admin.post("/api/v1/generate", {"modality": "CR", "images": 1, "description": "PRODROUTED CR"}).json()
    study = made["study_instance_uid"]

    def jobs() -> list[dict[str, object]]:
        listed = admin.get(f"/api/v1/jobs?kind=routes&study={study}").json()["jobs"]
        return [job for job in listed if job["peer"] == "prodpacs"]

    wait_for(lambda: bool(jobs()) and all(job["state"] == "failed" for job in jobs()))
    [job] = jobs()
    refused = writer.post(f"/api/v1/jobs/{job['id']}/retry")
    assert refused.status == 403 and "production" in refused.json()["error"]
    bulk = writer.post("/api/v1/jobs/retry", {"kind": "routes", "state": "failed", "study": study}).json()
    assert bulk["refused"] == [job["id"]] and job["id"] not in bulk["done"]
    assert jobs()[0]["state"] == "failed"
    assert admin.post(f"/api/v1/jobs/{job['id']}/cancel").status == 200  # admin may; pending or not, it answers


def test_the_destination_of_a_move_is_a_peer_name_never_a_bare_ae_title(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    writer = bearer(daemon, "test_write")
    study = writer.post("/api/v1/generate", {"modality": "CR", "images": 1}).json()["study_instance_uid"]
    for destination in ("PRODPACS", "prodpacs_ae", "PACS"):
        answer = writer.post("/api/v1/move", {"from": "self", "to": destination, "studies": [study]})
        assert answer.status == 404, destination
    assert writer.post("/api/v1/move", {"from": "self", "to": "prodpacs", "studies": [study]}).status == 403


def test_malformed_requests_get_400_and_never_500(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    writer = bearer(daemon, "test_write")
    admin = client(daemon, "admin")
    for path in ("/api/v1/studies?limit=%C2%B2", "/api/v1/studies?limit=" + "9" * 5000, "/api/v1/jobs?limit=-1"):
        assert writer.get(path).status == 400, path
    assert writer.get("/api/v1/jobs/a" + "9" * 30).status == 400
    assert writer.get("/api/v1/hl7/messages/" + "9" * 30).status == 404
    for body in (
        {"peers": 5},
        {"peers": ["self"], "keys": 5},
        {"peers": ["self"], "timeout": "x"},
        {"peers": ["self"], "timeout": 1e308},
        {"peers": [f"peer{number}" for number in range(50)]},
    ):
        assert writer.post("/api/v1/find", body).status == 400, body
    assert writer.post("/api/v1/move", {"from": "self", "to": "self", "studies": "1.2.3"}).status == 400
    assert writer.post("/api/v1/jobs/retry", {"ids": 5}).status == 400
    assert writer.request("POST", "/api/v1/find", None, headers={"Content-Type": "application/json"}).status == 400
    nested = Client(daemon.http_port, token=writer.token)
    deep = "[" * 100_000 + "]" * 100_000
    answer = nested.request("POST", "/api/v1/worklist", headers={"Content-Type": "application/json"}, body=None)
    assert answer.status == 400
    assert writer.post("/api/v1/worklist", deep).status == 400
    assert admin.post("/api/v1/worklist", {"modality": "CR"}, headers={"X-CSRF-Token": "é"}).status == 403
    assert admin.post("/api/v1/users/test_read", {"disabled": "false"}).status == 400
    assert admin.post("/api/v1/users/test_read", {"role": "admin", "password": "short"}).status == 400
    roles = {u["name"]: u["role"] for u in admin.get("/api/v1/users").json()["users"]}
    assert roles["test_read"] == "test_read"  # nothing of a refused change was applied


def test_sign_in_returns_only_to_our_own_pages(node: tuple[Daemon, int]) -> None:
    daemon, _ = node
    for target, landing in (
        ("/worklist?status=READY", "/worklist?status=READY"),
        ("/\\evil.example", "/"),
        ("//evil.example", "/"),
        ("https://evil.example/", "/"),
    ):
        browser = Client(daemon.http_port)
        form = browser.get("/login?" + urllib.parse.urlencode({"next": target})).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        shown = re.search(r'name="next" value="([^"]*)"', form)
        assert token is not None and shown is not None
        answer = browser.request(
            "POST",
            "/login",
            form={"username": "test_read", "password": PASSWORD, "csrf_token": token.group(1), "next": target},
        )
        assert answer.status == 303 and answer.headers["Location"] == landing, target
    # A page asked for before signing in keeps its query through the login.
    page = Client(daemon.http_port).get("/studies?PatientID=X")
    assert page.headers["Location"] == "/login?next=/studies%3FPatientID%3DX"


def test_names_with_reserved_characters_are_addressed_and_a_new_password_ends_sessions(
    node: tuple[Daemon, int],
) -> None:
    daemon, _ = node
    admin = bearer(daemon, "admin")
    assert admin.post("/api/v1/users", {"name": "j.doe@lab x", "role": "test_read", "password": PASSWORD}).status == 201
    signed = Client(daemon.http_port)
    assert signed.login("j.doe@lab x").status == 303
    changed = admin.post("/api/v1/users/j.doe%40lab%20x", {"password": "another long password"})
    assert changed.status == 200 and changed.json()["name"] == "j.doe@lab x"
    assert signed.get("/api/v1/me").status == 401
    assert Client(daemon.http_port).login("j.doe@lab x", "another long password").status == 303


def test_each_route_answers_each_role_as_its_access_says(node: tuple[Daemon, int]) -> None:
    """Every route of the OpenAPI document, called by every role: 403 exactly where the route's
    access level refuses the role (the dummy UIDs and names make the allowed calls 400 or 404)."""
    daemon, _ = node
    callers = {role: bearer(daemon, role) for role in ROLES}
    refusing = {
        "Roles admin, test_write, prod_write.": {"test_read", "prod_read"},
        "Role admin.": {"test_write", "test_read", "prod_write", "prod_read"},
    }
    routes = protected(Client(daemon.http_port))
    for method, path, concrete, access in routes:
        for role, caller in callers.items():
            answer = caller.request(method, concrete, {} if method != "GET" else None)
            refused = role in refusing.get(access, set())
            assert (answer.status == 403) is refused, (role, method, path, answer.status, answer.body[:200])
            assert answer.status < 500, (role, method, path, answer.body[:200])
    assert len(routes) >= 38
