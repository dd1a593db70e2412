"""echo, send and generate --send against real DCMTK peers started here."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, need, run_cli, wait_for_echo
from tests.integration.conftest import orthanc_config, running_peer

pytestmark = pytest.mark.integration
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Peer:
    ae_title: str
    port: int
    folder: Path

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Peer]:
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    with running_peer(["storescp", "-aet", "STORESCP", "-od", str(folder), "--accept-all", str(port)], port, "ANY"):
        yield Peer("STORESCP", port, folder)


@pytest.fixture
def dcmqrscp(tmp_path: Path) -> Iterator[Peer]:
    """An archive that stores and answers C-FIND, so that a delivery can be confirmed."""
    folder = tmp_path / "archive"
    folder.mkdir()
    port = free_port()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 65536\nMaxAssociations = 4\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {folder} RW (500, 1024mb) ANY\nAETable END\n"
    )
    with running_peer(["dcmqrscp", "-c", str(config), "--disable-host-lookup"], port, "QRSCP"):
        yield Peer("QRSCP", port, folder)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Peer]:
    """A real PACS: Orthanc with its own storage, answering C-FIND from any AE."""
    port = free_port()
    config = orthanc_config(
        tmp_path,
        port,
        free_port(),
        HttpServerEnabled=False,
        DicomAlwaysAllowFind=True,
        DicomAlwaysAllowStore=True,
        DicomAlwaysAllowEcho=True,
    )
    with running_peer(["Orthanc", str(config)], port, "ORTHANC", timeout=60):
        yield Peer("ORTHANC", port, tmp_path / "orthanc")


def config_with_peer(tmp_path: Path, peer: Peer) -> Path:
    path = tmp_path / "fabricatord.toml"
    path.write_text(
        f'[node]\ndata_dir = "data"\n\n[[peers]]\nname = "archive"\nae_title = "{peer.ae_title}"\n'
        f'host = "127.0.0.1"\nport = {peer.port}\n'
    )
    return path


def test_echo_by_name_and_address(tmp_path: Path, storescp: Peer) -> None:
    config = config_with_peer(tmp_path, storescp)
    assert "success" in run_cli("echo", "archive", "--config", str(config)).stdout
    assert "success" in run_cli("echo", storescp.address, "--config", str(config)).stdout
    unknown = run_cli("echo", "nobody", "--config", str(config), check=False)
    assert unknown.returncode == 64 and "unknown peer 'nobody'" in unknown.stderr
    closed = run_cli("echo", f"NOBODY@127.0.0.1:{free_port()}", "--config", str(config), check=False)
    assert closed.returncode == 69 and "failed: cannot connect: connection refused" in closed.stderr


def test_send_files_of_several_classes_over_one_association(tmp_path: Path, storescp: Peer) -> None:
    config = config_with_peer(tmp_path, storescp)
    out = tmp_path / "out"
    for modality, syntax in (("CT", "explicit"), ("US", "rle"), ("SC", "jpegls-lossless")):
        run_cli(
            "generate",
            "--config",
            str(config),
            "--modality",
            modality,
            "--images",
            "2",
            "--out",
            str(out),
            "--transfer-syntax",
            syntax,
        )
    sent = run_cli("send", "archive", str(out), "--config", str(config)).stdout
    assert "6 of 6" in sent
    received = sorted(storescp.folder.iterdir())
    assert len(received) == 6
    originals = {p.read_bytes()[-2000:] for p in out.rglob("*.dcm")}
    assert {p.read_bytes()[-2000:] for p in received} == originals  # sent as stored, not re-encoded


def test_generate_send_confirms_by_cfind(tmp_path: Path, dcmqrscp: Peer) -> None:
    config = config_with_peer(tmp_path, dcmqrscp)
    out = run_cli(
        "generate",
        "--config",
        str(config),
        "--modality",
        "MR",
        "--images",
        "3",
        "--send",
        "archive",
    ).stdout
    study_uid = re.search(r"Study Instance UID:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    assert f"Confirmed by C-FIND at QRSCP: 9 instances of {study_uid}" in out
    # A stored study sent again by its UID, to the same archive: confirmed again.
    again = run_cli("send", "archive", study_uid, "--config", str(config)).stdout
    assert f"Study {study_uid}: accession 2026" in again and "9 instances in 3 series" in again
    assert "Confirmed by C-FIND at QRSCP: 9 instances" in again


def test_generate_send_confirms_at_orthanc(tmp_path: Path, orthanc: Peer) -> None:
    config = config_with_peer(tmp_path, orthanc)
    out = run_cli("generate", "--config", str(config), "--modality", "CT", "--images", "25", "--send", "archive").stdout
    assert "Sent to ORTHANC@127.0.0.1" in out and "25 of 25 (" in out and "0 with warnings" in out
    assert "Confirmed by C-FIND at ORTHANC: 25 instances" in out


def test_send_of_an_unknown_study_uid_says_so(tmp_path: Path, storescp: Peer) -> None:
    config = config_with_peer(tmp_path, storescp)
    result = run_cli("send", "archive", "1.2.3.4", "--config", str(config), check=False)
    assert result.returncode == 65 and "no stored study" in result.stderr


def test_a_peer_that_aborts_every_store_fails_each_file_without_hanging(tmp_path: Path) -> None:
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    # DCMTK's storescp --abort-after: abort the association after each C-STORE-RQ, never answer.
    process = subprocess.Popen(
        [need("storescp"), "--abort-after", "-od", str(folder), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_echo(port, process=process)
        out = tmp_path / "out"
        env = {"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "data"), "FABRICATORD__DICOM__DIMSE_TIMEOUT": "3s"}
        run_cli("generate", "--modality", "SC", "--images", "2", "--out", str(out), env=env)
        result = run_cli("send", f"ANY@127.0.0.1:{port}", str(out), check=False, timeout=120, env=env)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert result.returncode == 69
    assert "0 of 2" in result.stdout
    assert result.stdout.count("no response (timeout or abort)") == 2
