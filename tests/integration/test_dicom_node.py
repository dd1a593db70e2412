"""`fabricatord serve` as a DICOM node, driven over loopback by DCMTK and pynetdicom clients."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import free_port, need, run_cli, wait_for_echo

pytestmark = pytest.mark.integration
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Daemon:
    port: int
    http_port: int
    data_dir: Path
    config: Path
    process: subprocess.Popen[str]

    def rows(self) -> dict[str, tuple[str, int]]:
        with sqlite3.connect(self.data_dir / "fabricatord.sqlite") as connection:
            return {
                uid: (path, size)
                for uid, path, size in connection.execute("SELECT sop_instance_uid, path, size FROM instances")
            }

    def files(self) -> set[str]:
        storage = self.data_dir / "storage"
        return {str(p.relative_to(storage)) for p in storage.rglob("*.dcm")}

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=30)
        return stderr


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(extra: str = "", env: dict[str, str] | None = None) -> Daemon:
        port, http_port = free_port(), free_port()
        config = tmp_path / "fabricatord.toml"
        config.write_text(f'[node]\ndata_dir = "data"\n[dicom]\nport = {port}\n[http]\nport = {http_port}\n{extra}')
        process = subprocess.Popen(
            [sys.executable, "-m", "fabricatord", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        daemon = Daemon(port, http_port, tmp_path / "data", config, process)
        started.append(daemon)
        wait_for_echo(port, "FABRICATORD", process=process)  # type: ignore[arg-type]
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.communicate(timeout=30)


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
    return subprocess.run(
        [
            need("storescu"),
            *options,
            "-aet",
            "MODALITY",
            "-aec",
            "FABRICATORD",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_echo_and_called_ae_check(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    echoscu = need("echoscu")
    ok = subprocess.run(
        [echoscu, "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run(
        [echoscu, "-aec", "SOMEONE_ELSE", "127.0.0.1", str(daemon.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
    assert "success" in run_cli("echo", f"FABRICATORD@127.0.0.1:{daemon.port}").stdout


def test_storescu_stores_and_indexes_in_every_transfer_syntax(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    groups = [
        ([*generated(tmp_path, "CT", 5), *generated(tmp_path, "MR", 2, "implicit")], ()),
        (generated(tmp_path, "US", 2, "rle"), ("-xr",)),
        (generated(tmp_path, "SC", 1, "jpeg2000-lossless"), ("-xv",)),
    ]
    for files, options in groups:
        result = storescu(daemon.port, files, *options)
        assert result.returncode == 0, result.stderr
    sent = [f for files, _ in groups for f in files]
    rows = daemon.rows()
    assert len(rows) == len(sent) == 10
    assert {path for path, _ in rows.values()} == daemon.files()
    for original in sent:
        source = dcmread(original)
        path, size = rows[source.SOPInstanceUID]
        stored = dcmread(daemon.data_dir / "storage" / path)
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert stored.PixelData == source.PixelData and stored.PatientName == source.PatientName
        assert stored.preamble == bytes(128) and (daemon.data_dir / "storage" / path).stat().st_size == size
    # The same instances again: success, nothing new.
    for files, options in groups:
        assert storescu(daemon.port, files, *options).returncode == 0
    assert len(daemon.rows()) == 10
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'fabricatord_dimse_operations_total{peer="other",service="C-STORE",status="success"} 20.0' in text
    assert 'fabricatord_instances_stored_total{outcome="identical",source="received"} 10.0' in text


def test_a_sop_instance_uid_that_is_not_a_uid_is_refused(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    from pydicom import config
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    daemon = start_daemon()
    ds = dcmread(generated(tmp_path, "CT", 1)[0])
    # A peer's bytes are not validated on the way in; neither is what this client sends.
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    ds.SOPInstanceUID = "1.2.3.4.evil/../.."  # what a naive server would turn into a path
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xA900 and "not a UID" in status.ErrorComment
    assert daemon.rows() == {} and daemon.files() == set()
    assert list((daemon.data_dir / "tmp").iterdir()) == []
    # The node keeps serving everyone else.
    assert storescu(daemon.port, generated(tmp_path, "SC", 1)).returncode == 0


def test_kill_during_store_loses_nothing_acknowledged(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    files = generated(tmp_path, "CT", 3)
    crashing = start_daemon(env={"FABRICATORD_FAULTPOINT": "store.after_rename:kill"})
    result = storescu(crashing.port, files)
    assert result.returncode != 0
    crashing.process.communicate(timeout=30)
    assert crashing.process.returncode == -signal.SIGKILL
    assert crashing.rows() == {}  # the kill came after the rename, before the index commit
    daemon = start_daemon()  # recovery at start settles what the kill left
    assert daemon.files() == set() and list((daemon.data_dir / "tmp").iterdir()) == []
    assert storescu(daemon.port, files).returncode == 0
    assert len(daemon.rows()) == 3 and {p for p, _ in daemon.rows().values()} == daemon.files()
    assert '"event": "fabricatord stopped"' in daemon.stop()


def test_require_known_ae_rejects_strangers(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(
        '\n[[peers]]\nname = "ct"\nae_title = "MODALITY"\nport = 104\n',
        env={"FABRICATORD__DICOM__REQUIRE_KNOWN_AE": "true"},
    )
    files = generated(tmp_path, "SC", 1)
    assert storescu(daemon.port, files).returncode == 0
    stranger = subprocess.run(
        [need("storescu"), "-aet", "STRANGER", "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port), str(files[0])],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
