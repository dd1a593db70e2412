"""The servers a DICOM benchmark starts: fabricatord and the peers it is measured against.

Every server runs in a fresh folder under the run's work directory, on a free loopback port,
with TCP_NODELAY=1 in its environment (DCMTK and Orthanc read it), and is stopped with its
whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "TCP_NODELAY": "1"}
SCU_AE = "BENCHSCU"
DEST_AE = "DEST"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def echo(port: int, ae_title: str) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


@dataclass
class Server:
    name: str
    ae_title: str
    port: int
    work: Path
    process: subprocess.Popen[bytes]
    count: Callable[[Server], int]
    http_port: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def _launch(
    name: str,
    ae_title: str,
    command: list[str],
    work: Path,
    port: int,
    count: Callable[[Server], int],
    http_port: int = 0,
    timeout: float = 90,
) -> Server:
    log = (work / "server.log").open("wb")
    process = subprocess.Popen(command, cwd=work, env=ENV, stdout=log, stderr=log, start_new_session=True)
    server = Server(name, ae_title, port, work, process, count, http_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {work / 'server.log'}")
        try:
            if echo(port, ae_title):
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{name} did not answer C-ECHO within {timeout} s")


def _files(folder: Path) -> Callable[[Server], int]:
    return lambda _server: sum(1 for p in folder.rglob("*") if p.is_file())


def _fabricatord_rows(server: Server) -> int:
    with sqlite3.connect(server.work / "data" / "fabricatord.sqlite") as connection:
        return int(connection.execute("SELECT count(*) FROM instances").fetchone()[0])


def _orthanc_rows(server: Server) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/statistics", timeout=60) as response:
        return int(json.loads(response.read())["CountInstances"])


def fabricatord(work: Path, peers: str = "", extra: str = "", hl7: str = "") -> Server:
    """`fabricatord serve` on free ports; `extra` goes into [dicom], `hl7` into [hl7]; the MLLP
    port is `extra["hl7_port"]` of the returned server."""
    port, http_port, hl7_port = free_port(), free_port(), free_port()
    (work / "fabricatord.toml").write_text(
        f'[node]\ndata_dir = "data"\n[log]\nlevel = "warning"\n[dicom]\nport = {port}\n'
        f"max_find_results = 1000000\n{extra}[http]\nport = {http_port}\n[hl7]\nport = {hl7_port}\n{hl7}{peers}"
    )
    command = [PYTHON, "-m", "fabricatord", "serve", "--config", str(work / "fabricatord.toml")]
    server = _launch("fabricatord", "FABRICATORD", command, work, port, _fabricatord_rows, http_port)
    server.extra["hl7_port"] = hl7_port
    return server


def storescp(work: Path) -> Server:
    port = free_port()
    (work / "store").mkdir()
    command = ["storescp", "-aet", "STORESCP", "-od", str(work / "store"), str(port)]
    return _launch("dcmtk-storescp", "STORESCP", command, work, port, _files(work / "store"))


def pynetdicom_storescp(work: Path, shared: Path | None) -> Server:
    """pynetdicom's own storescp app, with TCP_NODELAY through the shared harness's launcher."""
    port = free_port()
    (work / "store").mkdir()
    app = ["-m", "pynetdicom", "storescp", str(port), "-aet", "STORESCP", "-od", str(work / "store"), "-q"]
    launcher = [str(shared / "pynodelay.py")] if shared else []
    return _launch("pynetdicom-storescp", "STORESCP", [PYTHON, *launcher, *app], work, port, _files(work / "store"))


def pyref_store(work: Path, shared: Path) -> Server:
    """The shared harness's raw-write receiver with unlimited PDUs: the pynetdicom ceiling."""
    port = free_port()
    command = [
        PYTHON,
        str(shared / "pyref_scp.py"),
        "store",
        "--port",
        str(port),
        "--ae",
        "PYREF",
        "--out",
        str(work / "store"),
        "--max-pdu",
        "0",
    ]
    return _launch("pyref-store-pdu0", "PYREF", command, work, port, _files(work / "store"))


ORTHANC_JSON = {
    "Name": "bench-orthanc",
    "StorageCompression": False,
    "HttpServerEnabled": True,
    "RemoteAccessAllowed": False,
    "AuthenticationEnabled": False,
    "DicomServerEnabled": True,
    "DicomAet": "ORTHANC",
    "DicomCheckCalledAet": False,
    "DicomAlwaysAllowEcho": True,
    "DicomAlwaysAllowStore": True,
    "DicomAlwaysAllowFind": True,
    "DicomAlwaysAllowMove": True,
    "DicomAlwaysAllowFindWorklist": True,
    "DicomThreadsCount": 4,
    "LimitFindResults": 0,
    "LimitFindInstances": 0,
    "StableAge": 60,
}


def orthanc(
    work: Path, destination_port: int = 0, worklists: Path | None = None, known: dict[str, list[object]] | None = None
) -> Server:
    """`known`: more DicomModalities (Orthanc answers C-FIND only to the modalities it knows)."""
    port, http_port = free_port(), free_port()
    config = {
        **ORTHANC_JSON,
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "HttpPort": http_port,
        "DicomPort": port,
        "DicomModalities": {"dest": [DEST_AE, "127.0.0.1", destination_port or 104], **(known or {})},
        "Plugins": ["/usr/share/orthanc/plugins/libModalityWorklists.so"] if worklists else [],
        "Worklists": {"Enable": worklists is not None, "Database": str(worklists or work)},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    return _launch("orthanc", "ORTHANC", ["Orthanc", str(work / "orthanc.json")], work, port, _orthanc_rows, http_port)


def dcmqrscp(work: Path, destination_port: int) -> Server:
    port = free_port()
    (work / "db").mkdir()
    (work / "dcmqrscp.cfg").write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\ndest = ({DEST_AE}, 127.0.0.1, {destination_port or 104})\n"
        f"scu = ({SCU_AE}, 127.0.0.1, 104)\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {work / 'db'} RW (500, 4096mb) ANY\nAETable END\n"
    )
    command = ["dcmqrscp", "-c", str(work / "dcmqrscp.cfg"), str(port)]
    return _launch("dcmqrscp", "QRSCP", command, work, port, _files(work / "db"))


def wlmscpfs(work: Path, database: Path) -> Server:
    port = free_port()
    command = ["wlmscpfs", "-dfp", str(database), str(port)]
    return _launch("wlmscpfs", "WLMSCP", command, work, port, lambda _s: 0)


def destination(work: Path) -> Server:
    """A DCMTK storescp as C-MOVE destination."""
    port = free_port()
    (work / "store").mkdir()
    command = ["storescp", "-aet", DEST_AE, "-od", str(work / "store"), str(port)]
    return _launch("destination", DEST_AE, command, work, port, _files(work / "store"))


def storescu(port: int, ae_title: str, files: list[Path], associations: int = 1) -> float:
    """Send `files` over `associations` concurrent DCMTK storescu processes; the wall time."""
    shares = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", SCU_AE, "-aec", ae_title, "127.0.0.1", str(port), *map(str, share)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for share in shares
    ]
    for sender in senders:
        sender.wait()
    return time.perf_counter() - started
