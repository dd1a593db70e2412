"""`[node] workers`: one daemon of several processes on the same ports, on a real PostgreSQL.
The workers share the listening sockets, one association limit, one `/metrics`; the parent
passes signals on, starts a killed worker again, and feeds systemd's watchdog only while every
worker's reactor turns."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import PostgresServer
from tests.integration.conftest import Daemon, generated, halt, launch, storescu
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import msa, order, send


@pytest.fixture
def workers(
    tmp_path: Path, postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Daemon]]:
    url = postgres_server.fresh_database(f"workers_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}")
    started: list[Daemon] = []

    def start(count: int = 2, dicom_extra: str = "", env: dict[str, str] | None = None) -> Daemon:
        daemon = launch(
            tmp_path,
            f"workers-{len(started)}",
            dicom_extra=dicom_extra,
            env={"FABRICATORD__NODE__WORKERS": str(count), "FABRICATORD__LOG__FORMAT": "json", **(env or {})},
            database_url=url,
        )
        started.append(daemon)
        # The first worker answers the launch's echo; the parent says when every one is ready.
        wait_for(lambda: any("workers" in record for record in lines(daemon, "fabricatord started")), 30)
        return daemon

    yield start
    for daemon in started:
        for pid in children(daemon):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        halt(daemon)


def children(daemon: Daemon) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(daemon.process.pid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def lines(daemon: Daemon, event: str) -> list[dict[str, object]]:
    found = []
    for line in daemon.log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


def hold(daemon: Daemon, count: int) -> list[object]:
    """`count` associations opened one after another and kept open."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = []
    for _ in range(count):
        association = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
        held.append(association)
    return held


def test_workers_share_the_ports_the_association_limit_and_the_metrics(
    workers: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = workers(2, dicom_extra="max_associations = 6\n")
    pids = children(daemon)
    assert len(pids) == 2

    # Six associations held open: both workers take some, and the seventh is one too many for
    # the daemon, whichever worker it reaches.
    held = hold(daemon, 6)
    try:
        assert all(a.is_established for a in held)  # type: ignore[attr-defined]
        served = {record["worker"] for record in lines(daemon, "association established")}
        assert served == {0, 1}
        assert daemon.metric("fabricatord_associations_active") == 6
        extra = hold(daemon, 1)[0]
        assert extra.is_rejected  # type: ignore[attr-defined]
        refused = lines(daemon, "association request refused")
        assert [(str(r["why"]).split(":")[0], r["reject"]) for r in refused] == [("max_associations", "2/3/2")]
    finally:
        for association in held:
            association.release()  # type: ignore[attr-defined]
    wait_for(lambda: daemon.metric("fabricatord_associations_active") == 0, 10)
    again = hold(daemon, 1)[0]
    assert again.is_established  # type: ignore[attr-defined]
    again.release()  # type: ignore[attr-defined]

    # The same files from four associations at once: every instance indexed once, its file
    # where its row says, and every store answered success.
    files = generated(tmp_path, "CT", 12)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: storescu(daemon.port, files), range(4)))
    assert all(result.returncode == 0 for result in results), [r.stderr for r in results]
    rows = daemon.rows()
    assert len(rows) == len(files)
    assert {path for path, _ in rows.values()} == daemon.files()
    assert daemon.metric("fabricatord_instances_stored_total", source="received", outcome="new") == len(files)
    assert daemon.metric("fabricatord_dimse_operations_total", service="C-STORE", peer="other", status="success") == (
        4 * len(files)
    )

    # HL7 on several connections at once, whichever worker takes each.
    with ThreadPoolExecutor(6) as pool:
        acks = list(pool.map(lambda n: send(daemon, order(f"W{n}", "NW", "SC", f"ACCW{n}")), range(12)))
    assert [msa(ack)[0] for ack in acks] == ["AA"] * 12
    assert daemon.query("SELECT count(*) FROM orders")[0][0] == 12
    assert daemon.metric("fabricatord_hl7_messages_total", type="ORM^O01", ack="AA") == 12

    # A worker killed is started again; what it counted is still counted.
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: len(children(daemon)) == 2 and pids[1] not in children(daemon), 20)
    assert lines(daemon, "worker ended; starting it again")[0]["outcome"] == "signal SIGKILL"
    wait_for(lambda: len(lines(daemon, "fabricatord started")) == 4, 30)  # two workers, the parent, the new one
    assert daemon.metric("fabricatord_dimse_operations_total", service="C-STORE", peer="other", status="success") == (
        4 * len(files)
    )
    again = hold(daemon, 1)[0]
    assert again.is_established  # type: ignore[attr-defined]
    again.release()  # type: ignore[attr-defined]

    # SIGHUP reaches every worker; SIGTERM stops them all and then the parent, cleanly.
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: {r["worker"] for r in lines(daemon, "configuration reloaded")} == {0, 1}, 10)
    survivors = children(daemon)
    log = daemon.stop()
    assert daemon.process.returncode == 0
    assert sorted(r["worker"] for r in lines(daemon, "worker stopped")) == [0, 1], log[-2000:]
    for pid in survivors:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_end_with_their_parent(workers: Callable[..., Daemon]) -> None:
    daemon = workers(2)
    pids = children(daemon)
    daemon.process.kill()
    daemon.process.wait(timeout=10)

    def ended() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(ended, 30)


def test_systemd_hears_from_the_parent_and_its_watchdog_waits_for_a_stalled_worker(
    workers: Callable[..., Daemon], tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.2)
    messages: list[tuple[float, str]] = []

    def drain(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                messages.append((time.monotonic(), listener.recv(4096).decode()))
            except TimeoutError:
                continue

    daemon = workers(2, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    try:
        drain(2)
        ready = [text for _, text in messages if "READY=1" in text]
        assert len(ready) == 1  # the parent, once every worker is ready; the workers say nothing
        assert any("WATCHDOG=1" in text for _, text in messages)
        stalled = children(daemon)[1]
        os.kill(stalled, signal.SIGSTOP)
        try:
            drain(7)  # the beat goes stale after five seconds
            stopped_at = time.monotonic()
            drain(3)
            assert not [t for at, t in messages if at > stopped_at and "WATCHDOG=1" in t]
        finally:
            os.kill(stalled, signal.SIGCONT)
        resumed_at = time.monotonic()
        drain(3)
        assert [t for at, t in messages if at > resumed_at and "WATCHDOG=1" in t]
    finally:
        listener.close()


def test_a_killed_worker_leaves_no_association_counted(workers: Callable[..., Daemon]) -> None:
    """The associations a dead worker held are free again at once: the parent clears its slot."""
    daemon = workers(2, dicom_extra="max_associations = 2\n")
    held = hold(daemon, 2)
    assert all(a.is_established for a in held)  # type: ignore[attr-defined]
    serving = sorted({record["worker"] for record in lines(daemon, "association established")})
    victim = children(daemon)[serving[-1]]  # a worker that holds at least one of them
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(daemon)) == 2 and victim not in children(daemon), 20)
    for association in held:
        association.abort()  # type: ignore[attr-defined]
    wait_for(lambda: daemon.metric("fabricatord_associations_active") == 0, 20)
    again = hold(daemon, 2)
    assert [a.is_established for a in again] == [True, True]  # type: ignore[attr-defined]
    for association in again:
        association.release()  # type: ignore[attr-defined]


def test_more_than_one_worker_on_sqlite_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "fabricatord.toml"
    config.write_text('[node]\ndata_dir = "data"\nworkers = 2\n')
    result = subprocess.run(
        [sys.executable, "-m", "fabricatord", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "FABRICATORD_CONFIG": ""},
        timeout=60,
    )
    assert result.returncode != 0
    assert "node.workers" in result.stderr and str(config) in result.stderr
