"""`fabricatord serve` starts, answers /healthz and /metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port
from tests.integration.conftest import Daemon
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
        "checks": {"database": True, "dicom": True, "mllp": True},
    }
    schedule(daemon, "--modality", "CT", "--station", "CT01")
    with urllib.request.urlopen(f"{base}/api/v1/status", timeout=10) as response:
        status = json.loads(response.read())
    assert status["version"] and status["uptime_seconds"] >= 0
    assert status["listeners"]["mllp"] == f"127.0.0.1:{daemon.hl7_port}"
    assert (status["patients"], status["orders"], status["worklist_steps"]) == (1, 1, {"SCHEDULED": 1})
    assert status["acquisitions"] == {"waiting": 1} and status["route_jobs"] == {} and status["instances"] == 0
