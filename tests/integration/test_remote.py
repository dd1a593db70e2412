"""The client side of a PACS tool: `find` across several PACS at once and `move` between them,
against a real Orthanc, DCMTK's dcmqrscp and our own node; and the production guard on every
command that sends or brings data."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli
from tests.integration.conftest import Daemon, dcmtk, orthanc_config, running_peer

pytestmark = pytest.mark.integration


@dataclass
class Archive:
    name: str
    ae_title: str
    port: int

    def entry(self, environment: str = "test") -> str:
        return (
            f'[[peers]]\nname = "{self.name}"\nae_title = "{self.ae_title}"\nport = {self.port}\n'
            f'environment = "{environment}"\n'
        )


@pytest.fixture
def archives(tmp_path: Path) -> Iterator[Callable[[int], tuple[Archive, Archive]]]:
    """Orthanc and dcmqrscp, each knowing our node (FABRICATORD on `port`) as a move destination."""
    started: list[Iterator[None]] = []

    def start(port: int) -> tuple[Archive, Archive]:
        orthanc_port, qr_port = free_port(), free_port()
        config = orthanc_config(
            tmp_path,
            orthanc_port,
            free_port(),
            HttpServerEnabled=False,
            DicomModalities={"fabricatord": ["FABRICATORD", "127.0.0.1", port]},
        )
        (tmp_path / "qr").mkdir()
        qr_config = tmp_path / "dcmqrscp.cfg"
        qr_config.write_text(
            f"NetworkTCPPort = {qr_port}\nMaxPDUSize = 65536\nMaxAssociations = 8\n"
            f"HostTable BEGIN\nfabricatord = (FABRICATORD, 127.0.0.1, {port})\nHostTable END\n"
            f"VendorTable BEGIN\nVendorTable END\nAETable BEGIN\nQRSCP {tmp_path / 'qr'} RW (500, 1024mb) ANY\n"
            "AETable END\n"
        )
        for command, peer_port, ae in (
            (["Orthanc", str(config)], orthanc_port, "ORTHANC"),
            (["dcmqrscp", "-c", str(qr_config), "--disable-host-lookup"], qr_port, "QRSCP"),
        ):
            peer = running_peer(command, peer_port, ae, timeout=60)
            peer.__enter__()
            started.append(peer)
        return Archive("orthanc", "ORTHANC", orthanc_port), Archive("qr", "QRSCP", qr_port)

    yield start
    for peer in reversed(started):
        peer.__exit__(None, None, None)


def add_peers(daemon: Daemon, entries: str) -> None:
    """`[[peers]]` added to the running daemon's file and read again (SIGHUP), as a user would."""
    daemon.config.write_text(daemon.config.read_text() + entries)
    reloads = daemon.log.read_text().count("configuration reloaded")
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while daemon.log.read_text().count("configuration reloaded") == reloads:
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.1)


def generate(config: Path, *args: str) -> str:
    out = run_cli("generate", "--config", str(config), *args).stdout
    return out.split("Study Instance UID:")[1].split()[0]


def find(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli("find", *args, "--config", str(config), check=check)


def matches(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def department(start_daemon: Callable[..., Daemon], archives: Callable[[int], tuple[Archive, Archive]]) -> Daemon:
    """Our node, with Orthanc (`orthanc`) and dcmqrscp (`qr`) as its peers, each knowing it."""
    daemon = start_daemon()
    orthanc, qr = archives(daemon.port)
    add_peers(daemon, orthanc.entry() + qr.entry())
    return daemon


def test_find_asks_self_orthanc_and_dcmqrscp_side_by_side(department: Daemon) -> None:
    config = department.config
    ct = generate(config, "--modality", "CT", "--images", "3", "--accession", "FIND-CT")
    mr = generate(config, "--modality", "MR", "--images", "2", "--accession", "FIND-MR")
    for peer in ("orthanc", "qr"):
        run_cli("send", peer, ct, "--config", str(config))
    run_cli("send", "orthanc", mr, "--config", str(config))

    found = matches(find(config, "self,orthanc,qr", "--json"))
    by_peer = {peer: {m["StudyInstanceUID"] for m in found if m["peer"] == peer} for peer in ("self", "orthanc", "qr")}
    assert by_peer == {"self": {ct, mr}, "orthanc": {ct, mr}, "qr": {ct}}
    ours = next(m for m in found if m["peer"] == "self" and m["StudyInstanceUID"] == ct)
    assert ours["AccessionNumber"] == "FIND-CT" and ours["NumberOfStudyRelatedInstances"] == "3"
    assert ours["ModalitiesInStudy"] == "CT"

    # Matching keys as DCMTK writes them, the levels below the study, and a table by default.
    keyed = matches(find(config, "orthanc,qr,self", "--json", "-k", "(0008,0050)=FIND-CT", "-k", "PatientSex"))
    assert sorted(m["peer"] for m in keyed) == ["orthanc", "qr", "self"]
    assert all(m["StudyInstanceUID"] == ct and "PatientSex" in m for m in keyed)
    images = matches(find(config, "qr,self", "--json", "--level", "image", "-k", f"StudyInstanceUID={ct}"))
    assert sorted(m["peer"] for m in images) == ["qr"] * 3 + ["self"] * 3
    assert {m["SOPInstanceUID"] for m in images if m["peer"] == "qr"} == {
        m["SOPInstanceUID"] for m in images if m["peer"] == "self"
    }
    series = matches(find(config, "orthanc", "--json", "--level", "series", "-k", "Modality=MR"))
    assert sorted(m["SeriesDescription"] for m in series) == ["FLAIR AXIAL", "T1 AXIAL", "T2 AXIAL"]
    table = find(config, "self,orthanc", "-k", "AccessionNumber=FIND-MR").stdout.splitlines()
    assert table[0].split()[:3] == ["PEER", "StudyDate", "PatientName"]
    assert [row.split()[0] for row in table[1:]] == ["self", "orthanc"] and all(mr in row for row in table[1:])
    assert find(config, "self", "-k", "AccessionNumber=NOTHING").stdout.strip() == "no matches"


def test_find_says_which_peer_failed_and_why(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    config = daemon.config
    generate(config, "--modality", "SC")
    nobody = f"NOBODY@127.0.0.1:{free_port()}"
    result = find(config, f"self,{nobody}", "--json", check=False)
    assert result.returncode == 69
    assert [m["peer"] for m in matches(result)] == ["self"]
    assert f"fabricatord: {nobody}: association with {nobody} failed: cannot connect: connection refused" in (
        result.stderr
    )
    usage = find(config, "self", "-k", "NoSuchKeyword=1", check=False)
    assert usage.returncode == 64 and "'NoSuchKeyword' is not a DICOM keyword" in usage.stderr
    unknown = find(config, "self,pacs", check=False)
    assert unknown.returncode == 64 and "unknown peer 'pacs'" in unknown.stderr and not unknown.stdout


def test_move_between_self_orthanc_and_dcmqrscp(department: Daemon, tmp_path: Path) -> None:
    config = department.config
    ours = generate(config, "--modality", "CT", "--images", "4", "--accession", "MOVE-OURS")

    moved = run_cli("move", "--from", "self", "--to", "orthanc", ours, "--config", str(config)).stdout
    assert f"{ours}: 4 moved to ORTHANC, 0 with warnings, 0 failed" in moved
    assert {m["peer"] for m in matches(find(config, "orthanc", "--json", "-k", f"StudyInstanceUID={ours}"))} == {
        "orthanc"
    }

    # Studies only the archives hold come in to us, found by a key first.
    elsewhere = tmp_path / "elsewhere"
    for accession in ("MOVE-QR", "MOVE-ORTHANC"):
        run_cli(
            "generate", "--modality", "DX", "--accession", accession, "--out", str(elsewhere / accession),
            env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "other")},
        )  # fmt: skip
    run_cli("send", "qr", str(elsewhere / "MOVE-QR"), "--config", str(config))
    run_cli("send", "orthanc", str(elsewhere / "MOVE-ORTHANC"), "--config", str(config))
    for peer, accession in (("qr", "MOVE-QR"), ("orthanc", "MOVE-ORTHANC")):
        brought = run_cli("move", "--from", peer, "--to", "self", "-k", f"AccessionNumber={accession}", "--config",
                          str(config)).stdout  # fmt: skip
        assert "1 study at" in brought and "2 moved to FABRICATORD, 0 with warnings, 0 failed" in brought
        here = matches(find(config, "self", "--json", "-k", f"AccessionNumber={accession}"))
        assert [m["NumberOfStudyRelatedInstances"] for m in here] == ["2"]


def test_move_fails_for_nothing_moved_and_for_a_refusal(department: Daemon) -> None:
    config = department.config
    study = generate(config, "--modality", "SC")
    nothing = run_cli("move", "--from", "self", "--to", "orthanc", "1.2.3.4", "--config", str(config), check=False)
    assert nothing.returncode == 69 and "FABRICATORD had nothing of this study to move" in nothing.stdout
    unknown = run_cli("move", "--from", "orthanc", "--to", "self", "1.2.3.4", "--config", str(config), check=False)
    assert unknown.returncode == 69 and "status 0xC000" in unknown.stdout  # Orthanc fails what it does not hold
    refused = run_cli("move", "--from", "self", "--to", "STRANGER", study, "--config", str(config), check=False)
    assert refused.returncode == 69 and "status 0xA801: move destination unknown" in refused.stdout
    add_peers(department, Archive("down", "DOWN", free_port()).entry())  # known, but nobody listens
    three = generate(config, "--modality", "SC", "--series", "1", "--images", "3")
    unreachable = run_cli("move", "--from", "self", "--to", "down", three, "--config", str(config), check=False)
    assert unreachable.returncode == 69 and "status 0xA702: down did not accept" in unreachable.stdout
    assert "0 moved to DOWN, 0 with warnings, 3 failed" in unreachable.stdout
    assert unreachable.stdout.count("  failed: ") == 3  # the Failed SOP Instance UID List, one per line
    for usage_error, said in (
        ([], "nothing to move"),
        (["-k", "Modality=CT"], "Modality is a series key"),
        (["-k", "PatientID=*", "-k", "StudyDate"], "needs a value to match"),
        (["-k", "Modality=ct"], "Invalid value for VR CS"),
        (["1.2.3", "--to", "BAD\\AE"], "an AE title"),
    ):
        usage = run_cli("move", "--from", "self", "--to", "orthanc", *usage_error, "--config", str(config), check=False)
        assert usage.returncode == 64 and said in usage.stderr, usage.stderr


def test_find_warns_of_a_query_an_archive_would_answer_with_less(department: Daemon) -> None:
    config = department.config
    study = generate(config, "--modality", "MR")
    series = find(config, "qr,self", "--level", "series")
    assert series.returncode == 0 and "without -k StudyInstanceUID=UID" in series.stderr
    below = find(config, "self", "-k", "Modality=MR")
    assert "Modality is a series-level key" in below.stderr
    exact = find(config, "self", "--level", "series", "-k", f"StudyInstanceUID={study}")
    assert exact.stderr.count("warning") == 0 and "MR" in exact.stdout


def test_the_production_guard_on_send_generate_and_move(
    start_daemon: Callable[..., Daemon], archives: Callable[[int], tuple[Archive, Archive]]
) -> None:
    daemon = start_daemon()
    orthanc, _ = archives(daemon.port)
    prod = Archive("prodpacs", "ORTHANC", orthanc.port)  # the same Orthanc, declared production
    add_peers(daemon, prod.entry("prod"))
    config = ["--config", str(daemon.config)]
    study = generate(daemon.config, "--modality", "SC")
    address = f"ANYAE@localhost:{orthanc.port}"  # the prod peer by another name and AE title
    for command in (
        ["send", "prodpacs", study],
        ["send", address, study],
        ["generate", "--modality", "SC", "--send", "prodpacs"],
        ["move", "--from", "self", "--to", "prodpacs", study],
        ["move", "--from", "self", "--to", "ORTHANC", study],
        ["move", "--from", "prodpacs", "--to", "self", study],
        ["move", "--from", f"ORTHANC@127.0.0.1:{orthanc.port}", "--to", "self", study],
    ):
        refused = run_cli(*command, *config, check=False)
        assert refused.returncode == 77, command
        assert "production peer 'prodpacs'" in refused.stderr and "--prod" in refused.stderr
    before = run_cli("generate", "--modality", "SC", "--send", "prodpacs", *config, check=False)
    assert "Stored under" not in before.stdout  # refused before anything is made
    assert "success" in run_cli("echo", "prodpacs", *config).stdout  # reads are allowed
    assert run_cli("find", "prodpacs", *config).returncode == 0
    sent = run_cli("send", "prodpacs", study, "--prod", *config).stdout
    assert "Confirmed by C-FIND at ORTHANC: 1 instances" in sent


def test_a_peer_asking_us_to_move_into_production_is_refused(
    start_daemon: Callable[..., Daemon], archives: Callable[[int], tuple[Archive, Archive]], tmp_path: Path
) -> None:
    probe = free_port()
    orthanc, _ = archives(probe)
    prod = Archive("prodpacs", "ORTHANC", orthanc.port).entry("prod")
    for allowed in (False, True):
        daemon = start_daemon(prod, dicom_extra=f"allow_move_to_prod = {str(allowed).lower()}\n")
        study = generate(daemon.config, "--modality", "SC")
        moved = dcmtk(
            "movescu", "-S", "-aet", "PACS", "-aec", "FABRICATORD", "-aem", "ORTHANC", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(daemon.port),
        )  # fmt: skip
        ours = run_cli(
            "move", "--from", "self", "--to", "prodpacs", "--prod", study, "--config", str(daemon.config), check=False
        )  # --prod lets our own command ask; the node still follows allow_move_to_prod
        log = daemon.stop()
        if allowed:
            assert ours.returncode == 0, ours.stdout + ours.stderr
            assert moved.returncode == 0, moved.stderr
            held = run_cli(
                "find", "prodpacs", "--json", "-k", f"StudyInstanceUID={study}", "--config", str(daemon.config)
            )
            assert json.loads(held.stdout)["StudyInstanceUID"] == study
        else:
            assert "MoveDestinationUnknown" in moved.stderr + moved.stdout  # 0xA801
            assert "c-move to a production destination refused" in log and "prod_destination" in log
            assert ours.returncode == 69
            assert "status 0xA801: production destination: [dicom] allow_move_to_prod is false" in ours.stdout
