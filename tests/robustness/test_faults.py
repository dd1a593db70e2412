"""The faults of ROBUSTNESS.md: kill -9 at every point of a C-STORE and of an HL7 message, a
second daemon on the same data_dir, a full disk, a locked database, an interrupted migration,
SIGTERM under load, a blocked reactor, invalid configuration. Each test kills or starves a real
daemon, starts it again on the same data_dir where that is the point, and checks the oracles:
what was acknowledged is kept, nothing half-done is, and the daemon serves again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fabricatord.servers.dicom.store import SPOOL_LIMIT
from tests.conftest import free_port, need, run_cli, wait_for_echo
from tests.integration.conftest import DCMTK_ENV, halt, launch
from tests.robustness.conftest import DICOM_SETTINGS, Node, start_node
from tests.robustness.dimse import ROOT, associated, instance, store
from tests.robustness.mllp import START, Link, framed, order
from tests.robustness.wire import CT_IMAGE_STORAGE, Response, encode, p_data, pdv, store_rq

JSON_LOG = '[log]\nformat = "json"\n'
MIB = 2**20


@pytest.fixture
def restarted() -> Iterator[list[Node]]:
    """The nodes a test starts; each is stopped at the end, whatever happened."""
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        halt(node.daemon)


@pytest.mark.parametrize(
    "point",
    ["mid-transfer", "store.after_tmp_write", "store.after_rename", "store.after_commit", "after-response"],
)
def test_kill_9_during_a_c_store_keeps_what_was_answered_and_nothing_half_done(
    tmp_path: Path, restarted: list[Node], point: str
) -> None:
    """Write order: temporary file → fsync → rename (a link, for a received file) → fsync of the
    folder → commit → response. Killed anywhere, the restart sweeps data_dir/tmp and settles
    what was left; the sender's resend is then stored once."""
    uid = f"{ROOT}.40.{abs(hash(point)) % 1000}"
    data = encode(instance(uid, Rows=256, Columns=256, BitsAllocated=16, PixelData=bytes(131072)))
    env = {"FABRICATORD_FAULTPOINT": f"{point}:kill"} if point.startswith("store.") else None
    # Mid-transfer sends more than the node holds in memory: past the usual 1 MiB cap.
    settings = DICOM_SETTINGS.replace('"1MiB"', '"4MiB"') if point == "mid-transfer" else DICOM_SETTINGS
    daemon = launch(tmp_path, "crashing", JSON_LOG, env, settings)
    try:
        with associated(daemon.port) as wire:
            if point == "mid-transfer":
                # Past what the node holds in memory (SPOOL_LIMIT), so that the part is in data_dir/tmp.
                big = encode(instance(uid, Rows=1024, Columns=1024, BitsAllocated=16, PixelData=bytes(2 << 20)))
                wire.send(p_data(pdv(1, 3, store_rq(CT_IMAGE_STORAGE, uid))))
                for offset in range(0, SPOOL_LIMIT + 65536, 65536):
                    wire.send(p_data(pdv(1, 0, big[offset : offset + 65536])))
                deadline = time.monotonic() + 10
                while not list((daemon.data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert list((daemon.data_dir / "tmp").iterdir())
                daemon.process.kill()
            elif point == "after-response":
                assert store(wire, uid, data).status == 0x0000
                daemon.process.kill()
            else:
                wire.request(1, store_rq(CT_IMAGE_STORAGE, uid), data)
                answer = wire.response()
                assert not isinstance(answer, Response), "answered although it died before the response"
        assert daemon.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        halt(daemon)
    node = start_node(tmp_path, name="restarted")
    restarted.append(node)
    committed = point in ("store.after_commit", "after-response")
    assert (uid in node.daemon.rows()) == committed
    node.check()  # O2, O3: rows and files agree, data_dir/tmp swept
    with associated(node.daemon.port) as wire:
        assert store(wire, uid, data).status == 0x0000  # the sender's resend
    assert list(node.daemon.rows()).count(uid) == 1
    node.check()


def test_what_a_crash_leaves_in_data_dir_tmp_is_swept_at_start(tmp_path: Path, restarted: list[Node]) -> None:
    tmp = tmp_path / "data" / "tmp"
    tmp.mkdir(parents=True)
    for name in ("tmpk3j4h5.dcm", f"{ROOT}.41.1.123.456.part", f"{ROOT}.1~{ROOT}.1.1~{ROOT}.41.2.dcm.7.8.part"):
        (tmp / name).write_bytes(b"left by a crash")
    node = start_node(tmp_path)
    restarted.append(node)
    assert list(tmp.iterdir()) == []
    recovered = [json.loads(line) for line in node.daemon.log.read_text().splitlines() if "storage recovered" in line]
    assert recovered[0]["temporary_files_removed"] == 3
    node.check()


@pytest.mark.parametrize("point", ["frame-partly-read", "hl7.before_commit", "hl7.after_commit"])
def test_kill_9_during_hl7_then_the_resend_gets_its_ack_and_one_worklist_item(
    tmp_path: Path, restarted: list[Node], point: str
) -> None:
    message = order("KILL1", "ACCKILL1")
    env = {"FABRICATORD_FAULTPOINT": f"{point}:kill"} if point.startswith("hl7.") else None
    daemon = launch(tmp_path, "crashing", JSON_LOG, env, DICOM_SETTINGS)
    try:
        with Link(daemon.hl7_port) as link:
            if point == "frame-partly-read":
                link.send(START + message[:60])
                time.sleep(0.3)
                daemon.process.kill()
            else:
                link.send(framed(message))
            assert link.frames(1) == []  # no ACK: the process died first
        assert daemon.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        halt(daemon)
    node = start_node(tmp_path, name="restarted")
    restarted.append(node)
    with Link(node.daemon.hl7_port) as link:
        ack = link.ack(message)
    assert (ack.code, ack.control_id) == ("AA", "KILL1")
    if point == "hl7.after_commit":  # kept before the crash: the resend gets the stored ACK
        (stored,) = (row[0] for row in _query(node, "SELECT ack FROM hl7_messages WHERE control_id = 'KILL1' LIMIT 1"))
        assert stored.decode() == ack.text
    assert len(_query(node, _STEPS, "ACCKILL1")) == 1
    node.check()


_STEPS = (
    "SELECT s.id FROM scheduled_steps s JOIN requested_procedures p ON s.procedure_pk = p.id "
    "JOIN orders o ON p.order_pk = o.id WHERE o.accession_number = ?"
)


def _query(node: Node, sql: str, *values: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(node.daemon.data_dir / "fabricatord.sqlite") as connection:
        return list(connection.execute(sql, values))


def test_a_second_daemon_on_the_same_data_dir_refuses_to_start(node: Node, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(
        f'[node]\ndata_dir = "{node.daemon.data_dir}"\n[dicom]\nport = 0\n[hl7]\nport = 0\n[http]\nport = 0\n'
    )
    second = run_cli("serve", "--config", str(other), check=False, timeout=60)
    assert second.returncode == 1
    assert f"in use by another fabricatord (pid {node.daemon.process.pid})" in second.stdout + second.stderr
    node.check()


def test_sqlite_runs_wal_and_keeps_its_journal_mode(node: Node) -> None:
    """synchronous=FULL is set per connection (tests/unit/test_db.py reads it on the daemon's
    engine); the journal mode is the file's own."""
    (mode,) = _query(node, "PRAGMA journal_mode")[0]
    assert mode == "wal"
    node.check()


def test_a_full_disk_is_a700_and_ar_207_readyz_degraded_and_served_again_when_space_returns(
    tmp_path: Path, restarted: list[Node]
) -> None:
    """Real space taken and given back on the data_dir's own file system, no restart: the
    watermark sits 256 MiB below what is free, and a 512 MiB file crosses it."""
    free = shutil.disk_usage(tmp_path).free
    if free < 2048 * MIB:
        pytest.skip(f"{free // MIB} MiB free: too little to fill and give back")
    node = start_node(tmp_path, env={"FABRICATORD__DICOM__MIN_FREE_SPACE": f"{free // MIB - 256}MiB"})
    restarted.append(node)
    uids = [f"{ROOT}.42.{n}" for n in range(3)]
    with associated(node.daemon.port) as wire:
        assert store(wire, uids[0], encode(instance(uids[0]))).status == 0x0000
    filler = tmp_path / "data" / "filler"
    with filler.open("wb") as sink:
        os.posix_fallocate(sink.fileno(), 0, 512 * MIB)
    try:
        with associated(node.daemon.port) as wire:
            refused = store(wire, uids[1], encode(instance(uids[1])))
        assert refused.status == 0xA700 and "watermark" in refused.comment
        with Link(node.daemon.hl7_port) as link:
            ack = link.ack(order("FULL1", "ACCFULL1"))
        assert ack.code == "AR" and ack.errors[0].startswith("ERR|||207^") and "min_free_space" in ack.errors[0]
        assert _readyz(node) == (503, {"database": True, "dicom": True, "mllp": True, "storage": False})
        assert node.counter("fabricatord_storage_write_failures_total", reason="disk_full") == 1
        assert list((node.daemon.data_dir / "tmp").iterdir()) == []
    finally:
        filler.unlink()
    assert _readyz(node)[0] == 200
    with associated(node.daemon.port) as wire:
        assert store(wire, uids[1], encode(instance(uids[1]))).status == 0x0000
        assert store(wire, uids[2], encode(instance(uids[2])), message_id=2).status == 0x0000
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(order("FULL1", "ACCFULL1")).code == "AA"  # the sender's retry, unchanged
    assert set(uids) <= set(node.daemon.rows())
    node.check()


def _readyz(node: Node) -> tuple[int, dict[str, bool]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.daemon.http_port}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())["checks"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["checks"]


def test_a_database_locked_past_the_busy_timeout_is_a700_and_ar_206_and_the_retries_succeed(node: Node) -> None:
    uid = f"{ROOT}.43.1"
    blocker = sqlite3.connect(node.daemon.data_dir / "fabricatord.sqlite", isolation_level=None)
    answers: dict[str, object] = {}

    def stored() -> None:
        with associated(node.daemon.port) as wire:
            answers["c-store"] = store(wire, uid, encode(instance(uid)))

    try:
        blocker.execute("BEGIN IMMEDIATE")  # held past the daemon's 10 s busy timeout
        sender = threading.Thread(target=stored)
        sender.start()
        with Link(node.daemon.hl7_port) as link:
            answers["hl7"] = link.ack(order("LOCK1", "ACCLOCK1"))
        sender.join(timeout=60)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    refused = answers["c-store"]
    assert isinstance(refused, Response)
    assert (refused.status, refused.comment) == (0xA700, "the database is busy: send it again")
    ack = answers["hl7"]
    assert ack.code == "AR" and ack.errors[0].startswith("ERR|||206^")  # type: ignore[attr-defined]
    assert uid not in node.daemon.rows()
    with associated(node.daemon.port) as wire:
        assert store(wire, uid, encode(instance(uid))).status == 0x0000
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(order("LOCK1", "ACCLOCK1")).code == "AA"
    assert len(_query(node, _STEPS, "ACCLOCK1")) == 1
    node.check("database_busy", 0, "fabricatord_storage_write_failures_total")


def test_an_interrupted_migration_is_rolled_back_and_the_daemon_names_the_fix(
    tmp_path: Path, restarted: list[Node]
) -> None:
    config = tmp_path / "fabricatord.toml"
    config.write_text('[node]\ndata_dir = "data"\n[dicom]\nport = 0\n[hl7]\nport = 0\n[http]\nport = 0\n' + JSON_LOG)
    failed = run_cli(
        "serve", "--config", str(config), env={"FABRICATORD_FAULTPOINT": "migrate.before_commit:kill"}, check=False
    )
    assert failed.returncode == 1
    [startup] = [json.loads(line) for line in failed.stderr.splitlines() if '"startup failed"' in line]
    assert startup["error"] == "the migration was killed by signal 9 and rolled back"
    assert startup["fix"].startswith(f"fabricatord migrate --config {config}")
    with sqlite3.connect(tmp_path / "data" / "fabricatord.sqlite") as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert tables == []  # rolled back: not one table of the schema, not the revision
    migrated = run_cli("migrate", "--config", str(config))
    assert migrated.stdout.startswith("database schema migrated from revision none to ")
    node = start_node(tmp_path)
    restarted.append(node)
    node.check()


def test_sigterm_under_load_exits_0_keeps_what_it_acknowledged_and_the_restart_resumes_routes(
    tmp_path: Path, restarted: list[Node], pacs: _Pacs
) -> None:
    extra = _route_to(pacs.port)
    node = start_node(tmp_path, extra=extra, env={"FABRICATORD__NODE__SHUTDOWN_GRACE": "5s"})
    restarted.append(node)
    uids = [f"{ROOT}.44.{n}" for n in range(40)]
    told: list[str] = []

    def stream() -> None:
        with contextlib.suppress(OSError, AssertionError), associated(node.daemon.port) as wire:
            for number, uid in enumerate(uids, 1):
                if store(wire, uid, encode(instance(uid)), message_id=number).status == 0x0000:
                    told.append(uid)

    sender = threading.Thread(target=stream)
    sender.start()
    with Link(node.daemon.hl7_port) as link:
        link.send(framed(*(order(f"TERM{n}", f"ACCTERM{n}") for n in range(200))))
        time.sleep(0.5)
        node.daemon.process.send_signal(signal.SIGTERM)
        acked = [ack.control_id for ack in link.frames(200) if ack.code == "AA"]
    sender.join(timeout=60)
    assert node.daemon.process.wait(timeout=60) == 0
    assert acked and told
    kept_orders = {row[0] for row in _query(node, "SELECT accession_number FROM orders")}
    assert {f"ACC{control}" for control in acked} <= kept_orders
    assert set(told) <= set(node.daemon.rows())
    pending = [row[0] for row in _query(node, "SELECT sop_instance_uid FROM route_jobs WHERE state != 'done'")]
    assert pending
    pacs.start()
    again = start_node(tmp_path, extra=extra, name="restarted")
    restarted.append(again)
    _wait(lambda: set(pending) <= pacs.received(), 90, "the routes resumed after the restart")
    again.check()


def test_a_blocked_reactor_stops_the_watchdog_pings(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(30)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "300000", "FABRICATORD_FAULTPOINT": "http.healthz:hang"}
        daemon = launch(tmp_path, "hanging", JSON_LOG, env, DICOM_SETTINGS)
        try:
            heard: list[str] = []
            while heard.count("WATCHDOG=1") < 3:
                heard += listener.recv(4096).decode().split("\n")
            with contextlib.suppress(OSError):  # the reactor blocks inside this request
                urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/healthz", timeout=1)
            listener.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                while True:
                    listener.recv(4096)  # pings sent before the reactor blocked
            listener.settimeout(2.0)  # more than six watchdog intervals
            with pytest.raises(TimeoutError):
                listener.recv(4096)
        finally:
            halt(daemon)


def test_an_invalid_configuration_exits_78_at_start_and_is_refused_at_sighup(node: Node, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 70000\n")
    started = run_cli("serve", "--config", str(bad), check=False, timeout=60)
    assert started.returncode == 78
    assert str(bad) in started.stderr and "dicom.port" in started.stderr
    good = node.daemon.config.read_text()
    node.daemon.config.write_text(good.replace('max_dataset_size = "1MiB"', 'max_dataset_size = "lots"'))
    try:
        node.daemon.process.send_signal(signal.SIGHUP)
        _wait(lambda: "configuration not reloaded" in node.daemon.log.read_text(), 20, "the reload refused")
    finally:
        node.daemon.config.write_text(good)
    refusal = [json.loads(line) for line in node.daemon.log.read_text().splitlines() if "not reloaded" in line][-1]
    assert "dicom.max_dataset_size: expected a size" in refusal["problem"]
    node.check()


# --- route destinations that fail ---------------------------------------------------------------


def _route_to(port: int, attempts: int = 8, ae: str = "PACS") -> str:
    return (
        f'[[peers]]\nname = "pacs"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
        f'[[routes]]\nname = "all"\nmatch = {{}}\nto = ["pacs"]\nattempts = {attempts}\n'
    )


ROUTING = 'dimse_timeout = "3s"\n'


class _Pacs:
    """DCMTK storescp as a route destination, with its faults as options."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder / f"pacs-{self.port}"
        self.folder.mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> _Pacs:
        command = [need("storescp"), "-aet", "PACS", "-od", str(self.folder), *options, str(self.port)]
        self.process = subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_echo(self.port, "PACS", process=self.process)  # type: ignore[arg-type]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)

    def received(self) -> set[str]:
        """The SOP Instance UIDs of the files it kept (storescp names them CT.<uid>)."""
        return {path.name.split(".", 1)[1] for path in self.folder.iterdir() if path.name.startswith("CT.")}


@pytest.fixture
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pacs]:
    """Its folder lies outside the daemon's, which O6 checks."""
    destination = _Pacs(tmp_path_factory.mktemp("pacs"))
    yield destination
    destination.stop()


def _jobs(node: Node) -> list[tuple[str, int, str]]:
    """(state, attempts, last error) of every route job, oldest first."""
    return [(str(s), int(a), str(e)) for s, a, e in _query(node, "SELECT state, attempts, last_error FROM route_jobs")]  # type: ignore[call-overload]


def _routed_events(node: Node) -> list[dict[str, object]]:
    return [json.loads(line) for line in node.daemon.log.read_text().splitlines() if '"event": "routed"' in line]


def _routed(node: Node, *uids: str) -> None:
    with associated(node.daemon.port) as wire:
        for number, uid in enumerate(uids, 1):
            assert store(wire, uid, encode(instance(uid)), message_id=number).status == 0x0000


@pytest.mark.parametrize(
    "options", [("--sleep-during", "30"), ("--abort-during",)], ids=["hangs-mid-transfer", "aborts-mid-transfer"]
)
def test_a_destination_that_hangs_or_aborts_mid_transfer_is_retried_until_it_takes_the_study(
    tmp_path: Path, restarted: list[Node], pacs: _Pacs, options: tuple[str, ...]
) -> None:
    """DIMSE timeout (3 s here) and abort, then backoff with jitter: a transient failure."""
    pacs.start(*options)
    node = start_node(tmp_path, DICOM_SETTINGS + ROUTING, _route_to(pacs.port))
    restarted.append(node)
    uid = f"{ROOT}.45.{len(options)}"
    _routed(node, uid)
    # No response within the DIMSE timeout, or an abort; then the second association fails while
    # storescp sleeps or has gone. Each is transient: the job waits for its next attempt.
    _wait(lambda: _routed_events(node), 60, "a failed attempt, logged")
    first = _routed_events(node)[0]
    assert (first["sent"], first["retrying"], first["level"]) == (0, 1, "warning") and first["error"]
    assert _jobs(node)[0][0] in ("pending", "sending")
    pacs.stop()
    pacs.start()
    _wait(lambda: uid in pacs.received(), 90, "the study delivered once the destination behaves")
    _wait(lambda: _jobs(node)[0][0] == "done", 10, "the job done")
    node.check()


def test_a_destination_that_refuses_for_good_fails_the_job_at_once(tmp_path: Path, restarted: list[Node]) -> None:
    """A rejection with result 1 (permanent) would be met again: no retries, the dead letter at
    once, for `jobs retry` after someone fixed the cause."""
    (tmp_path / "strict").mkdir()
    (tmp_path / "router").mkdir()
    # It knows no peer: everyone, the oracles' C-ECHO too, is rejected 1/1/3.
    strict = launch(tmp_path / "strict", dicom_extra="require_known_ae = true\n", wait=False)
    try:
        route = _route_to(strict.port, ae="FABRICATORD")
        node = start_node(tmp_path / "router", DICOM_SETTINGS + ROUTING, route)
        restarted.append(node)
        _routed(node, f"{ROOT}.46.1")
        _wait(lambda: _jobs(node)[0][0] == "failed", 30, "the job failed")
    finally:
        halt(strict)
    _, attempts, why = _jobs(node)[0]
    assert attempts == 1 and why.startswith("refused for good:") and "rejected permanently (1/1/3)" in why
    node.check()


def test_a_destination_that_stays_down_ends_in_the_dead_letter_after_its_attempts(
    tmp_path: Path, restarted: list[Node]
) -> None:
    node = start_node(tmp_path, DICOM_SETTINGS + ROUTING, _route_to(free_port(), attempts=2))
    restarted.append(node)
    _routed(node, f"{ROOT}.47.1")
    _wait(lambda: _jobs(node)[0][0] == "failed", 60, "the job in the dead letter")
    _, attempts, why = _jobs(node)[0]
    assert attempts == 2 and why.startswith("gave up after 2 attempts:")
    listed = run_cli("jobs", "list", "routes", "--state", "failed", "--config", str(node.daemon.config)).stdout
    assert "failed" in listed and "r1" in listed
    node.check()


def test_a_warning_status_counts_as_delivered(tmp_path: Path, restarted: list[Node]) -> None:
    """A PACS that coerces attributes answers 0xB007: the instance is kept there, the job done."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    port = free_port()
    kept: list[str] = []

    def coerced(event: object) -> int:
        kept.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        return 0xB007

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, coerced)])
    try:
        node = start_node(tmp_path, DICOM_SETTINGS + ROUTING, _route_to(port))
        restarted.append(node)
        uid = f"{ROOT}.48.1"
        _routed(node, uid)
        _wait(lambda: _jobs(node) and _jobs(node)[0][0] == "done", 30, "the job done")
        assert kept == [uid]
        node.check()
    finally:
        server.shutdown()


def test_route_jobs_survive_kill_9_while_their_destination_is_down(
    tmp_path: Path, restarted: list[Node], pacs: _Pacs
) -> None:
    node = start_node(tmp_path, DICOM_SETTINGS + ROUTING, _route_to(pacs.port))
    restarted.append(node)
    uids = [f"{ROOT}.49.{n}" for n in range(3)]
    _routed(node, *uids)
    _wait(lambda: len(_jobs(node)) == 3 and all(a >= 1 for _, a, _ in _jobs(node)), 30, "three failed attempts")
    node.daemon.process.kill()
    node.daemon.process.wait(timeout=30)
    pacs.start()
    again = start_node(tmp_path, DICOM_SETTINGS + ROUTING, _route_to(pacs.port), name="restarted")
    restarted.append(again)
    _wait(lambda: set(uids) <= pacs.received(), 90, "every instance delivered after the restart")
    again.check()


def _wait(condition: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.2)
