"""Fixtures of the integration tests: the daemon started as a user starts it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import free_port, need, run_cli, wait_for_echo, wait_for_port

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@contextmanager
def running_peer(command: list[str], port: int, ae_title: str, timeout: float = 20) -> Iterator[None]:
    """A real peer (DCMTK, Orthanc) started for a test, ready when it answers C-ECHO, always stopped."""
    process = subprocess.Popen(
        [need(command[0]), *command[1:]], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_echo(port, ae_title, timeout=timeout, process=process)  # type: ignore[arg-type]
        yield
    finally:
        process.terminate()
        process.wait(timeout=20)


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A DCMTK command line tool, with TCP_NODELAY as the benchmarks give it, output captured."""
    return subprocess.run([need(tool), *args], env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


@dataclass
class Daemon:
    port: int
    http_port: int
    hl7_port: int
    data_dir: Path
    config: Path
    process: subprocess.Popen[bytes]
    log: Path
    """The daemon's stderr. A file, not a pipe: an unread pipe fills up and stalls the daemon."""
    database_url: str = ""
    """A PostgreSQL URL when the daemon runs on one; empty: SQLite in its data_dir."""

    def query(self, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of its database, whichever it is (`?` placeholders); a change is committed."""
        if not self.database_url:
            with sqlite3.connect(self.data_dir / "fabricatord.sqlite") as connection:
                return list(connection.execute(sql, parameters))
        import psycopg

        with psycopg.connect(self.database_url.replace("postgresql+psycopg", "postgresql")) as connection:
            cursor = connection.execute(sql.replace("?", "%s"), parameters)
            return list(cursor) if cursor.description is not None else []  # an UPDATE returns no rows

    def rows(self) -> dict[str, tuple[str, int]]:
        return {
            uid: (path, size) for uid, path, size in self.query("SELECT sop_instance_uid, path, size FROM instances")
        }

    def files(self) -> set[str]:
        storage = self.data_dir / "storage"
        return {str(p.relative_to(storage)) for p in storage.rglob("*.dcm")}

    def metrics(self) -> str:
        """What Prometheus would scrape now."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value (exact, where the text form may print 1.5e+07), None when absent."""
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def stop(self) -> str:
        """SIGTERM, wait, and return everything the daemon logged."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        return self.log.read_text()


def launch(
    folder: Path,
    name: str = "daemon",
    extra: str = "",
    env: dict[str, str] | None = None,
    dicom_extra: str = "",
    wait: bool = True,
    hl7_extra: str = "",
    synth: str = 'acquisition = "manual"\n',
    database_url: str = "",
) -> Daemon:
    """`fabricatord serve` with its data_dir in `folder`, on free ports, as a user starts it.
    `synth` is the [synth] section: by default the simulated modality waits for
    `fabricatord acquire`, so that the worklist keeps what a test schedules."""
    port, http_port, hl7_port = free_port(), free_port(), free_port()
    config = folder / "fabricatord.toml"
    config.write_text(
        f'[node]\ndata_dir = "data"\n[dicom]\nport = {port}\n{dicom_extra}[http]\nport = {http_port}\n'
        f"[hl7]\nport = {hl7_port}\n{hl7_extra}[synth]\n{synth}{extra}"
    )
    log = folder / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fabricatord", "serve", "--config", str(config)],
            stdout=sink,
            stderr=sink,
            env={
                **os.environ,
                **({"FABRICATORD__NODE__DATABASE": database_url} if database_url else {}),
                **(env or {}),
            },
            cwd=folder,
        )
    daemon = Daemon(port, http_port, hl7_port, folder / "data", config, process, log, database_url)
    try:
        if wait:
            wait_for_echo(port, "FABRICATORD", process=process)  # type: ignore[arg-type]
        else:  # the node may refuse the probe itself; the HTTP port says it is up
            wait_for_port(http_port, process=process)  # type: ignore[arg-type]
    except BaseException:
        halt(daemon)
        raise
    return daemon


def halt(daemon: Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait(timeout=30)


@pytest.fixture
def backend() -> str:
    """The database a test's daemons run on; tests parametrize it (indirect) to run on both."""
    return "sqlite"


@pytest.fixture(name="backend_url")
def _backend_url(backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return ""
    server = request.getfixturevalue("postgres_server")
    return str(server.fresh_database(f"d_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"))


BOTH_BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
"""The daemons of a test so marked run on SQLite, then on a real PostgreSQL."""


@pytest.fixture
def start_daemon(tmp_path: Path, backend_url: str) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(extra: str = "", **options: Any) -> Daemon:
        options.setdefault("database_url", backend_url)
        daemon = launch(tmp_path, f"daemon-{len(started)}", extra, **options)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        halt(daemon)


def generated(tmp_path: Path, modality: str, images: int, syntax: str = "explicit") -> list[Path]:
    out = tmp_path / f"out-{modality}-{syntax}"
    run_cli(
        "generate",
        "--modality",
        modality,
        "--images",
        str(images),
        "--series",
        "1",
        "--out",
        str(out),
        "--transfer-syntax",
        syntax,
        env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "gen")},
    )
    return sorted(out.rglob("*.dcm"))


def storescu(port: int, files: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu; `-xr` or `-xv` make it propose RLE or JPEG 2000 for compressed files."""
    return dcmtk(
        "storescu",
        *options,
        "-aet",
        "MODALITY",
        "-aec",
        "FABRICATORD",
        "127.0.0.1",
        str(port),
        *map(str, files),
        timeout=120,
    )


def findscu(daemon: Daemon, tmp_path: Path, model: str, *keys: str, calling: str = "PACS") -> list[Dataset]:
    """DCMTK findscu (`-P`, `-S` or `-W`) with `-k` keys; the answers it wrote, read back."""
    out = tmp_path / f"find-{len(list(tmp_path.glob('find-*')))}"
    out.mkdir()
    result = dcmtk(
        "findscu",
        model,
        "-aet",
        calling,
        "-aec",
        "FABRICATORD",
        "-X",
        "-od",
        str(out),
        *(arg for key in keys for arg in ("-k", key)),
        "127.0.0.1",
        str(daemon.port),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def orthanc_config(tmp_path: Path, dicom_port: int, http_port: int, **extra: object) -> Path:
    """An Orthanc configuration with its storage under tmp_path; `extra` adds or overrides options."""
    folder = tmp_path / "orthanc"
    folder.mkdir()
    config = tmp_path / "orthanc.json"
    options = {
        "Name": "pacs-under-test",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(folder),
        "IndexDirectory": str(folder),
        "RemoteAccessAllowed": False,
        "Plugins": [],
    }
    config.write_text(json.dumps({**options, **extra}))
    return config


class Orthanc:
    def __init__(self, dicom_port: int, http_port: int) -> None:
        self.dicom_port = dicom_port
        self.http = f"http://127.0.0.1:{http_port}"

    def call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
        request = urllib.request.Request(self.http + path, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[[int, int], Orthanc]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(dicom_port: int, fabricatord_port: int, ae_title: str = "FABRICATORD") -> Orthanc:
        """Orthanc knows us as a modality under `ae_title` (it answers C-FIND only to those it knows)."""
        http_port = free_port()
        config = orthanc_config(
            tmp_path,
            dicom_port,
            http_port,
            AuthenticationEnabled=False,
            DicomModalities={"fabricatord": [ae_title, "127.0.0.1", fabricatord_port]},
        )
        process = subprocess.Popen(
            [need("Orthanc"), str(config)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        processes.append(process)
        wait_for_echo(dicom_port, "ORTHANC", timeout=60, process=process)  # type: ignore[arg-type]
        wait_for_port(http_port, process=process)  # type: ignore[arg-type]
        return Orthanc(dicom_port, http_port)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)
