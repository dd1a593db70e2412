"""The DICOM node against DCMTK, Orthanc and pynetdicom, in one run, on loopback.

    .venv/bin/python benchmarks/dicom.py [--scenario store,find,mwl,move,associate,memory] [--repeat 3]
                                         [--quick] [--shared ../shared/bench] [--json OUT]

Scenarios (each server fresh, TCP_NODELAY=1 for all; DCMTK's storescu sends):
- `store`: C-STORE ingest of 500 CT 512×512 instances and of 2,000 small (10 KB) ones, over one
  association and over four, into fabricatord, DCMTK storescp, Orthanc, pynetdicom's storescp
  app and the shared harness's raw-write pynetdicom receiver (`pyref-store-pdu0`: no fsync, no
  index, the ceiling of a pynetdicom server).
- `find`: study-level C-FIND on an open association (exact Patient ID, name wildcard, date
  range) with 10,000 studies in fabricatord and Orthanc, 500 in dcmqrscp (its limit), and
  fabricatord at 1,000 and 100,000 studies to show how the time grows.
- `mwl`: Modality Worklist C-FIND for one station and day (100 of 10,000 items) against
  wlmscpfs and Orthanc's worklist plugin.
- `move`: C-MOVE of the 500-instance CT study into a DCMTK storescp from fabricatord, Orthanc
  and dcmqrscp, against pynetdicom's best sender (the harness's chunked, TCP_NODELAY `pyscu`).
- `associate`: association set-up, C-ECHO and release, one after another, against DCMTK storescp
  and Orthanc; then 50 clients doing the same at once, 10,000 associations in all, timing each
  connect to its A-ASSOCIATE-AC (a SYN the kernel dropped shows as a one-second stall).
- `memory`: fabricatord's idle RSS, and its peak while receiving one 1 GiB instance.

Figures drift between runs on a shared machine: the ratios of one run are what to compare.
The gates of the issue are printed with each scenario.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, peers
from benchmarks.report import RESULTS, finish, gate, table
from benchmarks.report import start as start_report


@contextmanager
def running(start: Callable[[Path], peers.Server], work: Path) -> Iterator[peers.Server]:
    folder = Path(tempfile.mkdtemp(prefix="server-", dir=work))
    server = start(folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# -- store -----------------------------------------------------------------------------------


def scenario_store(work: Path, repeat: int, quick: bool, shared: Path | None) -> None:
    datasets = {"ct500": data.ct_study(100 if quick else 500), "small2000": data.small_studies(400 if quick else 2000)}
    targets: dict[str, Callable[[Path], peers.Server]] = {
        "fabricatord": peers.fabricatord,
        "dcmtk-storescp": peers.storescp,
        "orthanc": peers.orthanc,
        "pynetdicom-storescp": lambda w: peers.pynetdicom_storescp(w, shared),
    }
    if shared:
        targets["pyref-store-pdu0"] = lambda w: peers.pyref_store(w, shared)
    rates: dict[tuple[str, str, int], float] = {}
    rows = []
    for dataset, files in datasets.items():
        for associations in (1, 4):
            for name, start in targets.items():
                if name == "dcmtk-storescp" and associations > 1:
                    continue  # iterative: one association at a time
                runs = []
                for _ in range(repeat):
                    with running(start, work) as server:
                        seconds = peers.storescu(server.port, server.ae_title, files, associations)
                        stored = server.count(server)
                    if stored != len(files):
                        raise RuntimeError(f"{name} stored {stored} of {len(files)} {dataset}")
                    runs.append(len(files) / seconds)
                rate = statistics.median(runs)
                rates[(name, dataset, associations)] = rate
                rows.append([dataset, associations, name, round(rate, 1)])
    reference = "pyref-store-pdu0"
    for row in rows:
        ref = rates.get((reference, row[0], row[1]))
        row.append(round(row[3] / ref, 2) if ref else "-")
    table("C-STORE ingest (instances/s, median)", ["data", "assocs", "server", "inst/s", f"÷ {reference}"], rows)
    RESULTS["store"] = [dict(zip(["data", "assocs", "server", "rate", "ratio_pyref"], r, strict=True)) for r in rows]
    for dataset in datasets:
        for associations in (1, 4):
            ours = rates.get(("fabricatord", dataset, associations))
            ref = rates.get((reference, dataset, associations))
            orthanc = rates.get(("orthanc", dataset, associations))
            # Orthanc fsyncs every file and commits its index per instance: the durability we keep.
            gate(
                f"store {dataset} {associations} assoc ÷ orthanc",
                ours / orthanc if ours and orthanc else None,
                1.0,
                True,
            )
            for peer, other in (
                ("pyref", ref),
                ("dcmtk-storescp (no fsync, no index)", rates.get(("dcmtk-storescp", dataset, associations))),
            ):
                if ours and other:
                    print(f"  ratio to {peer}: {ours / other:.2f}")


# -- associate -------------------------------------------------------------------------------

VERIFICATION = "1.2.840.10008.1.1"


def _association_pdus(ae_title: str) -> tuple[bytes, bytes, bytes]:
    """The A-ASSOCIATE-RQ, the C-ECHO-RQ and the A-RELEASE-RQ every cycle sends, made once."""
    from fabricatord.dicom.ul import pdu
    from fabricatord.dicom.ul.dimse import NO_DATASET, encode_command

    request = pdu.AssociateRequest(
        ae_title.encode().ljust(16),
        peers.SCU_AE.encode().ljust(16),
        pdu.APPLICATION_CONTEXT,
        [pdu.PresentationContext(1, VERIFICATION, ("1.2.840.10008.1.2",))],
        pdu.UserInformation(max_length=16384, implementation_class_uid="1.2.3.4"),
    )
    command = encode_command(
        {"AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030, "MessageID": 1, "CommandDataSetType": NO_DATASET}
    )
    echo = pdu.p_data_header(1, 0x03, len(command)) + command
    return pdu.encode(request), echo, pdu.encode(pdu.ReleaseRequest())


def _read_pdu(sock: socket.socket) -> int:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    length = int.from_bytes(header[2:6], "big")
    while length:
        length -= len(sock.recv(min(length, 65536)))
    return header[0]


def _cycle(port: int, pdus: tuple[bytes, bytes, bytes]) -> tuple[float, float]:
    """One association: seconds from connect to the A-ASSOCIATE-AC, and for the whole cycle."""
    request, echo, release = pdus
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        if _read_pdu(sock) != 0x02:
            raise RuntimeError("the association was not accepted")
        accepted = time.perf_counter()
        sock.sendall(echo)
        if _read_pdu(sock) != 0x04:
            raise RuntimeError("no C-ECHO response")
        sock.sendall(release)
        if _read_pdu(sock) != 0x06:
            raise RuntimeError("no A-RELEASE-RP")
    return accepted - started, time.perf_counter() - started


def _storm(port: int, pdus: tuple[bytes, bytes, bytes], clients: int, total: int) -> list[float]:
    """`clients` threads cycling at once until `total` associations; each connect-to-AC time."""
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    left = [total]

    def client() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                accepted, _ = _cycle(port, pdus)
            except (OSError, RuntimeError) as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                times.append(accepted)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        print(f"  {len(errors)} associations failed, e.g. {errors[0]}")
    return times


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def scenario_associate(work: Path, quick: bool) -> None:
    sequential, clients, total = (100, 50, 1000) if quick else (500, 50, 10000)
    targets: dict[str, Callable[[Path], peers.Server]] = {
        "fabricatord": lambda w: peers.fabricatord(w, extra="max_associations = 64\n"),
        "dcmtk-storescp": peers.storescp,
        "orthanc": peers.orthanc,
    }
    rows, storm_rows, rates = [], [], {}
    for name, start in targets.items():
        with running(start, work) as server:
            pdus = _association_pdus(server.ae_title)
            started = time.perf_counter()
            cycles = [_cycle(server.port, pdus) for _ in range(sequential)]
            rates[name] = sequential / (time.perf_counter() - started)
            setup = [accepted * 1000 for accepted, _ in cycles]
            rows.append(
                [name, round(rates[name], 1), round(statistics.median(setup), 2), round(_percentile(setup, 0.99), 2)]
            )
            storm = [t * 1000 for t in _storm(server.port, pdus, clients, total)]
            if storm:
                storm_rows.append(
                    [name, len(storm), round(statistics.median(storm), 1), round(_percentile(storm, 0.99), 1),
                     round(_percentile(storm, 0.999), 1), round(max(storm), 1), sum(t >= 1000 for t in storm)]
                )  # fmt: skip
    table(
        f"association, C-ECHO, release: {sequential} in a row",
        ["server", "assoc/s", "connect→AC p50 ms", "p99 ms"],
        rows,
    )
    table(
        f"{clients} clients at once, {total} associations",
        ["server", "done", "connect→AC p50 ms", "p99 ms", "p99.9 ms", "max ms", "≥ 1 s"],
        storm_rows,
    )
    RESULTS["associate"] = {"sequential": rows, "storm": storm_rows}
    ours = rates.get("fabricatord")
    dcmtk = rates.get("dcmtk-storescp")
    gate("association set-up ÷ dcmtk-storescp", ours / dcmtk if ours and dcmtk else None, 1.0, True)
    mine = next((row for row in storm_rows if row[0] == "fabricatord"), None)
    gate("storm p99.9 connect→AC ms", mine[4] if mine else None, 100, False)
    gate("storm connects ≥ 1 s", mine[6] if mine else None, 0, False)


# -- find ------------------------------------------------------------------------------------


def _c_find(port: int, ae_title: str, identifiers: list[Any], sop_class: str, times: int) -> list[tuple[float, int]]:
    """(median seconds, matches) per identifier, all on one association."""
    from pynetdicom import AE

    ae = AE(ae_title=peers.SCU_AE)
    ae.maximum_pdu_size = 0
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {ae_title}")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the servers have it
    results = []
    try:
        for identifier in identifiers:
            timings, matches = [], 0
            for _ in range(times):
                started = time.perf_counter()
                matches = sum(
                    1 for status, found in assoc.send_c_find(identifier, sop_class) if status and found is not None
                )
                timings.append(time.perf_counter() - started)
            results.append((statistics.median(timings), matches))
    finally:
        assoc.release()
    return results


def _study_identifiers(count: int) -> tuple[list[str], list[Any], list[int]]:
    from pydicom.dataset import Dataset

    names, identifiers, expected = [], [], []
    for name, (keys, matches) in data.find_queries(count).items():
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID", "AccessionNumber"):
            setattr(ds, keyword, keys.get(keyword, ""))
        names.append(name)
        identifiers.append(ds)
        expected.append(matches)
    return names, identifiers, expected


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def scenario_find(work: Path, quick: bool) -> None:
    count = 2000 if quick else 10000
    times = 5 if quick else 15
    measured: dict[tuple[str, int], list[tuple[float, int]]] = {}

    def fabricatord_with(studies: int) -> Callable[[Path], peers.Server]:
        def start(folder: Path) -> peers.Server:
            data.index_studies(f"sqlite:///{folder / 'data' / 'fabricatord.sqlite'}", studies)
            from fabricatord.db import dispose_all

            dispose_all()
            return peers.fabricatord(folder)

        return start

    sizes = [1000, count] + ([] if quick else [100000])
    for studies in sizes:
        names, identifiers, expected = _study_identifiers(studies)
        with running(fabricatord_with(studies), work) as server:
            measured[("fabricatord", studies)] = _c_find(
                server.port, "FABRICATORD", identifiers, STUDY_ROOT_FIND, times
            )
    files = data.small_studies(count)
    with running(peers.orthanc, work) as server:
        peers.storescu(server.port, server.ae_title, files, 4)
        names, identifiers, expected = _study_identifiers(count)
        measured[("orthanc", count)] = _c_find(server.port, "ORTHANC", identifiers, STUDY_ROOT_FIND, times)
    with running(lambda w: peers.dcmqrscp(w, 0), work) as server:
        peers.storescu(server.port, server.ae_title, files[:500], 1)
        names, identifiers, _ = _study_identifiers(500)
        measured[("dcmqrscp", 500)] = _c_find(server.port, "QRSCP", identifiers, STUDY_ROOT_FIND, times)
    rows = []
    for (name, studies), results in measured.items():
        names, _, expected = _study_identifiers(studies)
        for query, (seconds, matches), want in zip(names, results, expected, strict=True):
            flag = "" if matches == want else f" (expected {want})"
            rows.append([name, studies, query, f"{matches}{flag}", round(seconds * 1000, 1)])
    table("Study C-FIND on an open association (median ms)", ["server", "studies", "query", "matches", "ms"], rows)
    RESULTS["find"] = [dict(zip(["server", "studies", "query", "matches", "ms"], r, strict=True)) for r in rows]
    ours, theirs = measured[("fabricatord", count)], measured[("orthanc", count)]
    limits = {"PatientID": 0.5, "name wildcard": 1.0, "date range": 1.0}
    for (query, limit), (mine, _), (other, _) in zip(limits.items(), ours, theirs, strict=True):
        gate(f"find {query} ÷ orthanc at {count}", mine / other, limit, False)
    if not quick:
        small, large = measured[("fabricatord", 1000)], measured[("fabricatord", 100000)]
        for query, (low, _), (high, _) in zip(limits, small, large, strict=True):
            gate(f"find {query} growth 1k→100k", high / low, 2.0, False)


# -- mwl -------------------------------------------------------------------------------------


def _worklist_identifier() -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "RequestedProcedureID", "RequestedProcedureDescription", "StudyInstanceUID",
                    "ReferringPhysicianName"):  # fmt: skip
        setattr(ds, keyword, "")
    step = Dataset()
    step.ScheduledStationAETitle = data.WORKLIST_STATION
    step.ScheduledProcedureStepStartDate = data.WORKLIST_DAY
    for keyword in ("ScheduledProcedureStepStartTime", "Modality", "ScheduledProcedureStepID",
                    "ScheduledProcedureStepDescription", "ScheduledStationName", "ScheduledProcedureStepLocation",
                    "ScheduledPerformingPhysicianName"):  # fmt: skip
        setattr(step, keyword, "")
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def scenario_mwl(work: Path, quick: bool) -> None:
    count = 2000 if quick else 10000
    times = 5 if quick else 10
    folder = data.worklist_files(count)
    expected = sum(
        1
        for i in range(count)
        if data.worklist_item(i)["station"] == data.WORKLIST_STATION
        and data.worklist_item(i)["date"] == data.WORKLIST_DAY
    )

    def fabricatord_with(server_folder: Path) -> peers.Server:
        data.index_worklist(f"sqlite:///{server_folder / 'data' / 'fabricatord.sqlite'}", count)
        from fabricatord.db import dispose_all

        dispose_all()
        return peers.fabricatord(server_folder)

    targets: dict[str, Callable[[Path], peers.Server]] = {
        "fabricatord": fabricatord_with,
        "wlmscpfs": lambda w: peers.wlmscpfs(w, folder),
        "orthanc": lambda w: peers.orthanc(w, worklists=folder / "WLMSCP"),
    }
    measured: dict[str, tuple[float, int]] = {}
    for name, start in targets.items():
        with running(start, work) as server:
            measured[name] = _c_find(server.port, server.ae_title, [_worklist_identifier()], data.MWL_FIND, times)[0]
    rows = [[name, count, f"{m}" + ("" if m == expected else f" (expected {expected})"), round(s * 1000, 1)]
            for name, (s, m) in measured.items()]  # fmt: skip
    table("Modality Worklist C-FIND, one station and day (median ms)", ["server", "items", "matches", "ms"], rows)
    RESULTS["mwl"] = [dict(zip(["server", "items", "matches", "ms"], r, strict=True)) for r in rows]
    for peer in ("orthanc", "wlmscpfs"):
        gate(f"mwl ÷ {peer} at {count}", measured["fabricatord"][0] / measured[peer][0], 0.25, False)


# -- move ------------------------------------------------------------------------------------


def _c_move(server: peers.Server, study_uid: str) -> float:
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    move = "1.2.840.10008.5.1.4.1.2.2.2"
    ae = AE(ae_title=peers.SCU_AE)
    ae.add_requested_context(move)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {server.name}")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    started = time.perf_counter()
    final = None
    for status, _ in assoc.send_c_move(identifier, peers.DEST_AE, move):
        final = status
    seconds = time.perf_counter() - started
    assoc.release()
    if final is None or final.Status != 0:
        raise RuntimeError(f"{server.name}: C-MOVE ended with {final}")
    return seconds


def scenario_move(work: Path, repeat: int, quick: bool, shared: Path | None) -> None:
    from pydicom import dcmread

    files = data.ct_study(100 if quick else 500)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rates: dict[str, float] = {}
    with running(peers.destination, work) as dest:
        peer_entry = f'[[peers]]\nname = "dest"\nae_title = "{peers.DEST_AE}"\nport = {dest.port}\n'
        sources: dict[str, Callable[[Path], peers.Server]] = {
            "fabricatord": lambda w: peers.fabricatord(w, peers=peer_entry),
            "orthanc": lambda w: peers.orthanc(w, destination_port=dest.port),
            "dcmqrscp": lambda w: peers.dcmqrscp(w, dest.port),
        }
        for name, start in sources.items():
            with running(start, work) as server:
                peers.storescu(server.port, server.ae_title, files, 1)
                runs = []
                for _ in range(repeat):
                    for old in (dest.work / "store").iterdir():  # a resent instance keeps its file name
                        old.unlink()
                    seconds = _c_move(server, study_uid)
                    received = dest.count(dest)
                    if received != len(files):
                        raise RuntimeError(f"{name}: the destination received {received} of {len(files)} files")
                    runs.append(len(files) / seconds)
            rates[name] = statistics.median(runs)
        if shared:
            listing = work / "files.txt"
            listing.write_text("\n".join(map(str, files)))
            runs = []
            for _ in range(repeat):
                out = subprocess.run(
                    [peers.PYTHON, str(shared / "pyscu.py"), "--port", str(dest.port), "--aec", peers.DEST_AE,
                     "--files-from", str(listing), "--max-pdu", "0"],
                    capture_output=True, text=True, check=True, env=peers.ENV,
                )  # fmt: skip
                runs.append(len(files) / json.loads(out.stdout.strip().splitlines()[-1])["total_s"])
            rates["pynetdicom best sender (pyscu)"] = statistics.median(runs)
    rows = [[name, len(files), round(rate, 1)] for name, rate in rates.items()]
    table("C-MOVE of one CT study into DCMTK storescp (instances/s, median)", ["source", "instances", "inst/s"], rows)
    RESULTS["move"] = rates
    best = rates.get("pynetdicom best sender (pyscu)")
    gate("move ÷ pynetdicom best sender", rates["fabricatord"] / best if best else None, 0.9, True)
    gate("move ÷ orthanc", rates["fabricatord"] / rates["orthanc"] if rates.get("orthanc") else None, 0.8, True)
    for peer in ("orthanc", "dcmqrscp"):
        print(f"  ratio to {peer}: {rates['fabricatord'] / rates[peer]:.2f}")


# -- memory ----------------------------------------------------------------------------------


def scenario_memory(work: Path, quick: bool) -> None:
    big = data.big_instance(0.25 if quick else 1.0)
    with running(peers.fabricatord, work) as server:
        time.sleep(2)
        idle = peers.rss(server.process.pid)
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, peers.rss(server.process.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        seconds = peers.storescu(server.port, server.ae_title, [big], 1)
        done.set()
        sampler.join()
        stored = server.count(server)
    rows = [
        ["idle", round(idle / 2**20, 1)],
        [f"peak receiving {big.stat().st_size / 2**30:.2f} GiB", round(peak / 2**20, 1)],
    ]
    table(f"fabricatord memory (MiB RSS; the instance took {seconds:.1f} s, stored: {stored})", ["when", "MiB"], rows)
    RESULTS["memory"] = {
        "idle_mib": idle / 2**20,
        "peak_mib": peak / 2**20,
        "instance_bytes": big.stat().st_size,
    }
    gate("idle RSS MiB", idle / 2**20, 80, False)
    gate("RSS growth receiving the big instance, MiB", (peak - idle) / 2**20, 100, False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="store,find,mwl,move,associate,memory")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small data, one pass: a smoke test of the harness")
    parser.add_argument("--shared", default=str(peers.ROOT.parent / "shared" / "bench"),
                        help="the shared harness, for its pynetdicom reference receiver and sender")  # fmt: skip
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    shared = Path(args.shared) if (Path(args.shared) / "pyref_scp.py").exists() else None
    for tool in ("storescu", "storescp", "dcmqrscp", "wlmscpfs", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/test installs the peers)", file=sys.stderr)
            return 69
    repeat = 1 if args.quick else args.repeat
    start_report(
        shared_harness=str(shared) if shared else None,
    )
    if shared is None:
        print("no shared harness: the pynetdicom reference receiver and sender are not measured")
    with tempfile.TemporaryDirectory(prefix="fabricatord-bench-") as folder:
        work = Path(folder)
        for scenario in args.scenario.split(","):
            print(f"\n## {scenario}", flush=True)
            if scenario == "store":
                scenario_store(work, repeat, args.quick, shared)
            elif scenario == "find":
                scenario_find(work, args.quick)
            elif scenario == "mwl":
                scenario_mwl(work, args.quick)
            elif scenario == "move":
                scenario_move(work, repeat, args.quick, shared)
            elif scenario == "associate":
                scenario_associate(work, args.quick)
            elif scenario == "memory":
                scenario_memory(work, args.quick)
            else:
                print(f"unknown scenario {scenario!r}", file=sys.stderr)
                return 64
    finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
