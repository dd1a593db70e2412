"""`fabricatord serve` starts, answers /healthz and /metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port

pytestmark = pytest.mark.integration


def test_serve_health_metrics_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "fabricatord.toml"
    config.write_text(f'[node]\ndata_dir = "data"\n[http]\nport = {port}\n[dicom]\nport = {free_port()}\n')
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
