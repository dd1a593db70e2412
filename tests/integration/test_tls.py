"""TLS on every listener and every association we open, proven with DCMTK's TLS tools, our own
`move`, a Python MLLP client and headless Chromium, with certificates the tests make."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import ROOT, free_port, need, run_cli, wait_for_port
from tests.integration.conftest import Daemon, dcmtk, generated, halt, launch
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import frame_of, msa
from tests.integration.web import PASSWORD, add_user
from tests.pki import Material, make_material, reissue

pytestmark = pytest.mark.integration

IHE = ROOT / "tests" / "data" / "hl7" / "ihe_orm_o01_v251.hl7"


def tls_section(material: Material, verify_client: bool = True) -> str:
    """Without client verification, no `ca` either: TLS for anyone, as a console's browsers need."""
    return f'[tls]\ncertificate = "{material.server_cert}"\nprivate_key = "{material.server_key}"\n' + (
        f'ca = "{material.ca}"\nverify_client = true\n' if verify_client else "verify_client = false\n"
    )


def start(
    folder: Path, material: Material, extra: str = "", plain: bool = True, **options: Any
) -> tuple[Daemon, int, int, int]:
    """A daemon with `[tls]`; (daemon, DICOM TLS port, MLLP TLS port, HTTPS port)."""
    dicom_tls, hl7_tls, https = free_port(), free_port(), free_port()
    allowed = options.pop("dicom_allowed", "")
    daemon = launch(
        folder,
        extra=tls_section(material, options.pop("verify_client", True)) + extra,
        dicom_extra=f"tls_port = {dicom_tls}\nplain = {'true' if plain else 'false'}\n"
        + (f"allowed_hosts = {allowed}\n" if allowed else ""),
        hl7_extra=f"tls_port = {hl7_tls}\n{options.pop('hl7_more', '')}",
        wait=plain,
        env={"FABRICATORD__HTTP__TLS_PORT": str(https), **options.pop("env", {})},
        **options,
    )
    return daemon, dicom_tls, hl7_tls, https


def tls_args(material: Material, client: bool = True) -> list[str]:
    """DCMTK's: our client certificate (or none, +tla) and the CA that signed the daemon's."""
    who = ["+tls", str(material.client_key), str(material.client_cert)] if client else ["+tla"]
    return [*who, "+cf", str(material.ca)]


def echo(port: int, *options: str) -> Any:
    return dcmtk("echoscu", *options, "-aet", "MODALITY", "-aec", "FABRICATORD", "127.0.0.1", str(port), timeout=30)


@pytest.fixture
def material(tmp_path: Path) -> Material:
    return make_material(tmp_path / "pki")


def test_dcmtk_echoes_stores_and_finds_over_tls_and_the_unverified_are_turned_away(
    tmp_path: Path, material: Material
) -> None:
    daemon, dicom_tls, _, _ = start(tmp_path, material)
    try:
        assert echo(dicom_tls, *tls_args(material)).returncode == 0
        files = generated(tmp_path, "CT", 3)
        stored = dcmtk("storescu", *tls_args(material), "-aet", "MODALITY", "-aec", "FABRICATORD",
                       "127.0.0.1", str(dicom_tls), *map(str, files), timeout=120)  # fmt: skip
        assert stored.returncode == 0, stored.stderr
        assert len(daemon.rows()) == 3
        study_uid = dcmread(files[0]).StudyInstanceUID
        found = dcmtk("findscu", *tls_args(material), "-S", "-aet", "PACS", "-aec", "FABRICATORD",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                      "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(dicom_tls), timeout=60)  # fmt: skip
        assert found.returncode == 0 and "(0020,1208) IS [3 ]" in found.stderr + found.stdout
        # No client certificate, one another CA signed, plain text on the TLS port: each refused.
        assert echo(dicom_tls, *tls_args(material, client=False)).returncode != 0
        stranger = ["+tls", str(material.stranger_key), str(material.stranger_cert), "+cf", str(material.ca)]
        assert echo(dicom_tls, *stranger).returncode != 0
        assert echo(dicom_tls).returncode != 0
        assert echo(daemon.port).returncode == 0  # the plain port, and everyone else, still served
        assert daemon.metric("fabricatord_tls_handshake_failures_total", listener="dicom") == 3
        expiry = daemon.metric("fabricatord_tls_certificate_expiry_seconds")
        assert expiry is not None and abs(expiry - (datetime.now(UTC) + timedelta(days=365)).timestamp()) < 3600
    finally:
        log = daemon.stop()
    failures = [json.loads(line) for line in log.splitlines() if "TLS handshake failed" in line]
    assert len(failures) == 3 and all(f["listener"] == "dicom" and f["peer"].startswith("127.0.0.1:") for f in failures)
    assert "certificate" in failures[0]["error"] and "version" in failures[2]["error"]  # why, as OpenSSL says


def test_routes_and_moves_go_over_tls_to_a_tls_peer_from_a_tls_only_node(tmp_path: Path, material: Material) -> None:
    """storescp +tls as the PACS: a route sends to it, and `fabricatord move` asks our
    TLS-only node (plain = false) to move a study there, both over TLS both ways."""
    pacs_port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    peer = (
        f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nport = {pacs_port}\ntls = true\n'
        '[[routes]]\nname = "to-pacs"\nmatch = { study_description = "ROUTED*" }\nto = ["pacs"]\n'
    )
    storescp = [need("storescp"), "+tls", str(material.server_key), str(material.server_cert), "+cf", str(material.ca),
                "-aet", "PACS", "-od", str(received), "--accept-all", str(pacs_port)]  # fmt: skip
    daemon, dicom_tls, _, _ = start(tmp_path, material, peer, plain=False)
    try:
        wait_for(lambda: echo(dicom_tls, *tls_args(material)).returncode == 0, 30)
        assert echo(daemon.port).returncode != 0  # the plain port is closed
        with tls_peer(storescp, pacs_port):
            routed = run_cli("generate", "--modality", "CR", "--images", "2", "--description", "ROUTED CR",
                             "--config", str(daemon.config))  # fmt: skip
            routed_uid = routed.stdout.split("Study Instance UID:")[1].split()[0]
            wait_for(lambda: arrived(received) == [routed_uid, routed_uid], 60)
            for file in received.iterdir():
                file.unlink()
            other = run_cli("generate", "--modality", "DX", "--images", "2", "--config", str(daemon.config))
            other_uid = other.stdout.split("Study Instance UID:")[1].split()[0]
            moved = run_cli("move", "--from", "self", "--to", "pacs", other_uid, "--config", str(daemon.config))
            assert f"{other_uid}: 2 moved to PACS, 0 with warnings, 0 failed" in moved.stdout
            wait_for(lambda: arrived(received) == [other_uid, other_uid], 30)
    finally:
        halt(daemon)


def arrived(folder: Path) -> list[str]:
    """The Study Instance UIDs of the files a DCMTK peer wrote; none while one is half written."""
    try:
        return sorted(dcmread(f).StudyInstanceUID for f in folder.iterdir())
    except Exception:  # a file being written: look again
        return []


@contextmanager
def tls_peer(command: list[str], port: int) -> Iterator[None]:
    """A DCMTK TLS server (nothing answers a plain C-ECHO there): up once its port listens."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def _client_context(material: Material, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(material.ca))
    context.check_hostname = False
    if certificate:
        context.load_cert_chain(str(material.client_cert), str(material.client_key))
    return context


def test_mllp_over_tls_acknowledges_after_commit_and_refuses_a_client_without_certificate(
    tmp_path: Path, material: Material
) -> None:
    daemon, _, hl7_tls, _ = start(tmp_path, material, hl7_more='idle_timeout = "2s"\n')
    try:
        raw = socket.create_connection(("127.0.0.1", hl7_tls), timeout=30)
        with _client_context(material).wrap_socket(raw) as secure:
            assert secure.version() in ("TLSv1.3", "TLSv1.2")
            secure.sendall(b"\x0b" + frame_of(IHE) + b"\x1c\r")
            ack = b""
            while not ack.endswith(b"\x1c\r"):
                chunk = secure.recv(65536)
                assert chunk, "closed before the ACK"
                ack += chunk
        assert msa(ack.strip(b"\x0b\x1c\r").decode())[0] == "AA"
        assert daemon.query("SELECT accession_number FROM orders") == [("ACC1001",)]
        # `fabricatord hl7 send --tls` with the node's own [tls], as a RIS-side script would.
        sent = run_cli("hl7", "send", "--tls", f"127.0.0.1:{hl7_tls}", str(IHE), "--config", str(daemon.config))
        assert "AA" in sent.stdout
        logged = daemon.query("SELECT count(*) FROM hl7_messages")
        raw = socket.create_connection(("127.0.0.1", hl7_tls), timeout=30)
        with pytest.raises((ssl.SSLError, ConnectionError)), _client_context(material, False).wrap_socket(raw) as bare:
            bare.sendall(b"\x0b" + frame_of(IHE) + b"\x1c\r")
            assert bare.recv(65536) == b""  # TLS 1.3: the refusal comes with the first read
        assert daemon.query("SELECT count(*) FROM hl7_messages") == logged  # nothing of it kept
        # A client that goes silent is closed by the idle timeout, TLS or not.
        raw = socket.create_connection(("127.0.0.1", hl7_tls), timeout=30)
        with _client_context(material).wrap_socket(raw) as silent:
            started = time.monotonic()
            with suppress(ssl.SSLError, ConnectionError):
                assert silent.recv(65536) == b""
            assert time.monotonic() - started < 15
    finally:
        halt(daemon)


def test_a_host_not_allowed_is_closed_on_the_tls_port_too(tmp_path: Path, material: Material) -> None:
    daemon, dicom_tls, _, _ = start(tmp_path, material, plain=False, dicom_allowed='["192.0.2.7"]')
    try:
        wait_for_port(dicom_tls)
        assert echo(dicom_tls, *tls_args(material)).returncode != 0
        assert echo(dicom_tls, *tls_args(material)).returncode != 0
        assert daemon.process.poll() is None
    finally:
        log = daemon.stop()
    assert "Traceback" not in log and "Unhandled" not in log


def test_the_console_over_https_in_chromium_sets_secure_cookies(tmp_path: Path, material: Material) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    daemon, _, _, https = start(tmp_path, material, verify_client=False)
    add_user(daemon.config, "ada", "admin")
    options = webdriver.ChromeOptions()
    options.binary_location = need("chromium")
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--ignore-certificate-errors"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(need("chromedriver")), options=options)
    try:
        base = f"https://127.0.0.1:{https}"
        driver.get(f"{base}/login")
        driver.find_element(By.NAME, "username").send_keys("ada")
        driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
        WebDriverWait(driver, 60).until(lambda d: d.current_url == f"{base}/")
        assert driver.find_element(By.ID, "whoami").text.startswith("ada")
        session = next(c for c in driver.get_cookies() if c["name"] == "fabricatord_session")
        assert session["secure"] is True and session["httpOnly"] is True  # cookie_secure left false
    finally:
        driver.quit()
        halt(daemon)


def test_a_new_certificate_is_served_after_sighup_and_one_near_expiry_is_warned_of(tmp_path: Path) -> None:
    material = make_material(tmp_path / "pki", server_days=5)
    daemon, dicom_tls, _, _ = start(tmp_path, material)
    try:
        first = _served(material, dicom_tls)
        reissue(material)  # the CA signs a new one, written over the files the daemon reads
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _served(material, dicom_tls) != first, 30)
    finally:
        log = daemon.stop()
    warned = [json.loads(line) for line in log.splitlines() if "expires soon" in line]
    assert warned and 4 < warned[0]["days_left"] <= 5
    assert "TLS certificate reloaded" in log


def _served(material: Material, port: int) -> bytes:
    """The certificate our TLS port presents now."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with _client_context(material).wrap_socket(raw) as secure:
        return bytes(secure.getpeercert(binary_form=True) or b"")


def test_worker_processes_serve_tls_on_the_ports_their_parent_bound(
    tmp_path: Path, material: Material, postgres_server: Any
) -> None:
    url = postgres_server.fresh_database(f"tls_{abs(hash(str(tmp_path))) % 10**8}")
    daemon, dicom_tls, hl7_tls, https = start(
        tmp_path, material, database_url=url, env={"FABRICATORD__NODE__WORKERS": "2"}, verify_client=False
    )
    try:
        for _ in range(4):  # the kernel hands them to either worker
            assert echo(dicom_tls, *tls_args(material)).returncode == 0
        raw = socket.create_connection(("127.0.0.1", hl7_tls), timeout=30)
        with _client_context(material).wrap_socket(raw) as secure:
            secure.sendall(b"\x0b" + frame_of(IHE) + b"\x1c\r")
            assert b"MSA|AA|IHE0001" in secure.recv(65536)
        with urllib.request.urlopen(f"https://127.0.0.1:{https}/healthz", context=_client_context(material)) as answer:
            assert answer.status == 200
        started = [json.loads(line) for line in daemon.log.read_text().splitlines() if "listener started" in line]
        dicom = [line for line in started if line["event"] == "dicom listener started"]
        assert sorted(line["worker"] for line in dicom) == [0, 1]  # both workers serve the TLS port
        assert all(line["tls_port"] == dicom_tls for line in dicom)
    finally:
        halt(daemon)
