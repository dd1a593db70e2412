"""Soak: minutes of mixed load on one daemon, and the same DICOM load on Orthanc in the same run.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--quick] [--no-peer] [--hl7-rate 50] [--json OUT]

The load, from separate processes, every actor waiting for each answer before the next request:
- 20 C-STORE actors: an association per study of 10 CT instances (64×64, new UIDs each time,
  patients drawn from 2,000), then the next study;
- 10 MLLP senders, each on its own connection, open-loop at a fixed rate shared between them
  (`--hl7-rate`, 50 ORM^O01/s in all; 0: each as fast as its ACKs come), so that a faster HL7
  path takes no CPU from the DICOM comparison; an ORM's latency is counted from the moment it
  was due, so a late answer delays the count of the next ones too;
- one Modality Worklist actor and one study C-FIND actor, an association per query (as
  modalities and viewers do): the items of one patient, the studies of one patient.

Reported per operation: throughput, p50 and p99 latency, errors (any answer other than success,
AA, or an association that failed). The daemon's RSS is sampled every 5 s; growth is measured
from the end of the warm-up (the first tenth, at least 30 s, at most half) to the end. Afterwards the
daemon's index is checked against what the actors were told: every instance answered success
and every order answered AA must be there.

Orthanc gets the DICOM actors for the same time (it has no MLLP listener), with its worklist
plugin over 2,000 DCMTK worklist files; the ratios compare fabricatord with it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, peers
from benchmarks.hl7 import END, START, connect, orm, read_ack
from benchmarks.report import RESULTS, finish, gate, table
from benchmarks.report import start as start_report

INSTANCES_PER_STUDY = 10
PATIENTS = 2000
PROCESSES = 4
SAMPLE_EVERY = 5.0
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
TAKEN = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass
class Tally:
    """What one kind of operation did in one process."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    succeeded: int = 0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(what)


@dataclass(frozen=True)
class Target:
    ae_title: str
    port: int
    hl7_port: int
    run: int
    """Keeps the UIDs and identifiers of one run apart from another's."""
    hl7_interval: float = 0.0
    """Seconds between one sender's ORMs; 0: the next as soon as the ACK came."""


def _template() -> Any:
    """A CT slice from fabricatord's generator, cut down to 64×64 so that minutes of storing fit
    on disk; each store gives it new UIDs."""
    from pydicom import dcmread

    ds = dcmread(data.ct_study(1)[0])
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(64 * 64 * 2)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return ds


def _associate(ae: Any, target: Target) -> Any:
    """An association as fabricatord's own SCU makes one: TCP_NODELAY (as DCMTK with TCP_NODELAY=1
    and Orthanc), and guarded against pynetdicom's reactor race (docs/upstream.md)."""
    from pynetdicom import evt

    from fabricatord.dicom.scu import keep_stray_responses, nodelay

    handlers = [(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_CONN_OPEN, keep_stray_responses)]
    return ae.associate("127.0.0.1", target.port, ae_title=target.ae_title, evt_handlers=handlers)


def _store_actor(target: Target, actor: int, deadline: float, tally: Tally) -> None:
    from pynetdicom import AE

    ds = _template()
    ae = AE(ae_title=peers.SCU_AE)
    ae.add_requested_context(data.CT_IMAGE, "1.2.840.10008.1.2.1")
    study = 0
    while time.monotonic() < deadline:
        study += 1
        prefix = f"{data.UID_BASE}.30.{target.run}.{actor}.{study}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = prefix, f"{prefix}.1"
        ds.PatientID = f"SOAK{random.randrange(PATIENTS):05d}"
        ds.AccessionNumber = f"S{actor:02d}{study:07d}"
        assoc = _associate(ae, target)
        if not assoc.is_established:
            tally.error("C-STORE association not established")
            time.sleep(1)
            continue
        for number in range(1, INSTANCES_PER_STUDY + 1):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{prefix}.1.{number}"
            ds.InstanceNumber = number
            sent = time.perf_counter()
            status = assoc.send_c_store(ds)
            tally.latencies.append(time.perf_counter() - sent)
            code = getattr(status, "Status", None)
            if code in TAKEN:
                tally.succeeded += 1
            else:
                tally.error(f"C-STORE status {code if code is None else hex(code)}")
        assoc.release()


def _find_actor(kind: str) -> Callable[[Target, int, float, Tally], None]:
    def actor(target: Target, _actor: int, deadline: float, tally: Tally) -> None:
        from pydicom.dataset import Dataset
        from pynetdicom import AE

        sop_class = data.MWL_FIND if kind == "mwl" else STUDY_ROOT_FIND
        ae = AE(ae_title=peers.SCU_AE)
        ae.add_requested_context(sop_class)
        while time.monotonic() < deadline:
            query = Dataset()
            if kind == "mwl":
                # Orthanc's items are the benchmark worklist's; ours come from the MLLP senders.
                query.PatientID = (
                    f"WP{random.randrange(PATIENTS):06d}"
                    if target.hl7_port == 0
                    else f"PAT{random.randrange(PATIENTS):05d}"
                )
                query.PatientName = query.AccessionNumber = ""
                step = Dataset()
                step.Modality = step.ScheduledProcedureStepStartDate = step.ScheduledProcedureStepID = ""
                query.ScheduledProcedureStepSequence = [step]
            else:
                query.QueryRetrieveLevel = "STUDY"
                query.PatientID = f"SOAK{random.randrange(PATIENTS):05d}"
                query.StudyInstanceUID = query.StudyDate = query.AccessionNumber = ""
            started = time.perf_counter()
            assoc = _associate(ae, target)
            if not assoc.is_established:
                tally.error(f"{kind} association not established")
                time.sleep(1)
                continue
            final = None
            for status, _identifier in assoc.send_c_find(query, sop_class):
                final = getattr(status, "Status", None)
            assoc.release()
            tally.latencies.append(time.perf_counter() - started)
            if final != 0x0000:
                tally.error(f"{kind} final status {final if final is None else hex(final)}")

    return actor


def _hl7_actor(target: Target, actor: int, deadline: float, tally: Tally) -> None:
    number = actor * 10_000_000  # each sender's accession numbers, ACC…, apart from the others'
    connection = connect(target.hl7_port)
    buffer = bytearray()
    due = time.perf_counter() + random.random() * target.hl7_interval  # senders spread over one interval
    while time.monotonic() < deadline:
        number += 1
        patient = f"PAT{random.randrange(PATIENTS):05d}".encode()
        message = orm(number).replace(f"PAT{number % 100000:05d}".encode(), patient)
        if target.hl7_interval:
            time.sleep(max(0.0, due - time.perf_counter()))
            sent, due = due, due + target.hl7_interval
        else:
            sent = time.perf_counter()
        try:
            connection.sendall(START + message + END)
            ack = read_ack(connection, buffer)
        except OSError as exc:
            tally.error(f"MLLP: {exc}")
            connection, buffer = connect(target.hl7_port), bytearray()
            continue
        tally.latencies.append(time.perf_counter() - sent)
        if b"MSA|AA" in ack:
            tally.succeeded += 1
        else:
            tally.error(ack.decode(errors="replace").split("\r")[1][:120])
    connection.close()


ACTORS: dict[str, Callable[[Target, int, float, Tally], None]] = {
    "C-STORE": _store_actor,
    "HL7 ORM": _hl7_actor,
    "MWL C-FIND": _find_actor("mwl"),
    "study C-FIND": _find_actor("study"),
}


def _process(job: tuple[Target, list[tuple[str, int]], float]) -> dict[str, Tally]:
    """One load process: a thread per actor, until the deadline."""
    target, actors, seconds = job
    deadline = time.monotonic() + seconds
    tallies = {kind: Tally() for kind, _ in actors}
    threads = [
        threading.Thread(target=ACTORS[kind], args=(target, number, deadline, tallies[kind])) for kind, number in actors
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tallies


def soak(
    server: peers.Server, hl7_port: int, seconds: float, stores: int, senders: int, hl7_rate: float = 0.0
) -> dict[str, Any]:
    """The load on `server` for `seconds`; throughput, latencies, errors and RSS."""
    interval = senders / hl7_rate if hl7_rate and senders else 0.0
    target = Target(server.ae_title, server.port, hl7_port, int(time.time()), interval)
    actors = [("C-STORE", n) for n in range(stores)] + [("MWL C-FIND", 0), ("study C-FIND", 0)]
    actors += [("HL7 ORM", n) for n in range(senders)] if hl7_port else []
    jobs = [(target, actors[p::PROCESSES], seconds) for p in range(PROCESSES)]
    warm_up = min(max(30.0, seconds / 10), seconds / 2)  # a short run still measures its second half
    samples: list[tuple[float, int]] = [(0.0, peers.rss(server.process.pid))]
    cpu_before = _cpu_seconds(server.process.pid)
    with multiprocessing.get_context("fork").Pool(PROCESSES) as pool:
        pending = pool.map_async(_process, jobs)
        started = time.monotonic()
        while not pending.ready():
            pending.wait(SAMPLE_EVERY)
            samples.append((time.monotonic() - started, peers.rss(server.process.pid)))
        results = pending.get()
    cpu = _cpu_seconds(server.process.pid) - cpu_before
    merged: dict[str, Tally] = {}
    for tallies in results:
        for kind, tally in tallies.items():
            whole = merged.setdefault(kind, Tally())
            whole.latencies += tally.latencies
            whole.succeeded += tally.succeeded
            whole.errors += tally.errors
            whole.first_errors += tally.first_errors[: 5 - len(whole.first_errors)]
    warm = next((rss for at, rss in samples if at >= warm_up), samples[-1][1])
    return {
        "operations": {kind: _summary(tally, seconds) for kind, tally in merged.items()},
        "cpu_percent": cpu / seconds * 100,
        "rss_idle_mib": samples[0][1] / 2**20,
        "rss_warm_mib": warm / 2**20,
        "rss_end_mib": samples[-1][1] / 2**20,
        "rss_max_mib": max(rss for _, rss in samples) / 2**20,
        "rss_growth_pct": (samples[-1][1] - warm) / warm * 100,
        "told_success": {kind: tally.succeeded for kind, tally in merged.items() if kind in ("C-STORE", "HL7 ORM")},
    }


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time the server's main process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(tally: Tally, seconds: float) -> dict[str, Any]:
    ordered = sorted(tally.latencies)

    def percentile(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * (len(ordered) - 1) + 0.5))] * 1000 if ordered else 0.0

    return {
        "count": len(ordered),
        "per_second": len(ordered) / seconds,
        "p50_ms": percentile(0.5),
        "p99_ms": percentile(0.99),
        "errors": tally.errors,
        "first_errors": tally.first_errors,
    }


def _kept(server: peers.Server) -> dict[str, int]:
    """What the daemon's index holds after the run: instances, and orders from the MLLP senders."""
    with sqlite3.connect(server.work / "data" / "fabricatord.sqlite") as connection:
        instances = connection.execute("SELECT count(*) FROM instances").fetchone()[0]
        orders = connection.execute("SELECT count(*) FROM orders WHERE accession_number LIKE 'ACC%'").fetchone()[0]
    return {"C-STORE": int(instances), "HL7 ORM": int(orders)}


def _ready(server: peers.Server) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long each server is loaded")
    parser.add_argument("--quick", action="store_true", help="one minute each: a smoke test of the harness")
    parser.add_argument("--no-peer", action="store_true", help="fabricatord only, without the Orthanc run")
    parser.add_argument("--stores", type=int, default=20, help="concurrent C-STORE associations")
    parser.add_argument("--senders", type=int, default=10, help="concurrent MLLP senders")
    parser.add_argument("--hl7-rate", type=float, default=50.0, help="ORMs per second from all senders; 0: closed loop")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    for tool in ("Orthanc",) if not args.no_peer else ():
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/test installs the peers)", file=sys.stderr)
            return 69
    seconds = 60.0 if args.quick else args.minutes * 60
    start_report(seconds_per_server=seconds, store_actors=args.stores, hl7_senders=args.senders, hl7_rate=args.hl7_rate)
    data.ct_study(1)
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fabricatord-soak-") as folder:
        work = Path(folder)
        (work / "fabricatord").mkdir()
        # Room for every actor's association at once (the default, 20, would refuse two of them).
        server = peers.fabricatord(
            work / "fabricatord", '[synth]\nacquisition = "manual"\n', f"max_associations = {args.stores + 8}\n"
        )
        try:
            print(f"fabricatord: {seconds:.0f} s of mixed load …", flush=True)
            hl7_port = int(server.extra["hl7_port"])  # type: ignore[call-overload]
            measured["fabricatord"] = soak(server, hl7_port, seconds, args.stores, args.senders, args.hl7_rate)
            alive, ready = server.process.poll() is None, _ready(server)
        finally:
            server.stop()
        kept = _kept(server)
        errors_logged = sum('"level": "error"' in line for line in (server.work / "server.log").open(errors="replace"))
        if not args.no_peer:
            (work / "orthanc").mkdir()
            worklists = data.worklist_files(PATIENTS) / "WLMSCP"
            known = {"bench": [peers.SCU_AE, "127.0.0.1", 104]}
            pacs = peers.orthanc(work / "orthanc", worklists=worklists, known=known)
            try:
                print(f"orthanc: {seconds:.0f} s of the DICOM load …", flush=True)
                measured["orthanc"] = soak(pacs, 0, seconds, args.stores, 0)
            finally:
                pacs.stop()
    ours = measured["fabricatord"]
    rows = []
    for name, result in measured.items():
        for kind, summary in result["operations"].items():
            peer = measured.get("orthanc", {}).get("operations", {}).get(kind) if name == "fabricatord" else None
            ratio = f"{summary['per_second'] / peer['per_second']:.2f}" if peer and peer["per_second"] else ""
            rows.append([name, kind, summary["count"], round(summary["per_second"], 1), round(summary["p50_ms"], 1),
                         round(summary["p99_ms"], 1), summary["errors"], ratio])  # fmt: skip
    table("Mixed load (errors: anything but success or AA)",
          ["server", "operation", "count", "per s", "p50 ms", "p99 ms", "errors", "÷ orthanc"], rows)  # fmt: skip
    table("Resident memory (MiB) and CPU", ["server", "CPU %", "idle", "after warm-up", "end", "max", "growth %"],
          [[name, round(r["cpu_percent"]), round(r["rss_idle_mib"]), round(r["rss_warm_mib"]),
            round(r["rss_end_mib"]), round(r["rss_max_mib"]), round(r["rss_growth_pct"], 1)]
           for name, r in measured.items()])  # fmt: skip
    told = ours["told_success"]
    table("fabricatord afterwards", ["check", "value"],
          [["instances answered success / indexed", f"{told.get('C-STORE', 0)} / {kept['C-STORE']}"],
           ["orders answered AA / kept", f"{told.get('HL7 ORM', 0)} / {kept['HL7 ORM']}"],
           ["alive and /readyz 200 at the end", alive and ready],
           ["error lines in its log", errors_logged]])  # fmt: skip
    for kind, summary in ours["operations"].items():
        for message in summary["first_errors"]:
            print(f"- {kind} error: {message}")
    RESULTS.update(measured=measured, kept=kept, alive=alive, ready=ready, errors_logged=errors_logged)
    errors = sum(summary["errors"] for summary in ours["operations"].values())
    gate("fabricatord errors (= 0)", float(errors), 0, False)
    gate("fabricatord RSS growth after warm-up, %", ours["rss_growth_pct"], 10, False)
    lost = sum(max(0, told.get(kind, 0) - kept[kind]) for kind in kept)
    gate("acknowledged but not kept (= 0)", float(lost), 0, False)
    theirs = measured.get("orthanc", {}).get("operations", {}).get("C-STORE")
    store = ours["operations"].get("C-STORE")
    if theirs and store and theirs["per_second"]:
        gate("C-STORE ÷ orthanc", store["per_second"] / theirs["per_second"], 1.0, True)
        gate("C-STORE p99 ÷ orthanc's", store["p99_ms"] / theirs["p99_ms"], 1.0, False)
    finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
