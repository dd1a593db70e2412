"""FHIR export: every generated modality, a study DCMTK sends and a study acquired for an HL7
order become R4B resources whose identifiers are the DICOM's and the order's, sent as transaction
Bundles to a FHIR server (the stand-in in fhir_server.py) through durable jobs that retry,
give up on a refusal, and never make a resource twice."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import run_cli
from tests.integration.conftest import BOTH_BACKENDS, Daemon, generated, halt, launch, storescu
from tests.integration.fhir_server import FhirServer, references
from tests.integration.test_acquisition import IHE, STUDY_UID, wait_for
from tests.integration.test_hl7_listener import frame_of, msa, send
from tests.integration.web import Client, add_user, users

pytestmark = pytest.mark.integration

MODALITIES = ["CR", "DX", "CT", "MR", "US", "MG", "SC"]
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def destination(server: FhirServer, stable_age: str = "2s", attempts: int = 8) -> str:
    token = f'bearer_token = "{server.token}"\n' if server.token else ""
    return (
        f'[fhir]\nstable_age = "{stable_age}"\npatient_id_system = "https://north.example/mrn"\n'
        f'attempts = {attempts}\n[[fhir.destinations]]\nname = "ehr"\nurl = "{server.url}"\n{token}'
    )


def test_jobs_are_seen_and_retried_from_the_api_and_the_console(tmp_path: Path) -> None:
    """The EHR is down past the attempts: the job fails; once it is up, a retry over the API sends it."""
    down = FhirServer()  # made, not started: nobody listens on its port yet
    daemon = launch(tmp_path, extra=destination(down, attempts=1))
    try:
        add_user(daemon.config, "writer", "test_write")
        api = Client(daemon.http_port, token=users(daemon.config, "token", "writer"))
        made = api.post("/api/v1/generate", {"modality": "DX", "images": 1}).json()
        uid = made["study_instance_uid"]

        def jobs() -> list[dict[str, Any]]:
            return list(api.get(f"/api/v1/jobs?kind=fhir&study={uid}").json()["jobs"])

        wait_for(lambda: [job["state"] for job in jobs()] == ["failed"], 30)
        [job] = jobs()
        assert job["kind"] == "fhir" and job["destination"] == "ehr" and "cannot reach" in job["last_error"]
        assert api.get("/api/v1/status").json()["fhir_jobs"] == {"failed": 1}
        console = Client(daemon.http_port)
        assert console.login("writer").status == 303
        page = console.get("/jobs").text
        assert f'id="job-{job["id"]}"' in page and "cannot reach" in page
        with FhirServer(port=down.port) as server:
            retried = api.post("/api/v1/jobs/retry", {"kind": "fhir", "state": "failed"}).json()
            assert retried["done"] == [job["id"]]
            wait_for(lambda: api.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "done", 30)
            [study] = server.of_type("ImagingStudy")
            assert study["identifier"][0]["value"] == f"urn:oid:{uid}"
    finally:
        halt(daemon)


def fhir_jobs(daemon: Daemon, *options: str) -> list[str]:
    listed = run_cli("jobs", "list", "fhir", *options, "--config", str(daemon.config)).stdout
    return [line for line in listed.splitlines() if line.startswith("f")]


def bundle_of(config: Path, study_uid: str) -> dict[str, Any]:
    return dict(json.loads(run_cli("fhir", study_uid, "--config", str(config)).stdout))


def resource(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    [found] = [e for e in bundle["entry"] if e["resource"]["resourceType"] == kind]
    return dict(found)


def check_against_files(bundle: dict[str, Any], files: list[Path], system: str) -> None:
    """The Bundle says what the files say: study, accession, patient, series, instances, classes."""
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)  # R4B-valid as a whole
    images = [dcmread(f, stop_before_pixels=True) for f in files]
    first = images[0]
    study = resource(bundle, "ImagingStudy")
    assert study["request"] == {
        "method": "PUT",
        "url": f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{first.StudyInstanceUID}",
    }
    imaging = study["resource"]
    assert imaging["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{first.StudyInstanceUID}"}
    accession = imaging["identifier"][1]
    assert accession["value"] == first.AccessionNumber and accession["type"]["coding"][0]["code"] == "ACSN"
    assert imaging["status"] == "available"
    assert imaging["numberOfInstances"] == len(images)
    assert imaging["numberOfSeries"] == len({i.SeriesInstanceUID for i in images})
    assert imaging["modality"] == [{"system": DCM, "code": first.Modality}]
    assert imaging["started"].startswith(f"{first.StudyDate[:4]}-{first.StudyDate[4:6]}-{first.StudyDate[6:]}T")
    assert imaging["started"][19] in "+-Z"  # with its offset
    listed = {
        (s["uid"], s["modality"]["code"], i["uid"], i["sopClass"]["code"], i.get("number"))
        for s in imaging["series"]
        for i in s["instance"]
    }
    assert listed == {
        (i.SeriesInstanceUID, i.Modality, i.SOPInstanceUID, f"urn:oid:{i.SOPClassUID}", i.get("InstanceNumber"))
        for i in images
    }
    patient_entry = resource(bundle, "Patient")
    patient = patient_entry["resource"]
    assert patient["identifier"][0]["system"] == system and patient["identifier"][0]["value"] == first.PatientID
    assert patient_entry["request"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": f"identifier={system}|{first.PatientID}",
    }
    assert patient["name"][0]["family"] == str(first.PatientName).split("^")[0]
    assert patient["birthDate"].replace("-", "") == first.PatientBirthDate
    assert patient["gender"] == {"M": "male", "F": "female", "O": "other"}[first.PatientSex]
    assert imaging["subject"]["reference"] == patient_entry["fullUrl"]


def test_every_generated_modality_makes_valid_resources_that_a_daemon_then_delivers(tmp_path: Path) -> None:
    with FhirServer() as server:
        config = tmp_path / "fabricatord.toml"
        config.write_text(f'[node]\ndata_dir = "data"\n{destination(server)}')
        made: dict[str, str] = {}
        for modality in MODALITIES:
            out = run_cli("generate", "--modality", modality, "--series", "1", "--images", "2", "--config", str(config))
            made[modality] = out.stdout.split("Study Instance UID:")[1].split()[0]
        storage = tmp_path / "data" / "storage"
        for modality, study_uid in made.items():
            files = [
                f for f in storage.rglob("*.dcm") if dcmread(f, stop_before_pixels=True).StudyInstanceUID == study_uid
            ]
            assert len(files) == 2, modality
            bundle = bundle_of(config, study_uid)
            check_against_files(bundle, files, "https://north.example/mrn")
            kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
            assert kinds == ["Patient", "ImagingStudy"], modality  # no order asked for it: no ServiceRequest
        unknown = run_cli("fhir", "1.2.3.4.5", "--config", str(config), check=False)
        assert unknown.returncode == 65 and "no study '1.2.3.4.5' is stored" in unknown.stderr
        # `generate` finished each one: its job waits for the daemon, which sends them all.
        queued = run_cli("jobs", "list", "fhir", "--config", str(config)).stdout
        assert queued.count(" pending ") == len(MODALITIES)
        daemon = launch(tmp_path, extra=destination(server))
        try:
            wait_for(lambda: len(server.of_type("ImagingStudy")) == len(MODALITIES), 60)
            wait_for(lambda: len(fhir_jobs(daemon, "--state", "done")) == len(MODALITIES), 30)
        finally:
            halt(daemon)
        held = {s["identifier"][0]["value"] for s in server.of_type("ImagingStudy")}
        assert held == {f"urn:oid:{uid}" for uid in made.values()}
        patients = server.of_type("Patient")
        for study in server.of_type("ImagingStudy"):  # each points at a Patient the server holds
            kind, _, rid = study["subject"]["reference"].partition("/")
            assert kind == "Patient" and rid in {p["id"] for p in patients}


@BOTH_BACKENDS
def test_an_order_acquired_and_a_study_received_reach_the_ehr_once_through_retries_and_refusals(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    with FhirServer(token="s3cret") as server:
        daemon = start_daemon(destination(server), synth='acquisition = "immediate"\n')
        # An HL7 order: acquired, MPPS COMPLETED to our own SCP, and then the EHR hears of it.
        assert msa(send(daemon, frame_of(IHE)))[0] == "AA"
        wait_for(lambda: len(server.of_type("ImagingStudy")) == 1, 90)
        [order] = server.of_type("ServiceRequest")
        by_type = {i["type"]["coding"][0]["code"]: (i["system"], i["value"]) for i in order["identifier"]}
        assert by_type == {
            "ACSN": ("urn:fabricatord:accession", "ACC1001"),
            "PLAC": ("urn:fabricatord:placer-order", "PO1001"),
            "FILL": ("urn:fabricatord:filler-order", "FO1001"),
        }
        assert (order["status"], order["intent"], order["code"]["coding"][0]["code"]) == (
            "completed",
            "order",
            "CTHEAD",
        )
        [patient] = server.of_type("Patient")
        assert patient["identifier"][0]["value"] == "MRN1001" and patient["name"][0]["family"] == "Sellers"
        [study] = server.of_type("ImagingStudy")
        assert study["identifier"][0]["value"] == f"urn:oid:{STUDY_UID}"
        assert study["subject"]["reference"] == f"Patient/{patient['id']}"
        assert study["basedOn"] == [{"reference": f"ServiceRequest/{order['id']}"}]
        assert study["procedureCode"][0]["coding"][0]["code"] == "CTHEAD"
        files = sorted((daemon.data_dir / "storage").rglob("*.dcm"))
        check_against_files(server.bundles[-1], files, "https://north.example/mrn")
        assert server.answers == [200]

        # A study DCMTK sends: complete once nothing arrived for stable_age (2 s), sent once.
        sent = generated(tmp_path, "MR", 3)
        assert storescu(daemon.port, sent).returncode == 0
        received_uid = dcmread(sent[0]).StudyInstanceUID
        wait_for(lambda: len(server.of_type("ImagingStudy")) == 2, 30)
        check_against_files(server.bundles[-1], sent, "https://north.example/mrn")
        [job] = fhir_jobs(daemon, "--study", received_uid)
        assert " done " in job

        # A resend (jobs retry) is a conditional update: 200, nothing made twice.
        assert (
            "1 job(s) due again now" in run_cli("jobs", "retry", job.split()[0], "--config", str(daemon.config)).stdout
        )
        wait_for(lambda: len(server.answers) == 3, 30)
        statuses = [e["response"]["status"] for e in server.responses[-1]["entry"]]
        assert statuses == ["200 OK", "200 OK"] and received_uid in json.dumps(server.bundles[-1])
        assert (len(server.of_type("ImagingStudy")), len(server.of_type("Patient"))) == (2, 2)

        # The server down for a while: the job is retried with backoff until it takes it.
        server.outages = 2
        more = generated(tmp_path / "more", "CT", 2)
        assert storescu(daemon.port, more).returncode == 0
        wait_for(lambda: len(server.of_type("ImagingStudy")) == 3, 60)
        assert server.answers[-3:] == [503, 503, 200]
        [job] = fhir_jobs(daemon, "--study", dcmread(more[0]).StudyInstanceUID)
        assert " done " in job and "tries 3" in job

        # Another system made a second Patient with this MRN: 412, failed at once, sent after the fix.
        later = generated(tmp_path / "later", "CR", 1)
        mrn = {"system": "https://north.example/mrn", "value": dcmread(later[0]).PatientID}
        assert len(server.of_type("Patient")) == 2  # the generated studies share their first patient's ID
        duplicate = server.add({"resourceType": "Patient", "identifier": [mrn]})
        assert storescu(daemon.port, later).returncode == 0
        later_uid = dcmread(later[0]).StudyInstanceUID
        wait_for(lambda: " failed " in "".join(fhir_jobs(daemon, "--study", later_uid)), 30)
        [job] = fhir_jobs(daemon, "--study", later_uid)
        assert "tries 1" in job and "HTTP 412" in job and "matches 2 resources" in job
        del server.resources["Patient"][duplicate]
        run_cli("jobs", "retry", job.split()[0], "--config", str(daemon.config))
        wait_for(lambda: " done " in "".join(fhir_jobs(daemon, "--study", later_uid)), 30)
        assert len(server.of_type("ImagingStudy")) == 4
        assert daemon.metric("fabricatord_fhir_exports_total", destination="ehr", outcome="failed") == 1
        assert daemon.metric("fabricatord_fhir_exports_total", destination="ehr", outcome="done") == 5


def test_a_job_sent_when_the_daemon_dies_is_sent_again_without_a_duplicate(tmp_path: Path) -> None:
    with FhirServer() as server:
        daemon = launch(tmp_path, extra=destination(server), env={"FABRICATORD_FAULTPOINT": "fhir.after_send:kill"})
        try:
            files = generated(tmp_path, "US", 2)
            assert storescu(daemon.port, files).returncode == 0
            daemon.process.wait(timeout=30)  # killed just after the server took the Bundle
            assert daemon.process.returncode == -signal.SIGKILL
            assert len(server.bundles) == 1
            [job] = fhir_jobs(daemon)
            assert " sending " in job
            restarted = launch(tmp_path, "again", extra=destination(server))
            try:
                wait_for(lambda: " done " in "".join(fhir_jobs(restarted)), 30)
            finally:
                halt(restarted)
        finally:
            halt(daemon)
        assert len(server.bundles) == 2  # at least once: sent again
        assert (len(server.of_type("ImagingStudy")), len(server.of_type("Patient"))) == (1, 1)  # made once
        assert server.bundles[1] == server.bundles[0]  # the same study made the same Bundle both times
        assert all(not r.startswith("urn:uuid:") for r in references(server.of_type("ImagingStudy")[0]))
