"""Shared fixtures: settings in a temporary data_dir, real peers found or skipped, a PostgreSQL server."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from fabricatord.config import Settings, load
from fabricatord.db import dispose_all
from fabricatord.synth.checks import settings_problems

REQUIRE_PEERS = os.environ.get("FABRICATORD_REQUIRE_PEERS") == "1"
ROOT = Path(__file__).resolve().parents[1]


DCMTK_TOOLS = frozenset({"echoscu", "storescu", "storescp", "findscu", "movescu", "getscu"})
"""Names pynetdicom's console scripts share with DCMTK: in an activated virtualenv they come first."""


def need(tool: str) -> str:
    """The path of `tool`; skip without it, or fail when CI requires every peer. For a DCMTK
    tool, DCMTK's own, wherever it is on PATH, never pynetdicom's app of the same name."""
    if tool in DCMTK_TOOLS:
        candidates = [shutil.which(tool, path=folder) for folder in os.environ.get("PATH", "").split(os.pathsep)]
        path = next((c for c in candidates if c and _is_dcmtk(c)), None)
    else:
        path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (scripts/test installs it through apt as root)"
        if tool in DCMTK_TOOLS and shutil.which(tool):
            message = f"{tool} on PATH ({shutil.which(tool)}) is not DCMTK's, and DCMTK's is not installed"
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def _is_dcmtk(path: str) -> bool:
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return "dcmtk" in (result.stdout + result.stderr).lower()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_for_echo(
    port: int, ae_title: str = "ANY", timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until a DICOM peer answers C-ECHO. A bare TCP probe would hold single-threaded
    peers such as DCMTK's storescp in their association timeout."""
    from fabricatord.dicom.scu import Peer, ScuError, Timeouts, echo

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before answering C-ECHO on {port}")
        try:
            echo(Peer(ae_title, "127.0.0.1", port), "PROBE", Timeouts(connect=1, acse=2, dimse=2, network=2))
            return
        except ScuError as exc:
            if "rejected" in str(exc):  # it speaks DICOM; it just does not know the probe's AE title
                return
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no C-ECHO answer on 127.0.0.1:{port} after {timeout} s")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help="run the load tests at full size (10,000 associations and connects, 10 × 1,000 ORMs …)",
    )


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """Whether the load tests run at full size (`--soak`) rather than sized for CI."""
    return bool(request.config.getoption("--soak"))


@pytest.fixture(autouse=True)
def _strict_pydicom() -> Iterator[None]:
    """Tests read what we write with pydicom's validation raising (highdicom does the same)."""
    config = pydicom.config.settings
    before = (config.reading_validation_mode, config.writing_validation_mode)
    config.reading_validation_mode = config.writing_validation_mode = pydicom.config.RAISE
    yield
    config.reading_validation_mode, config.writing_validation_mode = before


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "fabricatord.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def make_settings(tmp_path: Path, write_config: Callable[[str], Path]) -> Iterator[Callable[..., Settings]]:
    def make(extra: str = "", database: str = "") -> Settings:
        db_line = f'database = "{database}"\n' if database else ""
        path = write_config(f'[node]\ndata_dir = "data"\n{db_line}{extra}')
        return load(path, environ={}, checks=[settings_problems])

    yield make
    dispose_all()


@dataclass
class PostgresServer:
    url: str

    def fresh_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def _postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL on a free port, run as the `postgres` user when we are root."""
    bindir = _postgres_bin()
    if bindir is None:
        message = "PostgreSQL server binaries are not installed (apt postgresql)"
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="fabricatord-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # The server refuses to run as root.
        shutil.chown(base, "postgres", "postgres")
        os.chmod(base, 0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    port = free_port()
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "fabricatord"],
        check=True,
        capture_output=True,
    )
    log = base / "server.log"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "start",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield PostgresServer(f"postgresql+psycopg://fabricatord@127.0.0.1:{port}/postgres")
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        yield server.fresh_database(f"t_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}")
    dispose_all()


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`fabricatord ARGS` as a user runs it: a separate process. Without `--config` or a
    `FABRICATORD_CONFIG` in `env` it reads the built-in defaults, whatever the folder holds."""
    full_env = {**os.environ, "FABRICATORD_CONFIG": "", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "fabricatord", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"fabricatord {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result
