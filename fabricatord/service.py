"""The composition root: builds every part from settings, starts them in order, stops them in reverse.

The daemon opens (and migrates) the database, settles storage left by a crash, starts the
audit trail's writer, runs the DICOM node, the MLLP listener, the simulated modality and the
router, and serves `/metrics`, `/healthz`, the API and the console over HTTP. With `[node]
workers` above one, a parent does the first two, binds the ports and starts the workers
(`servers/workers.py`): each accepts DICOM and MLLP; the first also serves HTTP and runs the jobs.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import platform
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection
from twisted.application.service import MultiService, Service
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from fabricatord import __version__
from fabricatord.config import ConfigError, Settings, load
from fabricatord.config.tls import client_context, enabled
from fabricatord.config.values import parse_duration, parse_size
from fabricatord.db import Database, IndexEntry, InstanceIndex, open_database
from fabricatord.db.audit import AuditLog
from fabricatord.db.engine import MigrationFailed, dispose_all
from fabricatord.dicom import scu
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.hl7.mapping import profile_problems
from fabricatord.obs import metrics
from fabricatord.obs.logging import configure, get_logger
from fabricatord.obs.systemd import notify, watchdog_interval
from fabricatord.servers.dicom import DicomNode
from fabricatord.servers.dicom.node import LISTEN_BACKLOG
from fabricatord.servers.http import Department, site
from fabricatord.servers.listen import Listening, open_listener
from fabricatord.servers.mllp import MllpListener
from fabricatord.servers.tls import of as tls_of
from fabricatord.servers.workers import BEAT_EVERY, Seat, Supervisor
from fabricatord.synth.checks import settings_problems
from fabricatord.workflow.access import Directory
from fabricatord.workflow.acquisition import Acquirer
from fabricatord.workflow.audit import AuditTrail
from fabricatord.workflow.commitment import Reporter, StorageCommitment
from fabricatord.workflow.fhir import Exporter, Exports
from fabricatord.workflow.hl7 import Inbox
from fabricatord.workflow.monitor import Monitor
from fabricatord.workflow.presence import Presence
from fabricatord.workflow.proxy import Proxies
from fabricatord.workflow.retention import Cleaner
from fabricatord.workflow.routing import Router, Rules

log = get_logger(__name__)
LOCK_FILE = "fabricatord.lock"


class _Worker(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class _WorkerService(Service):
    """A worker thread of the workflow (the audit writer, the simulated modality) as a service:
    started in tree order and stopped in reverse, so the audit writer outlives the listeners."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    def startService(self) -> None:
        self._worker.start()
        super().startService()

    def stopService(self) -> None:
        self._worker.stop()
        super().stopService()


QUOTA_RECOUNT = 1.0
"""On PostgreSQL other processes store too: the quota's count is at most this old (seconds)."""


def storage_writer(
    settings: Settings, database: Database, rules: Rules | None = None, exports: Exports | None = None
) -> InstanceWriter:
    """The atomic writer over `data_dir/storage`, as the settings shape it."""
    # Routes queue their jobs, and a received study's FHIR jobs move a stable age on, in the
    # transaction that indexes each instance, whoever stores it (the node, the simulated
    # modality, `fabricatord generate`); the daemon's router and exporter send them.
    rules = rules if rules is not None else Rules(settings)
    exports = exports if exports is not None else Exports(settings)

    def indexed(connection: Connection, entries: list[IndexEntry]) -> None:
        rules.enqueue(connection, entries)
        exports.arrived(connection, entries)

    return InstanceWriter(
        InstanceIndex(database, on_indexed=indexed, node=settings.node_name),
        settings.storage_dir,
        settings.tmp_dir,
        settings.dicom.storage_layout,
        settings.dicom.duplicates,
        parse_size(settings.dicom.storage_quota),
        parse_size(settings.dicom.min_free_space),
        settings.dicom.file_naming,
        QUOTA_RECOUNT if settings.shared else 0.0,
    )


def with_cleanup(
    settings: Settings, database: Database, writer: InstanceWriter, leading: Callable[[], bool] = lambda: True
) -> Cleaner:
    """With `[dicom] cleanup`, a store of `writer` that finds no room has the oldest eligible
    studies deleted; the cleaner, for its daily look (on the leader) and `fabricatord cleanup`."""
    cleaner = Cleaner(settings, database, writer, leading)
    writer.reclaim, writer.cleanup_on = cleaner.make_room, cleaner.enabled
    return cleaner


class _Reloadable(Protocol):
    def reload(self, settings: Settings) -> None: ...


def _presence(settings: Settings, database: Database, pid: int | None = None) -> Presence:
    return Presence(database, settings.node_name, timedelta(seconds=parse_duration(settings.node.lease)), pid)


def _recover(writer: InstanceWriter) -> None:
    report = writer.recover()
    log.info(
        "storage recovered",
        temporary_files_removed=report.temporary_files_removed,
        orphans_removed=report.orphans_removed,
        rows_refreshed=report.rows_refreshed,
    )


def build(
    settings: Settings, reactor_: Any = reactor, seat: Seat | None = None
) -> tuple[MultiService, list[_Reloadable]]:
    """Every part of the daemon as one service tree, and the parts a SIGHUP gives new settings.
    A worker process (`seat`) has storage settled and the name taken by its parent; only the
    first worker serves HTTP and runs jobs and periodic work."""
    database = open_database(settings.database_url, migrate_in_child=True)
    root = MultiService()
    first = seat is None or seat.first
    presence = _presence(settings, database, seat.parent if seat else None) if first else None
    if presence is not None:
        presence.join()  # before storage recovery and job claims: refuses a second process of this name
        _WorkerService(presence).setServiceParent(root)  # first started, last stopped: it signs off
    rules, exports = Rules(settings), Exports(settings)
    writer = storage_writer(settings, database, rules, exports)
    if seat is None:
        _recover(writer)
    # One cleaner makes room for every store of this process and, on the leader, looks daily.
    cleaner = with_cleanup(settings, database, writer, lambda: presence is not None and presence.leader)
    audit = AuditTrail(database)
    _WorkerService(audit).setServiceParent(root)
    acquirer = Acquirer(settings, database, writer, exports) if first else None
    # Another worker's new order or fetched step waits for the first worker's next look (a second).
    on_due = acquirer.wake if acquirer is not None else _nothing
    inherited = seat.listeners if seat is not None else None
    counts = seat.counts() if seat is not None else None
    proxies = Proxies(settings, database)  # every key checked before anything is accepted
    # One TLS context for every listener of this process, made again on SIGHUP.
    server_tls = tls_of(settings)
    scu.use_tls(client_context(settings.tls) if enabled(settings.tls) else None)
    commitments = StorageCommitment(settings, database)
    node = DicomNode(
        settings,
        database,
        writer,
        audit,
        on_due,
        inherited=inherited,
        tls=server_tls,
        counts=counts,
        proxies=proxies,
        exports=exports,
        commitments=commitments,
    )
    node.setServiceParent(root)
    inbox = Inbox(settings, database, on_due=on_due)
    mllp = MllpListener(settings, inbox, reactor_, inherited=inherited, counts=counts, tls=server_tls)
    mllp.setServiceParent(root)
    reloadable: list[_Reloadable] = [
        rules, exports, node, inbox, cleaner, commitments, *([server_tls] if server_tls else [])
    ]  # fmt: skip
    if acquirer is None or presence is None:
        return root, reloadable
    _WorkerService(acquirer).setServiceParent(root)  # after the node: it sends MPPS to it
    router = Router(settings, database, commitments)
    _WorkerService(router).setServiceParent(root)
    _WorkerService(Reporter(commitments)).setServiceParent(root)
    exporter = Exporter(settings, database)
    _WorkerService(exporter).setServiceParent(root)
    monitor = Monitor(settings, database, leading=lambda: presence.leader)
    _WorkerService(monitor).setServiceParent(root)
    _WorkerService(cleaner).setServiceParent(root)
    listeners = {name: f"{section.host}:{port}" for name, section, port in _ports(settings)}
    checks = [("dicom", lambda: node.listening), ("mllp", lambda: mllp.listening), ("storage", writer.has_room)]
    department = Department(
        settings,
        database,
        Directory(database, parse_duration(settings.http.session_idle)),
        AuditLog(database),
        writer,
        acquirer.wake,
        listeners,
        checks,
        proxies=proxies,
    )
    _HttpService(settings, site(department), reactor_, Listening("http", inherited), server_tls).setServiceParent(root)
    return root, [*reloadable, acquirer, router, exporter, monitor, department]


def _nothing() -> None:
    pass


def _serving(settings: Settings) -> str:
    """The systemd STATUS line: which ports serve what."""
    return ", ".join(f"{name.upper().replace('-TLS', ' over TLS')} on {port}" for name, _, port in _ports(settings))


def _ports(settings: Settings) -> list[tuple[str, Any, int]]:
    """(name, section, port) of every port the settings open: plain unless `plain = false`, and
    `NAME-tls` beside it when `[tls]` has a certificate."""
    tls = enabled(settings.tls)
    found = []
    for name, section in (("dicom", settings.dicom), ("mllp", settings.hl7), ("http", settings.http)):
        if section.plain:
            found.append((name, section, section.port))
        if tls:
            found.append((f"{name}-tls", section, section.tls_port))
    return found


class _HttpService(Service):
    """The HTTP endpoint on its plain and HTTPS ports."""

    def __init__(self, settings: Settings, factory: Any, reactor_: Any, listening: Listening, tls: Any) -> None:
        self._settings, self._factory, self._reactor, self._listening, self._tls = (
            settings,
            factory,
            reactor_,
            listening,
            tls,
        )

    def startService(self) -> None:
        self._listening.open(self._reactor, self._factory, self._settings.http, self._tls)
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self._listening.close()


class DataDirInUse(RuntimeError):
    """Another fabricatord serves from this data_dir."""


def hold_data_dir(data_dir: Path, node: str = "") -> int:
    """An exclusive lock for as long as the process lives (the kernel lets go of it when the
    process dies, however it dies): on data_dir/fabricatord.lock, or with `node` (several
    daemons on one PostgreSQL, sharing the folder) on data_dir/fabricatord.NODE.lock. A second
    daemon in its place would sweep the first one's temporary files and settle its storage
    intents as leftovers of a crash: it refuses to start instead. The file holds the holder's PID."""
    data_dir.mkdir(parents=True, exist_ok=True)
    name = f"fabricatord.{node}.lock" if node else LOCK_FILE
    fd = os.open(data_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirInUse(f"data_dir {data_dir} is in use by another fabricatord (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


# glibc's M_ARENA_MAX (malloc.h); two arenas, the figure MALLOC_ARENA_MAX=2 sets.
_M_ARENA_MAX = -8
_MALLOC_ARENAS = 2


def cap_malloc_arenas() -> bool:
    """Every association runs on a short-lived thread of its own, and glibc gives threads up to
    eight arenas per core that it rarely returns: in a ten-minute soak the resident set grew
    20 % with them and under 9 % with two. Called before any thread starts; a MALLOC_ARENA_MAX
    the operator set wins, and other C libraries are left alone."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, _MALLOC_ARENAS))


def run(settings: Settings) -> int:
    """Start the tree, run until SIGTERM or SIGINT, stop it in reverse order. With `[node]
    workers` above one, this process becomes their parent (`supervise`); in a worker, the
    parent's lock covers the data_dir."""
    seat = Seat.from_environ(os.environ)
    if seat is None and settings.node.workers > 1:
        return supervise(settings)
    if seat is not None:
        seat.settle_in()
        _configure_logging(settings, seat)
    cap_malloc_arenas()
    metrics.BUILD_INFO.labels(__version__).set(1)
    the_reactor: Any = reactor
    lock = None
    try:
        if seat is None:
            lock = hold_data_dir(settings.node.data_dir, settings.node_name if settings.shared else "")
        root, reloadable = build(settings, seat=seat)
        root.startService()
    except MigrationFailed as exc:
        command = f"fabricatord migrate --config {settings.source}" if settings.source else "fabricatord migrate"
        log.error("startup failed", error=str(exc), fix=f"{command} shows the whole error; a start migrates again")
        return 1
    except Exception as exc:  # a port in use, an unwritable data_dir, a newer database: one clear line
        log.error("startup failed", error=str(exc))
        return 1
    the_reactor.addSystemEventTrigger("before", "shutdown", _stopping)
    the_reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    # Everything built so far (pydicom's dictionaries, SQLAlchemy's mappers, Twisted) lives as
    # long as the process: out of the collector's sight, a full collection no longer walks it.
    # Each HL7 message makes a few hundred short-lived objects; this made the listener about a
    # third faster and cut its slowest answers by more than half.
    gc.freeze()
    log.info(
        "fabricatord started",
        version=__version__,
        data_dir=str(settings.node.data_dir),
        **{name.replace("-", "_"): f"{section.host}:{port}" for name, section, port in _ports(settings)},
        worker=seat.index if seat is not None else None,
    )
    signal.signal(signal.SIGHUP, lambda *_: the_reactor.callFromThread(_reload, settings, reloadable, seat))
    if seat is not None:
        seat.ready()
        LoopingCall(seat.beat).start(BEAT_EVERY, now=False)
        _stop_once_on_signals(the_reactor)
    notify("READY=1", f"STATUS=serving {_serving(settings)}")
    interval = watchdog_interval()
    if interval is not None:
        LoopingCall(notify, "WATCHDOG=1").start(interval, now=True)
    the_reactor.run()
    log.info("fabricatord stopped")
    if lock is not None:
        os.close(lock)
    return 0


def supervise(settings: Settings) -> int:
    """The parent of `[node] workers` processes: it takes the node's name and lock, settles
    storage, binds the ports and starts the workers; it passes SIGHUP on, stops them on SIGTERM,
    starts again one that dies, and tells systemd READY once all are, WATCHDOG while all turn."""
    the_reactor: Any = reactor
    try:
        lock = hold_data_dir(settings.node.data_dir, settings.node_name)
        database = open_database(settings.database_url, migrate_in_child=True)
        _presence(settings, database).join()  # the first worker renews it under this process's PID
        _recover(storage_writer(settings, database))
        dispose_all()  # the workers open their own connections
        listeners = {
            name: open_listener(section.host, port, LISTEN_BACKLOG) for name, section, port in _ports(settings)
        }
    except Exception as exc:  # a name or a port in use, a database away: one clear line
        log.error("startup failed", error=str(exc))
        return 1
    argv = [sys.executable, "-m", "fabricatord", "serve"]
    environ = dict(os.environ)
    if settings.source is not None:
        argv += ["--config", str(settings.source.resolve())]
    else:
        environ["FABRICATORD_CONFIG"] = ""  # the built-in defaults, as here
    supervisor = Supervisor(
        the_reactor,
        argv,
        environ,
        settings.node.workers,
        listeners,
        settings.tmp_dir / "associations",
        settings.tmp_dir / "metrics",
        parse_duration(settings.node.shutdown_grace),
        (lock,),
    )
    outcome = {"code": 0}

    def started(_: object) -> None:
        log.info(
            "fabricatord started",
            version=__version__,
            workers=settings.node.workers,
            pids=supervisor.pids,
            **{
                name.replace("-", "_"): "{}:{}".format(*listener.getsockname()[:2])
                for name, listener in listeners.items()
            },
        )
        notify("READY=1", f"STATUS=serving {_serving(settings)}")

    def failed(failure: Any) -> None:
        log.error("startup failed", error=failure.getErrorMessage())
        outcome["code"] = 1
        the_reactor.stop()

    def feed_watchdog() -> None:
        if supervisor.healthy:
            notify("WATCHDOG=1")

    the_reactor.callWhenRunning(lambda: supervisor.start().addCallbacks(started, failed))
    the_reactor.addSystemEventTrigger("before", "shutdown", _stopping)
    the_reactor.addSystemEventTrigger("before", "shutdown", supervisor.stop)
    interval = watchdog_interval()
    if interval is not None:
        LoopingCall(feed_watchdog).start(interval, now=False)

    def reload_workers() -> None:
        notify("RELOADING=1", "STATUS=reloading the configuration")
        supervisor.signal("HUP")
        notify("READY=1", "STATUS=serving")

    signal.signal(signal.SIGHUP, lambda *_: the_reactor.callFromThread(reload_workers))
    _stop_once_on_signals(the_reactor)
    the_reactor.run()
    log.info("fabricatord stopped", workers=settings.node.workers)
    os.close(lock)
    return outcome["code"]


def _stop_once_on_signals(the_reactor: Any) -> None:
    """SIGTERM and SIGINT stop the reactor once: a worker may get SIGTERM from its parent and
    from systemd, or SIGINT from a terminal as well."""
    asked: list[int] = []

    def stop(number: int, _frame: object) -> None:
        if not asked:
            asked.append(number)
            the_reactor.callFromThread(the_reactor.stop)

    def install() -> None:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    the_reactor.callWhenRunning(install)  # after Twisted's own, which it installs as it starts


def _configure_logging(settings: Settings, seat: Seat | None) -> None:
    log_settings = settings.log
    configure(
        log_settings.level, log_settings.format, log_settings.phi, settings.node_name, seat.index if seat else None
    )


def _reload(current: Settings, parts: list[_Reloadable], seat: Seat | None = None) -> None:
    """SIGHUP: peers, routes, mapping profiles, synth, log level and the TLS certificate files
    from the file again; an invalid file changes nothing. Ports (TLS ones too), data_dir and the
    database take effect at a restart."""
    notify("RELOADING=1", "STATUS=reloading the configuration")
    try:
        fresh = load(current.source, checks=[settings_problems, profile_problems])
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("configuration not reloaded", problem=str(problem))
    else:
        _configure_logging(fresh, seat)
        for part in parts:
            part.reload(fresh)
        try:  # new certificate files for the associations we open too; a broken one keeps the old
            scu.use_tls(client_context(fresh.tls) if enabled(fresh.tls) else None)
        except (OSError, ValueError) as exc:
            log.error("TLS client certificate not reloaded, the old one stays", error=str(exc))
        log.info("configuration reloaded", source=str(current.source), peers=len(fresh.peers), routes=len(fresh.routes))
    notify("READY=1", "STATUS=serving")


def _stopping() -> None:
    notify("STOPPING=1", "STATUS=stopping: finishing what is in flight")
