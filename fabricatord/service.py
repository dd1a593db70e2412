"""The composition root: builds every part from settings, starts them in order, stops them in reverse.

The daemon opens (and migrates) the database, settles storage left by a crash, starts the
audit trail's writer, runs the DICOM node, the MLLP listener, the simulated modality and the
router, and serves `/metrics`, `/healthz`, the API and the console over HTTP.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import platform
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints, reactor
from twisted.internet.task import LoopingCall

from fabricatord import __version__
from fabricatord.config import ConfigError, Settings, load
from fabricatord.config.values import parse_duration, parse_size
from fabricatord.db import Database, InstanceIndex, open_database
from fabricatord.db.audit import AuditLog
from fabricatord.db.engine import MigrationFailed
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.hl7.mapping import profile_problems
from fabricatord.obs import metrics
from fabricatord.obs.logging import configure, get_logger
from fabricatord.obs.systemd import notify, watchdog_interval
from fabricatord.servers.dicom import DicomNode
from fabricatord.servers.http import Department, site
from fabricatord.servers.mllp import MllpListener
from fabricatord.synth.checks import settings_problems
from fabricatord.workflow.access import Directory
from fabricatord.workflow.acquisition import Acquirer
from fabricatord.workflow.audit import AuditTrail
from fabricatord.workflow.hl7 import Inbox
from fabricatord.workflow.monitor import Monitor
from fabricatord.workflow.presence import Presence
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


def storage_writer(settings: Settings, database: Database, rules: Rules | None = None) -> InstanceWriter:
    """The atomic writer over `data_dir/storage`, as the settings shape it."""
    # Routes queue their jobs in the transaction that indexes each instance, whoever stores it
    # (the node, the simulated modality, `fabricatord generate`); the daemon's router sends them.
    rules = rules if rules is not None else Rules(settings)
    return InstanceWriter(
        InstanceIndex(database, on_indexed=rules.enqueue, node=settings.node_name),
        settings.storage_dir,
        settings.tmp_dir,
        settings.dicom.storage_layout,
        settings.dicom.duplicates,
        parse_size(settings.dicom.storage_quota),
        parse_size(settings.dicom.min_free_space),
    )


class _Reloadable(Protocol):
    def reload(self, settings: Settings) -> None: ...


def build(settings: Settings, reactor_: Any = reactor) -> tuple[MultiService, list[_Reloadable]]:
    """Every part of the daemon as one service tree, and the parts a SIGHUP gives new settings."""
    database = open_database(settings.database_url, migrate_in_child=True)
    presence = Presence(database, settings.node_name, timedelta(seconds=parse_duration(settings.node.lease)))
    presence.join()  # before storage recovery and job claims: refuses a second process of this name
    rules = Rules(settings)
    writer = storage_writer(settings, database, rules)
    report = writer.recover()
    log.info(
        "storage recovered",
        temporary_files_removed=report.temporary_files_removed,
        orphans_removed=report.orphans_removed,
        rows_refreshed=report.rows_refreshed,
    )
    root = MultiService()
    _WorkerService(presence).setServiceParent(root)  # first started, last stopped: it signs off
    audit = AuditTrail(database)
    _WorkerService(audit).setServiceParent(root)
    acquirer = Acquirer(settings, database, writer)
    node = DicomNode(settings, database, writer, audit, on_due=acquirer.wake)
    node.setServiceParent(root)
    inbox = Inbox(settings, database, on_due=acquirer.wake)
    mllp = MllpListener(settings, inbox, reactor_)
    mllp.setServiceParent(root)
    _WorkerService(acquirer).setServiceParent(root)  # after the node: it sends MPPS to it
    router = Router(settings, database)
    _WorkerService(router).setServiceParent(root)
    monitor = Monitor(settings, database, leading=lambda: presence.leader)
    _WorkerService(monitor).setServiceParent(root)
    http = endpoints.TCP4ServerEndpoint(reactor_, settings.http.port, interface=settings.http.host)
    listeners = {
        "dicom": f"{settings.dicom.host}:{settings.dicom.port}",
        "mllp": f"{settings.hl7.host}:{settings.hl7.port}",
        "http": f"{settings.http.host}:{settings.http.port}",
    }
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
    )
    StreamServerEndpointService(http, site(department)).setServiceParent(root)
    return root, [rules, node, inbox, acquirer, router, monitor, department]


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
    """Start the tree, run until SIGTERM or SIGINT, stop it in reverse order."""
    cap_malloc_arenas()
    metrics.BUILD_INFO.labels(__version__).set(1)
    the_reactor: Any = reactor
    try:
        lock = hold_data_dir(settings.node.data_dir, settings.node_name if settings.shared else "")
        root, reloadable = build(settings)
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
        http=f"{settings.http.host}:{settings.http.port}",
        mllp=f"{settings.hl7.host}:{settings.hl7.port}",
    )
    signal.signal(signal.SIGHUP, lambda *_: the_reactor.callFromThread(_reload, settings, reloadable))
    notify("READY=1", f"STATUS=serving DICOM on {settings.dicom.port}, MLLP on {settings.hl7.port}")
    interval = watchdog_interval()
    if interval is not None:
        LoopingCall(notify, "WATCHDOG=1").start(interval, now=True)
    the_reactor.run()
    log.info("fabricatord stopped")
    os.close(lock)
    return 0


def _reload(current: Settings, parts: list[_Reloadable]) -> None:
    """SIGHUP: peers, routes, mapping profiles, synth and log level from the file again; an
    invalid file changes nothing. Ports, data_dir and the database take effect at a restart."""
    notify("RELOADING=1", "STATUS=reloading the configuration")
    try:
        fresh = load(current.source, checks=[settings_problems, profile_problems])
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("configuration not reloaded", problem=str(problem))
    else:
        configure(fresh.log.level, fresh.log.format, fresh.log.phi, fresh.node_name)
        for part in parts:
            part.reload(fresh)
        log.info("configuration reloaded", source=str(current.source), peers=len(fresh.peers), routes=len(fresh.routes))
    notify("READY=1", "STATUS=serving")


def _stopping() -> None:
    notify("STOPPING=1", "STATUS=stopping: finishing what is in flight")
