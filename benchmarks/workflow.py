"""The whole department against a real Orthanc: how long from an ORM to a study verified at the
PACS, and how fast routing delivers, compared with DCMTK storescu and pynetdicom's best sender.

    .venv/bin/python benchmarks/workflow.py [--quick] [--shared ../shared/bench] [--json OUT]

- `latency`: ORM^O01 over MLLP (immediate acquisition) → MPPS → study generated and stored →
  routed to Orthanc → counted there by C-FIND (`verify = true`), one order at a time: 10
  two-image CRs and 5 one-series 100-slice CTs, p50 and p95 from the ORM's send to the
  verification's record.
- `routing`: a 500-slice CT made by `fabricatord generate` is routed to Orthanc; its rate is
  instances over the time from the first route job queued to the last one done. The same files
  are sent into a fresh Orthanc by DCMTK storescu and by the shared harness's chunked,
  TCP_NODELAY pynetdicom sender (`pyscu.py`), in the same run.
Figures drift between runs on a shared machine: the ratios of one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers
from benchmarks.report import RESULTS, finish, gate, table
from benchmarks.report import start as start_report
from fabricatord.hl7.mllp import MllpClient


def orm(number: int, modality: str) -> bytes:
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSPITAL|FABRICATORD|RADIOLOGY|{stamp}||ORM^O01^ORM_O01|WF{number:08d}|P|2.5.1",
            f"PID|1||WFPAT{number:05d}^^^HOSPITAL^MR||SMITH^JAMES||19600315|M",
            f"ORC|NW|WFO{number:08d}|WFF{number:08d}||SC",
            f"OBR|1|WFO{number:08d}|WFF{number:08d}|{modality}X^{modality} exam^L||||||||||||||WFA{number:08d}"
            f"||||||{modality}",
        ]
    ).encode()


def _verified(database: Path, accession: str) -> datetime | None:
    with sqlite3.connect(database) as connection:
        row = connection.execute(
            "SELECT max(r.verified_at) FROM route_jobs r JOIN requested_procedures p "
            "ON r.study_instance_uid = p.study_instance_uid JOIN orders o ON p.order_pk = o.id "
            "WHERE o.accession_number = ? HAVING count(*) > 0 AND sum(r.verified_at IS NULL) = 0",
            (accession,),
        ).fetchone()
    return None if row is None or row[0] is None else datetime.fromisoformat(row[0]).replace(tzinfo=UTC)


def latency(hl7_port: int, database: Path, modality: str, count: int, first: int) -> list[float]:
    seconds = []
    for number in range(first, first + count):
        sent = datetime.now(UTC)
        with MllpClient("127.0.0.1", hl7_port) as client:
            assert b"MSA|AA" in client.send(orm(number, modality))
        deadline = time.monotonic() + 120
        while (verified := _verified(database, f"WFA{number:08d}")) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"order {number} was not verified at Orthanc within 120 s")
            time.sleep(0.01)
        seconds.append((verified - sent).total_seconds())
    return seconds


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * (len(ordered) - 1) + 0.5))]


def routed_rate(database: Path, study_uid: str) -> tuple[int, float]:
    with sqlite3.connect(database) as connection:
        count, first, last = connection.execute(
            "SELECT count(*), min(created_at), max(updated_at) FROM route_jobs "
            "WHERE study_instance_uid = ? AND state = 'done'",
            (study_uid,),
        ).fetchone()
    span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return count, count / span


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer orders and a smaller CT: a smoke test")
    parser.add_argument("--shared", default=str(peers.ROOT.parent / "shared" / "bench"),
                        help="the shared harness, for its pynetdicom sender")  # fmt: skip
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    shared = Path(args.shared) if (Path(args.shared) / "pyscu.py").exists() else None
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/test installs the peers)", file=sys.stderr)
            return 69
    start_report(shared_harness=str(shared) if shared else None)
    crs, cts, slices = (3, 2, 100) if args.quick else (10, 5, 100)
    big = 100 if args.quick else 500
    known = {"fabricatord": ["FABRICATORD", "127.0.0.1", 104]}
    with tempfile.TemporaryDirectory(prefix="fabricatord-workflow-bench-") as folder:
        work = Path(folder)
        (work / "orthanc").mkdir()
        (work / "fabricatord").mkdir()
        pacs = peers.orthanc(work / "orthanc", known=known)
        config = (
            '[synth]\nacquisition = "immediate"\n'
            f"[synth.modality.CT]\nseries = 1\nimages = {slices}\n"
            f'[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nport = {pacs.port}\n'
            '[[routes]]\nname = "pacs"\nmatch = { source = "generated" }\nto = ["orthanc"]\nverify = true\n'
        )
        server = peers.fabricatord(work / "fabricatord", config)
        database = work / "fabricatord" / "data" / "fabricatord.sqlite"
        try:
            hl7_port = int(server.extra["hl7_port"])  # type: ignore[call-overload]
            cr = latency(hl7_port, database, "CR", crs, 0)
            ct = latency(hl7_port, database, "CT", cts, 1000)
            ours = str(work / "fabricatord" / "fabricatord.toml")
            generated = subprocess.run(
                [peers.PYTHON, "-m", "fabricatord", "generate", "--config", ours,
                 "--modality", "CT", "--series", "1", "--images", str(big)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            study_uid = generated.split("Study Instance UID:")[1].split()[0]
            deadline = time.monotonic() + 600
            while True:
                with sqlite3.connect(database) as connection:
                    left = connection.execute(
                        "SELECT count(*) FROM route_jobs WHERE study_instance_uid = ? AND state != 'done'", (study_uid,)
                    ).fetchone()[0]
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            count, fabricatord_rate = routed_rate(database, study_uid)
            files = sorted((work / "fabricatord" / "data" / "storage" / study_uid).rglob("*.dcm"))
        finally:
            server.stop()
            pacs.stop()
        rates = {"fabricatord routing": fabricatord_rate}
        for name in ("storescu", "pyscu") if shared else ("storescu",):
            target = work / f"orthanc-{name}"
            target.mkdir()
            fresh = peers.orthanc(target)
            try:
                if name == "storescu":
                    rates["DCMTK storescu"] = len(files) / peers.storescu(fresh.port, "ORTHANC", files)
                else:
                    listing = work / "files.txt"
                    listing.write_text("\n".join(map(str, files)) + "\n")
                    out = subprocess.run(
                        [peers.PYTHON, str(shared / "pyscu.py"), "--port", str(fresh.port), "--aec", "ORTHANC",
                         "--files-from", str(listing), "--max-pdu", "0"],
                        capture_output=True, text=True, check=True, env=peers.ENV,
                    )  # fmt: skip
                    rates["pynetdicom best sender (pyscu)"] = (
                        len(files) / json.loads(out.stdout.strip().splitlines()[-1])["total_s"]
                    )
            finally:
                fresh.stop()
    table(
        "ORM to a study verified at Orthanc (seconds)",
        ["study", "orders", "p50", "p95", "max"],
        [
            ["CR, 2 images", len(cr), _percentile(cr, 0.5), _percentile(cr, 0.95), max(cr)],
            [f"CT, {slices} slices", len(ct), _percentile(ct, 0.5), _percentile(ct, 0.95), max(ct)],
        ],
    )
    table(
        f"Routing {count} CT instances into Orthanc (instances/s)",
        ["sender", "inst/s"],
        [[k, v] for k, v in rates.items()],
    )
    RESULTS.update(latency_cr=cr, latency_ct=ct, routing=rates, routed_instances=count)
    gate("ORM to 2-image CR verified at Orthanc, p50 s", statistics.median(cr), 1.0, False)
    best = rates.get("pynetdicom best sender (pyscu)")
    gate("routing ÷ pynetdicom best sender", fabricatord_rate / best if best else None, 0.9, True)
    gate("routing ÷ DCMTK storescu", fabricatord_rate / rates["DCMTK storescu"], 1.0, True)
    finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
