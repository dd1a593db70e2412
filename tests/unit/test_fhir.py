"""The FHIR mapping of a study (pure) and the client's reading of a server's answers, against
an HTTP server on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fabricatord.db import InstanceIndex, open_database
from fabricatord.db.index import InstanceNode, SeriesNode, StudyTree
from fabricatord.db.jobs import FhirJobs
from fabricatord.db.worklist import StudyOrder
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.fhir import client
from fabricatord.fhir.resources import Systems, fhir_date, fhir_datetime, human_name, transaction
from tests.conftest import free_port
from tests.helpers import study

SYSTEMS = Systems("https://h.example/mrn", "https://h.example/acsn", "https://h.example/plac", "https://h.example/fill")


def tree(**changes: Any) -> StudyTree:
    values: dict[str, Any] = {
        "study_instance_uid": "1.2.3.4",
        "accession_number": "ACC1",
        "study_date": "20261203",
        "study_time": "101112.5",
        "study_description": "CT HEAD",
        "referring_physician_name": "",
        "patient_id": "MRN1",
        "issuer_of_patient_id": "NORTH",
        "patient_name": "Doe^Jane^Q^Dr^III",
        "patient_birth_date": "19700102",
        "patient_sex": "F",
        "series": [
            SeriesNode(
                "1.2.3.4.1",
                "CT",
                1,
                "AXIAL",
                "HEAD",
                [
                    InstanceNode("1.2.3.4.1.1", "1.2.840.10008.5.1.4.1.1.2", 1, "1.2.840.10008.1.2.1", 10, "r", ""),
                    InstanceNode("1.2.3.4.1.2", "1.2.840.10008.5.1.4.1.1.2", None, "1.2.840.10008.1.2.1", 10, "r", ""),
                ],
            )
        ],
    }
    values.update(changes)
    return StudyTree(**values)


ORDER = StudyOrder(
    placer_order_number="PO1",
    filler_order_number="FO1",
    accession_number="ACC1",
    status="SCHEDULED",
    priority="STAT",
    procedure_code=("CTHEAD", "LN", "CT Head"),
    procedure_description="CT Head without contrast",
    requesting_physician="Cuddy^Lisa",
    authored=datetime(2026, 12, 3, 9, 0, tzinfo=UTC),
)


def entries(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e for e in bundle["entry"]}


def test_a_study_with_its_order_is_three_conditional_entries_that_point_at_each_other() -> None:
    bundle = transaction(tree(), ORDER, SYSTEMS)
    assert bundle["type"] == "transaction"
    by_kind = entries(bundle)
    assert list(by_kind) == ["Patient", "ServiceRequest", "ImagingStudy"]
    patient, request, study = by_kind["Patient"], by_kind["ServiceRequest"], by_kind["ImagingStudy"]
    assert patient["request"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": "identifier=https://h.example/mrn|MRN1",
    }
    assert request["request"]["ifNoneExist"] == "identifier=https://h.example/acsn|ACC1"
    assert study["request"] == {"method": "PUT", "url": "ImagingStudy?identifier=urn:dicom:uid|urn:oid:1.2.3.4"}
    imaging = study["resource"]
    assert imaging["subject"] == {"reference": patient["fullUrl"]}
    assert imaging["basedOn"] == [{"reference": request["fullUrl"]}]
    assert request["resource"]["subject"] == {"reference": patient["fullUrl"]}
    assert imaging["numberOfSeries"] == 1 and imaging["numberOfInstances"] == 2
    assert [i.get("number") for i in imaging["series"][0]["instance"]] == [1, None]
    assert imaging["procedureCode"][0]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "CTHEAD",
        "display": "CT Head",
    }
    assert request["resource"]["priority"] == "stat" and request["resource"]["status"] == "active"
    assert request["resource"]["requester"] == {"display": "Lisa Cuddy"}
    assert patient["resource"]["identifier"][0]["assigner"] == {"display": "NORTH"}
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
    assert transaction(tree(), ORDER, SYSTEMS) == bundle  # the same study, the same Bundle


def test_a_local_coding_scheme_keeps_its_code_without_a_system() -> None:
    order = StudyOrder(**{**ORDER.__dict__, "procedure_code": ("X1", "99LOCAL", "Local thing"), "status": "CANCELED"})
    request = entries(transaction(tree(), order, SYSTEMS))["ServiceRequest"]["resource"]
    assert request["code"]["coding"] == [{"code": "X1", "display": "Local thing"}]
    assert request["status"] == "revoked"


def test_a_study_without_an_order_or_accession_has_no_service_request_nor_acsn() -> None:
    bundle = transaction(tree(accession_number="", patient_sex="", patient_birth_date="1970"), None, SYSTEMS)
    by_kind = entries(bundle)
    assert list(by_kind) == ["Patient", "ImagingStudy"]
    assert len(by_kind["ImagingStudy"]["resource"]["identifier"]) == 1
    assert "basedOn" not in by_kind["ImagingStudy"]["resource"]
    assert by_kind["Patient"]["resource"]["gender"] == "unknown"
    assert "birthDate" not in by_kind["Patient"]["resource"]


@pytest.mark.parametrize(
    ("pn", "expected"),
    [
        ("Doe^Jane", {"text": "Jane Doe", "family": "Doe", "given": ["Jane"]}),
        ("Doe^Jane^Q^Dr^III", {
            "text": "Dr Jane Q Doe III", "family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"], "suffix": ["III"],
        }),
        ("Yamada^Tarou=山田^太郎", {"text": "Tarou Yamada", "family": "Yamada", "given": ["Tarou"]}),
        ("", None),
        ("^^^^", None),
    ],
)  # fmt: skip
def test_person_names(pn: str, expected: dict[str, Any] | None) -> None:
    assert human_name(pn) == expected


def test_dates_and_times_carry_an_offset_when_they_have_a_time() -> None:
    assert fhir_date("20261203") == "2026-12-03"
    assert fhir_date("2026") == "" and fhir_date("20261340") == ""
    assert fhir_datetime("20261203", "") == "2026-12-03"
    local = datetime(2026, 12, 3, 10, 11, 12).astimezone().isoformat(timespec="seconds")
    assert fhir_datetime("20261203", "101112.123") == local
    assert fhir_datetime("20261203", "1011") == datetime(2026, 12, 3, 10, 11).astimezone().isoformat(timespec="seconds")
    assert fhir_datetime("20261203", "2561") == "2026-12-03"  # not a time: the date alone


class _Server:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body
        self.seen: list[tuple[dict[str, str], Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                server.seen.append((dict(self.headers), json.loads(self.rfile.read(length))))
                data = json.dumps(server.body).encode()
                self.send_response(server.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def answering() -> Iterator[Any]:
    made: list[_Server] = []

    def make(status: int, body: dict[str, Any]) -> _Server:
        made.append(_Server(status, body))
        return made[-1]

    yield make
    for server in made:
        server.http.shutdown()
        server.http.server_close()


def _response(*statuses: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": s}} for s in statuses],
    }


def test_the_client_sends_fhir_json_with_the_token_and_reads_each_entry(answering: Any) -> None:
    server = answering(200, _response("201 Created", "200 OK"))
    sent = {"resourceType": "Bundle", "entry": [{}, {}]}
    outcome = client.post_transaction(f"http://127.0.0.1:{server.port}/fhir", sent, "tok")
    assert outcome.statuses == ["201 Created", "200 OK"]
    headers, body = server.seen[0]
    assert headers["Authorization"] == "Bearer tok" and headers["Content-Type"].startswith("application/fhir+json")
    assert body == sent
    with pytest.raises(client.FhirError, match="answered 2 entries for 3"):  # an entry the server skipped
        client.post_transaction(f"http://127.0.0.1:{server.port}/fhir", {"entry": [{}, {}, {}]})


@pytest.mark.parametrize(
    ("status", "body", "permanent", "says"),
    [
        (412, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "several match"}]}, True, "HTTP 412"),
        (400, {"resourceType": "OperationOutcome", "issue": [{"details": {"text": "bad"}}]}, True, "bad"),
        (429, {}, False, "HTTP 429"),
        (503, {}, False, "HTTP 503"),
        (200, {"resourceType": "OperationOutcome"}, False, "not a transaction-response"),
        (200, _response("201 Created", "422 Unprocessable Entity"), True, "422 Unprocessable Entity"),
        (200, _response("409 Conflict"), False, "409 Conflict"),
        (302, {}, True, "redirects to"),
    ],
)
def test_refusals_say_whether_another_try_would_help(
    answering: Any, status: int, body: dict[str, Any], permanent: bool, says: str
) -> None:
    server = answering(status, body)
    with pytest.raises(client.FhirError) as raised:
        client.post_transaction(f"http://127.0.0.1:{server.port}/fhir", {"entry": [{}] * len(body.get("entry", []))})
    assert raised.value.permanent is permanent and says in str(raised.value)


def test_nobody_listening_is_worth_another_try() -> None:
    with pytest.raises(client.FhirError) as raised:
        client.post_transaction(f"http://127.0.0.1:{free_port()}/fhir", {}, timeout=5)
    assert not raised.value.permanent and "cannot reach" in str(raised.value)


def test_an_id_with_search_characters_is_escaped_in_every_condition() -> None:
    odd = tree(patient_id="A&b=c,d|e #1", issuer_of_patient_id="SOUTH")
    systems = Systems(**{**SYSTEMS.__dict__, "issuers": {"SOUTH": "https://south.example/mrn"}})
    patient = entries(transaction(odd, None, systems))["Patient"]
    assert patient["request"]["ifNoneExist"] == "identifier=https://south.example/mrn|A%26b%3Dc%5C%2Cd%5C%7Ce%20%231"
    assert patient["resource"]["identifier"][0]["system"] == "https://south.example/mrn"  # the issuer's system
    assert patient["resource"]["identifier"][0]["value"] == "A&b=c,d|e #1"  # the value itself as it is


def test_what_fhir_cannot_say_is_left_out_or_refused_by_name() -> None:
    negative = [SeriesNode("1.2.3.4.1", "CT", -1, "", "", [InstanceNode("1.2.3.4.1.1", "1.2.3", -5, "", 1, "r", "")])]
    series = entries(transaction(tree(series=negative), None, SYSTEMS))["ImagingStudy"]["resource"]["series"][0]
    assert "number" not in series and "number" not in series["instance"][0]
    with pytest.raises(ValueError, match="has no Patient ID"):
        transaction(tree(patient_id=""), None, SYSTEMS)


def test_jobs_of_a_pair_are_claimed_together_and_never_beside_a_send(database_url: str, tmp_path: Path) -> None:
    database = open_database(database_url)
    writer = InstanceWriter(InstanceIndex(database), tmp_path / "storage", tmp_path / "tmp")
    [ds] = study("CT", images=1, seed=3)
    writer.write(ds, "received")
    uid, later, now = ds.StudyInstanceUID, datetime.now(UTC) + timedelta(hours=1), datetime.now(UTC)
    jobs = FhirJobs(database, "node-a")

    def schedule(when: datetime, sooner: bool, studies: tuple[str, ...] = (uid,)) -> int:
        with database.writer.begin() as connection:
            return FhirJobs.schedule(connection, studies, ["ehr"], when, sooner)

    assert schedule(later, False, (uid, "9.9.9")) == 1  # a study not stored gets none
    assert schedule(later, False) == 0 and jobs.claim() == []  # moved, not doubled; not due
    assert schedule(now, True) == 0  # complete: due now
    assert schedule(later, True) == 0  # `sooner` never puts it back
    [claimed] = jobs.claim()
    assert claimed.state == "pending" and claimed.attempts == 0  # as read at the claim
    assert schedule(now, True) == 1  # arrived while sending: a job of its own
    assert FhirJobs(database, "node-b").claim() == []  # never beside the send of the pair
    jobs.settle([claimed.id], {}, {})
    [again] = FhirJobs(database, "node-b").claim()
    assert again.id != claimed.id and [j.state for j in jobs.by_ids([claimed.id, again.id])] == ["done", "sending"]
