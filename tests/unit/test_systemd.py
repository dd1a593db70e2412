"""The systemd unit passes `systemd-analyze verify`, and the notify protocol reaches a socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fabricatord.obs.systemd import notify, watchdog_interval
from tests.conftest import ROOT, need


def test_the_unit_file_verifies(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    unit = (ROOT / "systemd" / "fabricatord.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "ExecStartPre=/opt/fabricatord/.venv/bin/fabricatord check-config" in unit
    # verify checks that the commands exist: point them at this checkout's.
    command = shutil.which("fabricatord") or str(Path(sys.executable).parent / "fabricatord")
    local = tmp_path / "fabricatord.service"
    local.write_text(unit.replace("/opt/fabricatord/.venv/bin/fabricatord", command))
    result = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_notify_sends_datagrams_and_reads_the_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert notify("READY=1") is False  # no NOTIFY_SOCKET: nothing to tell
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert notify("READY=1", "STATUS=serving") is True
        assert listener.recv(100) == b"READY=1\nSTATUS=serving"
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process is the one watched
    assert watchdog_interval() is None
