"""One daemon per module, sent what ROBUSTNESS.md lists; after each input the oracles O1–O6 hold.

O1 alive (C-ECHO, an ORM answered AA, /healthz 200); O2 nothing acknowledged lost (rows stay
with their files); O3 nothing half-done (data_dir/tmp empties); O4 resources back to their
baseline (threads, open files, active associations); O5 the failure counted under its label and
logged once with its reason; O6 nothing written outside data_dir.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hl7.client import MLLPClient

from fabricatord.dicom.scu import Peer, Timeouts, echo
from tests.integration.conftest import Daemon, halt, launch

pytestmark = pytest.mark.integration
DATABASE_FILES = ("fabricatord.sqlite", "fabricatord.sqlite-wal", "fabricatord.sqlite-shm")
SETTLE = 10.0
"""How long the oracles wait for a connection's threads, files and slot to be given back."""


def count(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir()) if folder.exists() else 0


@dataclass
class Node:
    """The daemon under test and what it held when it was idle."""

    daemon: Daemon
    folder: Path
    threads: int
    files: int
    control_ids: Iterator[int]

    def resources(self) -> tuple[int, int]:
        """Threads and open file descriptors of the daemon now, leaving out the database's files:
        its connection pool opens another connection when two requests meet, and keeps it."""
        pid = self.daemon.process.pid
        descriptors = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed while we looked
                continue
            descriptors += not target.endswith(DATABASE_FILES)
        return count(Path(f"/proc/{pid}/task")), descriptors

    def rss(self) -> int:
        """The daemon's resident memory in bytes."""
        status = Path(f"/proc/{self.daemon.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024

    def counter(self, name: str, **labels: str) -> float:
        return self.daemon.metric(name, **labels) or 0.0

    def order_acknowledged(self) -> str:
        """An ORM^O01 through a real MLLP client: the MSA-1 it got."""
        control = f"R{next(self.control_ids)}"
        message = "\r".join(
            [
                f"MSH|^~\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124090000||ORM^O01|{control}|P|2.5.1",
                "PID|1||MRN-R1^^^TESTHOSP||Robust^Rita||19800101|F",
                f"ORC|NW|PO-{control}|FO-{control}||SC||^^^20261124090000^^R",
                f"OBR|1|PO-{control}|FO-{control}|CTABD^CT Abdomen^LOCAL||||||||||||||A-{control}||||||CT",
            ]
        )
        with MLLPClient("127.0.0.1", self.daemon.hl7_port) as client:
            client.socket.settimeout(30)
            ack = client.send_message(message.encode()).decode()
        return ack.split("MSA|")[1].split("|")[0]

    def alive(self) -> None:
        """O1: C-ECHO, an ORM answered AA, /healthz 200."""
        assert self.daemon.process.poll() is None, self.daemon.log.read_text()[-3000:]
        echo(Peer("FABRICATORD", "127.0.0.1", self.daemon.port), "ORACLE", Timeouts(5, 5, 5, 5))  # raises unless 0x0000
        assert self.order_acknowledged() == "AA"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.daemon.http_port}/healthz", timeout=10) as response:
            assert response.status == 200

    def check(
        self, reason: str | None = None, before: float = 0.0, label: str = "fabricatord_protocol_errors_total"
    ) -> None:
        """O1, O3, O4, O5 (when `reason` names the label the input must be counted under) and O6."""
        self.alive()
        # O3 and O4: temporary files gone, threads, descriptors and the slot given back.
        deadline = time.monotonic() + SETTLE
        while True:
            threads, files = self.resources()
            tmp = count(self.daemon.data_dir / "tmp")
            active = self.counter("fabricatord_associations_active")
            settled = threads <= self.threads and files <= self.files + 1 and tmp == 0 and active == 0
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert tmp == 0, sorted(os.listdir(self.daemon.data_dir / "tmp"))
        assert active == 0
        assert threads <= self.threads, f"{threads} threads, {self.threads} when idle"
        assert files <= self.files + 1, f"{files} open files, {self.files} when idle"
        # O2 and O3: every row has its complete file, and every stored file its row.
        rows = self.daemon.rows()
        assert {path for path, _ in rows.values()} == self.daemon.files()
        storage = self.daemon.data_dir / "storage"
        assert all((storage / path).stat().st_size == size for path, size in rows.values())
        # O5: counted under its reason and logged with it.
        if reason is not None:
            assert self.counter(label, reason=reason) > before, f"{label}{{reason={reason}}} did not move"
            assert f'"why": "{reason}' in self.daemon.log.read_text()
        # O6: nothing outside data_dir but the configuration and the logs (one per start).
        written = {p.name for p in self.folder.iterdir() if p.suffix != ".log"}
        assert written == {"data", "fabricatord.toml"}, written


DICOM_SETTINGS = 'max_dataset_size = "1MiB"\nnetwork_timeout = "3s"\nacse_timeout = "3s"\n'
"""The node's [dicom] settings; a module sets its own `DICOM_SETTINGS` (and `HL7_SETTINGS`,
`EXTRA_SETTINGS` for the sections after [synth])."""


def start_node(
    folder: Path,
    dicom: str = DICOM_SETTINGS,
    extra: str = "",
    hl7: str = "",
    name: str = "daemon",
    env: dict[str, str] | None = None,
) -> Node:
    """A daemon with JSON logs (in `folder`/`name`.log), and its idle baseline once its pools and
    connections are up. Started again on the same folder, it finds the data of the one before."""
    daemon = launch(folder, name, '[log]\nformat = "json"\n' + extra, env, dicom, hl7_extra=hl7)
    node = Node(daemon, folder, 0, 0, iter(range(1, 1_000_000)))
    for _ in range(3):  # thread pools and database connections are up: that is the idle baseline
        node.alive()
    with contextlib.suppress(urllib.error.HTTPError):  # the reactor's thread pool, which /readyz starts
        urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=10).close()
    time.sleep(1)
    node.threads, node.files = node.resources()
    return node


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = start_node(
        tmp_path_factory.mktemp("robust"),
        getattr(request.module, "DICOM_SETTINGS", DICOM_SETTINGS),
        getattr(request.module, "EXTRA_SETTINGS", ""),
        getattr(request.module, "HL7_SETTINGS", ""),
    )
    yield node
    halt(node.daemon)


@pytest.fixture
def counted(node: Node) -> Callable[[str], float]:
    """A counter's value for one reason before the input is sent."""
    return lambda reason: node.counter("fabricatord_protocol_errors_total", reason=reason)
