"""The first five minutes, as a newcomer spends them: a fresh copy of the repository with
nothing installed, `scripts/run` on it, and the README's tour run line by line against that
daemon, each output line the README shows found in what the command printed.

The tour is every `$ ` line of the README's ```console blocks, in order, in one bash session
(so `export` and `cd` carry over, as in a terminal); output lines under a command are its
expected output, where `…` stands for anything (`2.25.…` for a UID). Blocks fenced otherwise
(another host, docker, systemctl, a user's own files) only illustrate and are not run. The
default ports the README names are mapped to free ones: the daemon gets them from the
environment (FABRICATORD__DICOM__PORT …), the commands and their output by substitution, and a
real Orthanc stands where the README's Orthanc is.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, need, wait_for_echo
from tests.integration.conftest import orthanc_config

pytestmark = pytest.mark.integration

INSTALL_SECONDS = 900
"""The first `scripts/run` makes .venv and installs the project from the package index."""
COMMAND_SECONDS = 300
DEFAULT_PORTS = {"dicom": 11112, "hl7": 2575, "http": 8080, "orthanc": 4242, "orthanc_http": 8042}
_RUN = re.compile(r"^((?:[A-Z_][A-Z0-9_]*=\S*\s+)*)scripts/run\b\s*(.*)$")


@dataclass
class Step:
    command: str
    expected: list[str]
    line: int
    """Where the command stands in the README, for messages."""


def tour(text: str) -> list[Step]:
    """The `$ ` lines of the ```console blocks, continuations (`\\`) joined, with the lines
    printed under each."""
    steps: list[Step] = []
    in_console = False
    continued = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if line.startswith("```"):
            in_console = line == "```console"
            continued = False
            continue
        if not in_console:
            continue
        if continued:
            steps[-1].command += " " + line.strip().removesuffix("\\").strip()
            continued = line.endswith("\\")
        elif line.startswith("$ "):
            steps.append(Step(line[2:].removesuffix("\\").strip(), [], number))
            continued = line.endswith("\\")
        elif line.strip() and steps:
            steps[-1].expected.append(line)
    return steps


def _pattern(shown: str) -> re.Pattern[str]:
    """A line the README shows as a pattern: `…` matches anything, the rest is literal."""
    return re.compile(".*".join(re.escape(part) for part in shown.strip().split("…")))


def unmatched(expected: list[str], output: list[str]) -> list[str]:
    """The lines the README shows that the output lacks: each must match a whole output line,
    in order (a command may print more than the README shows)."""
    remaining = iter(line.strip() for line in output)
    missing = []
    for shown in expected:
        pattern = _pattern(shown)
        if shown.strip() == "…":
            continue
        if not any(pattern.fullmatch(line) for line in remaining):
            missing.append(shown)
            remaining = iter(line.strip() for line in output)  # report the rest independently
    return missing


class Shell:
    """One bash session, as a user's terminal: commands in, their merged output and status out."""

    _END = "__fabricatord_tour_status__"

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def run(self, command: str, timeout: float = COMMAND_SECONDS) -> tuple[int, list[str]]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\necho {self._END} $?\n")
        self.process.stdin.flush()
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise AssertionError(f"{command!r} did not finish in {timeout} s:\n" + "\n".join(output)) from None
            before, end, status = line.partition(self._END)
            if end:  # after the command's last line, or after what it printed without a newline
                return int(status), [*output, before] if before else output
            output.append(line)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def fresh_copy(destination: Path) -> Path:
    """The repository as a clone of this working tree holds it: tracked files and new ones not
    ignored, nothing installed (.venv and var/ are ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("git")
    return fresh_copy(tmp_path_factory.mktemp("clone"))


@dataclass
class Ports:
    by_name: dict[str, int] = field(default_factory=lambda: {name: free_port() for name in DEFAULT_PORTS})

    def environment(self) -> dict[str, str]:
        return {
            "FABRICATORD__DICOM__PORT": str(self.by_name["dicom"]),
            "FABRICATORD__HL7__PORT": str(self.by_name["hl7"]),
            "FABRICATORD__HTTP__PORT": str(self.by_name["http"]),
        }

    def substitute(self, text: str) -> str:
        """The README's default ports replaced by this run's."""
        for name, default in DEFAULT_PORTS.items():
            text = re.sub(rf"(?<![\d.]){default}(?!\d)", str(self.by_name[name]), text)
        return text


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """What a newcomer's terminal has: no configuration chosen, no virtualenv active."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICATORD") and k != "VIRTUAL_ENV"}
    ours = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != ours)
    return {**env, **extra}


def _ready(http_port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"scripts/run exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"/readyz not 200 after {timeout} s:\n{log.read_text()[-4000:]}")


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        """SIGTERM, as systemd and Ctrl-C stop it: the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_scripts_run(clone: Path, ports: Ports, assignments: dict[str, str], args: list[str], log: Path) -> Daemon:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["scripts/run", *args],
            cwd=clone,
            env=_environment({**ports.environment(), **assignments}),
            stdout=sink,
            stderr=sink,
        )
    daemon = Daemon(process, log)
    try:
        _ready(ports.by_name["http"], process, log, INSTALL_SECONDS)
    except BaseException:
        process.kill()
        raise
    return daemon


def test_scripts_run_serves_a_fresh_clone(clone: Path, tmp_path: Path) -> None:
    """The first of the two commands, on a copy with nothing installed: it makes .venv,
    installs, serves on its embedded defaults (the ports from the environment), and stops
    cleanly on SIGTERM."""
    ports = Ports()
    data = tmp_path / "data"
    daemon = start_scripts_run(clone, ports, {"FABRICATORD__NODE__DATA_DIR": str(data)}, [], tmp_path / "run.log")
    try:
        assert (clone / ".venv" / "bin" / "fabricatord").is_file()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.by_name['http']}/api/v1/status", timeout=10) as reply:
            status = json.load(reply)
        assert status["listeners"]["dicom"] == f"127.0.0.1:{ports.by_name['dicom']}"
        wait_for_echo(ports.by_name["dicom"], "FABRICATORD")
        assert (data / "fabricatord.sqlite").is_file()
    finally:
        code = daemon.stop()
    log = daemon.log.read_text()
    assert code == 0, log[-4000:]
    assert f"configuration {clone / 'conf' / 'fabricatord.toml'}" in log


@pytest.fixture
def orthanc_for_tour(tmp_path: Path) -> Iterator[Ports]:
    """The README's Orthanc: a real one on this run's ports, knowing the daemon as FABRICATORD."""
    ports = Ports()
    config = orthanc_config(
        tmp_path,
        ports.by_name["orthanc"],
        ports.by_name["orthanc_http"],
        DicomModalities={"fabricatord": ["FABRICATORD", "127.0.0.1", ports.by_name["dicom"]]},
    )
    process = subprocess.Popen([need("Orthanc"), str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_echo(ports.by_name["orthanc"], "ORTHANC", process=process)  # type: ignore[arg-type]
        yield ports
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_readme_tour_is_true(clone: Path, tmp_path: Path, orthanc_for_tour: Ports) -> None:
    for tool in ("echoscu", "storescu", "findscu", "movescu", "getscu", "curl"):
        need(tool)
    ports = orthanc_for_tour
    assert not (clone / "var").exists(), "the tour starts with no data"
    conf = clone / "conf" / "fabricatord.toml"
    conf.write_text(ports.substitute(conf.read_text()))
    steps = tour((ROOT / "README.md").read_text())
    assert len(steps) > 20, "the tour lost its console blocks"
    shell = Shell(clone, _environment(ports.environment()))
    daemon: Daemon | None = None
    try:
        for step in steps:
            command = ports.substitute(step.command)
            started = _RUN.match(command)
            if started:
                assignments = dict(part.split("=", 1) for part in started.group(1).split())
                args = started.group(2).split("#")[0].split()
                daemon = start_scripts_run(clone, ports, assignments, args, tmp_path / "daemon.log")
                continue
            code, output = shell.run(command)
            shown = [ports.substitute(line) for line in step.expected]
            context = f"README.md:{step.line}: $ {step.command}\n--- printed:\n" + "\n".join(output)
            assert code == 0, f"exit {code}\n{context}"
            missing = unmatched(shown, output)
            assert not missing, (
                "the README shows lines the command did not print:\n" + "\n".join(missing) + "\n" + context
            )
        assert daemon is not None, "the tour never starts the daemon with scripts/run"
    finally:
        shell.close()
        code = daemon.stop() if daemon is not None else 0
    assert code == 0, (tmp_path / "daemon.log").read_text()[-4000:]
