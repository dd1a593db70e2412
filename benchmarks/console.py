"""The console and the API at 10,000 studies: study search and the dashboard, beside Orthanc's
REST `/tools/find` on the same studies.

    .venv/bin/python benchmarks/console.py [--studies 10000] [--rounds 40] [--json OUT]

Both servers receive the same studies over DICOM (DCMTK storescu, four associations): one small
Secondary Capture image each, 5,000 patients with two studies apiece, dates over six years, four
modalities. Then each search below runs `--rounds` times against each, one request at a time
over a kept-alive HTTP connection:

- fabricatord: `GET /api/v1/studies?KEY=VALUE&limit=100` with a bearer token (an admin's), which
  answers the matching studies' attributes, their modalities and counts, and the total;
- Orthanc: `POST /tools/find` with `{"Level": "Study", "Query": {KEY: VALUE}, "Limit": 100,
  "Expand": true}`, which answers the matching studies with their main tags.

The dashboard (`GET /` with a session cookie) is timed on its own: every count, the readiness
checks, the failures and the recent activity, rendered. Gates: API search p95 ≤ 100 ms and no
slower than Orthanc's; dashboard p95 ≤ 100 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from benchmarks import peers
from benchmarks.report import finish, gate, table
from benchmarks.report import start as start_report

FAMILIES = [
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ", "MARTINEZ",
    "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
]  # fmt: skip
GIVEN = ["JAMES", "MARY", "ROBERT", "PATRICIA", "JOHN", "JENNIFER", "MICHAEL", "LINDA", "DAVID", "ELIZABETH"]
MODALITIES = ["CT", "MR", "CR", "US"]
PASSWORD = "benchmark password"


def make_studies(folder: Path, count: int) -> list[Path]:
    """`count` one-image studies, two per patient, written as Part 10 files."""
    rng = random.Random(1234)
    files = []
    for number in range(count):
        patient = number // 2
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName = f"{FAMILIES[patient % len(FAMILIES)]}^{GIVEN[patient // len(FAMILIES) % len(GIVEN)]}"
        ds.PatientID = f"BENCH{patient:06d}"
        ds.PatientBirthDate = f"{1940 + patient % 60}0{1 + patient % 9}15"
        ds.PatientSex = "MF"[patient % 2]
        day = rng.randrange(6 * 365)
        ds.StudyDate = time.strftime("%Y%m%d", time.gmtime(1_577_836_800 + day * 86400))
        ds.StudyTime = f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}00"
        ds.AccessionNumber = f"ACC{number:08d}"
        ds.StudyID = str(number)
        ds.StudyDescription = "BENCHMARK STUDY"
        ds.ReferringPhysicianName = ""
        ds.Modality = MODALITIES[number % len(MODALITIES)]
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = bytes(64)
        path = folder / f"{number:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def searches(studies: int) -> list[tuple[str, dict[str, str]]]:
    """The same searches for both servers: (label, DICOM keyword → value)."""
    middle = studies // 4
    return [
        ("newest 100 of all", {}),
        ("PatientID exact", {"PatientID": f"BENCH{middle:06d}"}),
        ("PatientName wildcard", {"PatientName": "GARCIA*"}),
        ("StudyDate one month", {"StudyDate": "20230301-20230331"}),
        ("AccessionNumber exact", {"AccessionNumber": f"ACC{middle:08d}"}),
        ("Modality CT", {"ModalitiesInStudy": "CT"}),
    ]


def timed(
    connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> float:
    started = time.perf_counter()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    seconds = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
    return seconds


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def add_admin(server: peers.Server) -> str:
    config = str(server.work / "fabricatord.toml")
    command = [peers.PYTHON, "-m", "fabricatord", "users"]
    subprocess.run([*command, "add", "bench", "--role", "admin", "--password-stdin", "--config", config],
                   input=PASSWORD + "\n", text=True, check=True, capture_output=True)  # fmt: skip
    return subprocess.run([*command, "token", "bench", "--config", config], text=True, check=True,
                          capture_output=True).stdout.strip()  # fmt: skip


def session_cookie(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/login")
    response = connection.getresponse()
    page = response.read().decode()
    login_cookie = response.getheader("Set-Cookie", "").split(";")[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    form = urllib.parse.urlencode({"username": "bench", "password": PASSWORD, "csrf_token": token.group(1)})
    connection.request("POST", "/login", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": login_cookie})  # fmt: skip
    response = connection.getresponse()
    response.read()
    if response.status != 303:
        raise RuntimeError(f"sign-in failed: {response.status}")
    return str(response.getheader("Set-Cookie", "")).split(";")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=40, help="times each search runs against each server")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    start_report(benchmark="console", studies=args.studies, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as scratch:
        work = Path(scratch)
        (work / "files").mkdir()
        made = time.perf_counter()
        files = make_studies(work / "files", args.studies)
        print(f"{len(files)} studies written in {time.perf_counter() - made:.1f} s", flush=True)
        (work / "fabricatord").mkdir()
        (work / "orthanc").mkdir()
        ours = peers.fabricatord(work / "fabricatord")
        orthanc = peers.orthanc(work / "orthanc")
        try:
            for server in (ours, orthanc):
                seconds = peers.storescu(server.port, server.ae_title, files, associations=4)
                held = server.count(server)
                print(f"{server.name}: {held} instances stored in {seconds:.1f} s", flush=True)
                if held != len(files):
                    raise RuntimeError(f"{server.name} holds {held} of {len(files)}")
            token = add_admin(ours)
            results = measure(ours, orthanc, token, args)
        finally:
            ours.stop()
            orthanc.stop()
    report(results)
    finish(args.json)
    return 0


def measure(ours: peers.Server, orthanc: peers.Server, token: str, args: argparse.Namespace) -> dict[str, Any]:
    api = http.client.HTTPConnection("127.0.0.1", ours.http_port, timeout=60)
    rest = http.client.HTTPConnection("127.0.0.1", orthanc.http_port, timeout=60)
    bearer = {"Authorization": f"Bearer {token}"}
    latencies: dict[str, dict[str, list[float]]] = {}
    for label, query in searches(args.studies):
        path = "/api/v1/studies?" + urllib.parse.urlencode({**query, "limit": "100"})
        body = json.dumps({"Level": "Study", "Query": query, "Limit": 100, "Expand": True}).encode()
        # One of each first: what a cold cache costs is not what a user waits for twice.
        timed(api, "GET", path, None, bearer)
        timed(rest, "POST", "/tools/find", body, {"Content-Type": "application/json"})
        ours_times, orthanc_times = [], []
        for _ in range(args.rounds):
            ours_times.append(timed(api, "GET", path, None, bearer))
            orthanc_times.append(timed(rest, "POST", "/tools/find", body, {"Content-Type": "application/json"}))
        latencies[label] = {"fabricatord": ours_times, "orthanc": orthanc_times}
    cookie = {"Cookie": session_cookie(ours.http_port)}
    timed(api, "GET", "/", None, cookie)
    dashboard = [timed(api, "GET", "/", None, cookie) for _ in range(args.rounds * 2)]
    return {"searches": latencies, "dashboard": dashboard}


def report(results: dict[str, Any]) -> None:
    from benchmarks.report import RESULTS

    rows, every_ours, every_orthanc = [], [], []
    for label, times in results["searches"].items():
        ours, theirs = times["fabricatord"], times["orthanc"]
        every_ours += ours
        every_orthanc += theirs
        p95_ours, p95_theirs = percentile(ours, 0.95) * 1000, percentile(theirs, 0.95) * 1000
        rows.append([label, statistics.median(ours) * 1000, p95_ours, statistics.median(theirs) * 1000, p95_theirs,
                     p95_ours / p95_theirs])  # fmt: skip
        RESULTS.setdefault("searches", {})[label] = {"fabricatord_p95_ms": p95_ours, "orthanc_p95_ms": p95_theirs}
    table(
        "Study search (ms; ratio = fabricatord p95 ÷ Orthanc p95)",
        ["search", "fabricatord p50", "fabricatord p95", "Orthanc p50", "Orthanc p95", "ratio"],
        rows,
    )
    dashboard = results["dashboard"]
    table(
        "Dashboard GET / (ms)",
        ["p50", "p95", "max"],
        [[statistics.median(dashboard) * 1000, percentile(dashboard, 0.95) * 1000, max(dashboard) * 1000]],
    )
    ours_p95, orthanc_p95 = percentile(every_ours, 0.95) * 1000, percentile(every_orthanc, 0.95) * 1000
    RESULTS.update(api_p95_ms=ours_p95, orthanc_p95_ms=orthanc_p95, dashboard_p95_ms=percentile(dashboard, 0.95) * 1000)
    gate("API study search p95, ms", ours_p95, 100, higher_is_better=False)
    gate("API study search p95 ÷ Orthanc /tools/find p95", ours_p95 / orthanc_p95, 1.0, higher_is_better=False)
    worst = max(row[-1] for row in rows)
    gate("slowest search's p95 ÷ Orthanc's for it", worst, 1.0, higher_is_better=False)
    gate("dashboard p95, ms", percentile(dashboard, 0.95) * 1000, 100, higher_is_better=False)


if __name__ == "__main__":
    sys.exit(main())
