"""`fabricatord serve` starts, answers /healthz and /metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import free_port, run_cli, wait_for_port
from tests.integration.conftest import Daemon, dcmtk, generated, running_peer, storescu
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import msa, order, send, worklist
from tests.integration.test_worklist import schedule

pytestmark = pytest.mark.integration


def test_serve_health_metrics_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "fabricatord.toml"
    config.write_text(
        f'[node]\ndata_dir = "data"\n[http]\nport = {port}\n[dicom]\nport = {free_port()}\n'
        f"[hl7]\nport = {free_port()}\n"
    )
    (tmp_path / "data" / "tmp").mkdir(parents=True)
    (tmp_path / "data" / "tmp" / "left-by-a-crash.part").write_bytes(b"x")
    process = subprocess.Popen(
        [sys.executable, "-m", "fabricatord", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, process=process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200 and b"ok" in response.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b'fabricatord_build_info{version="' in response.read()
        assert not (tmp_path / "data" / "tmp" / "left-by-a-crash.part").exists()
        assert (tmp_path / "data" / "fabricatord.sqlite").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert '"event": "fabricatord stopped"' in stderr and '"temporary_files_removed": 1' in stderr


def test_a_port_in_use_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "fabricatord.toml"
        config.write_text(
            f'[node]\ndata_dir = "data"\n[dicom]\nport = {port}\n[http]\nport = {free_port()}\n'
            f"[hl7]\nport = {free_port()}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "fabricatord", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert '"event": "startup failed"' in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_readiness_and_status_report_the_listeners_and_what_is_held(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    base = f"http://127.0.0.1:{daemon.http_port}"
    with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
        ready = json.loads(response.read())
    assert response.status == 200 and ready == {
        "ready": True,
        "checks": {"database": True, "dicom": True, "mllp": True, "storage": True},
    }
    schedule(daemon, "--modality", "CT", "--station", "CT01")
    with urllib.request.urlopen(f"{base}/api/v1/status", timeout=10) as response:
        status = json.loads(response.read())
    assert status["version"] and status["uptime_seconds"] >= 0
    assert status["listeners"]["mllp"] == f"127.0.0.1:{daemon.hl7_port}"
    assert (status["patients"], status["orders"], status["worklist_steps"]) == (1, 1, {"SCHEDULED": 1})
    assert status["acquisitions"] == {"waiting": 1} and status["route_jobs"] == {} and status["instances"] == 0


def test_systemd_hears_ready_watchdog_and_stopping(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(30)
        daemon = start_daemon(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        heard: list[str] = []
        while "READY=1" not in heard or heard.count("WATCHDOG=1") < 2:
            heard += listener.recv(4096).decode().split("\n")
        assert any(line.startswith("STATUS=serving DICOM on") for line in heard)
        daemon.process.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in heard:
            heard += listener.recv(4096).decode().split("\n")
        assert daemon.process.wait(timeout=30) == 0


def test_sighup_applies_a_new_route_and_keeps_the_old_config_when_the_new_one_is_bad(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    files = generated(tmp_path, "CT", 3)
    assert storescu(daemon.port, files[:1]).returncode == 0
    original = daemon.config.read_text()
    daemon.config.write_text(
        original + f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nport = {free_port()}\n'
        '[[routes]]\nname = "received"\nmatch = { source = "received" }\nto = ["pacs"]\n'
    )
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log.read_text())
    assert storescu(daemon.port, files[1:2]).returncode == 0
    jobs = run_cli("jobs", "list", "routes", "--config", str(daemon.config)).stdout
    assert len(jobs.splitlines()) == 1 and " pacs " in jobs  # only what came after the reload
    daemon.config.write_text(original + "[dicom\n")  # not TOML
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in daemon.log.read_text())
    assert daemon.process.poll() is None and echo_ok(daemon)
    assert storescu(daemon.port, files[2:]).returncode == 0  # the route of before still applies
    with sqlite3.connect(daemon.data_dir / "fabricatord.sqlite") as connection:
        assert connection.execute("SELECT count(*) FROM route_jobs").fetchone()[0] == 2


def echo_ok(daemon: Daemon) -> bool:
    return dcmtk("echoscu", "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port)).returncode == 0


def test_metrics_move_with_traffic_and_show_which_peers_answer(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    up, down = free_port(), free_port()
    peers = (
        f'[[peers]]\nname = "up"\nae_title = "STORESCP"\nport = {up}\n'
        f'[[peers]]\nname = "down"\nae_title = "NOBODY"\nport = {down}\n'
    )
    (tmp_path / "received").mkdir()
    with running_peer(["storescp", "-aet", "STORESCP", "-od", str(tmp_path / "received"), str(up)], up, "STORESCP"):
        daemon = start_daemon(peers, env={"FABRICATORD__DICOM__PEER_ECHO_INTERVAL": "1s"})
        assert msa(send(daemon, order("MET1", "NW", "SC", "ACCMET1")))[0] == "AA"

        # The two echoes run side by side: wait for both answers.
        wait_for(
            lambda: (
                {'fabricatord_peer_up{peer="up"} 1.0', 'fabricatord_peer_up{peer="down"} 0.0'}
                <= set(daemon.metrics().splitlines())
            )
        )
        text = daemon.metrics()
    assert 'fabricatord_hl7_messages_total{ack="AA",type="ORM^O01"} 1.0' in text
    assert 'fabricatord_route_queue_depth{peer="up"} 0.0' in text and "fabricatord_storage_bytes 0.0" in text
    assert 'fabricatord_peer_echo_seconds_count{peer="up"}' in text
    # No `_created` series beside each counter (fabricatord_patients_created_created): nobody queries them.
    assert "fabricatord_hl7_messages_total" in text and not re.search(r"^\w+_created[{ ]", text, re.MULTILINE)
    # The peer down is reported in our words, once an echo, not as pynetdicom's two errors.
    log = daemon.log.read_text()
    assert "cannot connect: connection refused" in log and "unable to connect to remote" not in log


def test_every_log_line_names_its_association_or_message_and_no_patient(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    files = generated(tmp_path, "CT", 2)
    names = {str(dcmread(path).PatientName).split("^")[0] for path in files} | {"Tester", "MRN9009"}
    assert storescu(daemon.port, files).returncode == 0
    assert msa(send(daemon, order("LOG1", "NW", "SC", "ACCLOG1")))[0] == "AA"
    assert msa(send(daemon, b"MSH|^~\\&|RIS|HOSP|FAB|FAB|20261124||ORM^O01|LOG2|P|9.9"))[0] == "AR"
    assert worklist(daemon, tmp_path, "AccessionNumber=ACCLOG1")
    run_cli("acquire", "ACCLOG1", "--config", str(daemon.config))
    wait_for(lambda: '"acquired"' in daemon.log.read_text())
    lines = [json.loads(line) for line in daemon.stop().splitlines()]  # JSON off a terminal, every line

    def events(name: str) -> list[dict[str, object]]:
        found = [line for line in lines if line["event"] == name]
        assert found, name
        return found

    stores = events("c-store")
    assert len(stores) == 2 and {(e["calling_ae"], e["operation"]) for e in stores} == {("MODALITY", "C-STORE")}
    assert len({e["association"] for e in stores}) == 1
    assert {e["association"] for e in events("association released")} >= {stores[0]["association"]}
    [query] = [e for e in events("worklist query") if e["calling_ae"] == "PACS"]
    assert query["operation"] == "MWL" and query["association"] != stores[0]["association"]
    accepted, refused = events("hl7 message accepted")[0], events("hl7 message refused")[0]
    assert (accepted["control_id"], refused["control_id"]) == ("LOG1", "LOG2")
    assert isinstance(accepted["message"], int) and refused["message"] == accepted["message"] + 1
    assert str(accepted["peer"]).startswith("127.0.0.1:") and str(refused["peer"]).startswith("127.0.0.1:")
    assert events("acquired")[0]["job"] == "a1"
    text = daemon.log.read_text()
    assert not [name for name in names if name in text]  # no patient name or ID without log_phi
