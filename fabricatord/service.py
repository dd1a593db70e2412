"""The composition root: builds every part from settings, starts them in order, stops them in reverse.

The daemon opens (and migrates) the database, settles storage left by a crash, starts the
audit trail's writer, runs the DICOM node, the MLLP listener, the simulated modality and the
router, and serves `/metrics` and `/healthz` over HTTP.
"""

from __future__ import annotations

import gc
from typing import Any, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints, reactor

from fabricatord import __version__
from fabricatord.config import Settings
from fabricatord.config.values import parse_size
from fabricatord.db import Database, InstanceIndex, open_database
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger
from fabricatord.servers.dicom import DicomNode
from fabricatord.servers.http import site
from fabricatord.servers.mllp import MllpListener
from fabricatord.workflow.acquisition import Acquirer
from fabricatord.workflow.audit import AuditTrail
from fabricatord.workflow.hl7 import Inbox
from fabricatord.workflow.routing import Router, Rules

log = get_logger(__name__)


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


def storage_writer(settings: Settings, database: Database) -> InstanceWriter:
    """The atomic writer over `data_dir/storage`, as the settings shape it."""
    # Routes queue their jobs in the transaction that indexes each instance, whoever stores it
    # (the node, the simulated modality, `fabricatord generate`); the daemon's router sends them.
    rules = Rules(settings)
    return InstanceWriter(
        InstanceIndex(database, on_indexed=rules.enqueue if rules else None),
        settings.storage_dir,
        settings.tmp_dir,
        settings.dicom.storage_layout,
        settings.dicom.duplicates,
        parse_size(settings.dicom.storage_quota),
        parse_size(settings.dicom.min_free_space),
    )


def build(settings: Settings, reactor_: Any = reactor) -> MultiService:
    """Every part of the daemon as one service tree."""
    database = open_database(settings.database_url, migrate_in_child=True)
    writer = storage_writer(settings, database)
    report = writer.recover()
    log.info(
        "storage recovered",
        temporary_files_removed=report.temporary_files_removed,
        orphans_removed=report.orphans_removed,
        rows_refreshed=report.rows_refreshed,
    )
    root = MultiService()
    audit = AuditTrail(database)
    _WorkerService(audit).setServiceParent(root)
    acquirer = Acquirer(settings, database, writer)
    node = DicomNode(settings, database, writer, audit, on_due=acquirer.wake)
    node.setServiceParent(root)
    mllp = MllpListener(settings, Inbox(settings, database, on_due=acquirer.wake), reactor_)
    mllp.setServiceParent(root)
    _WorkerService(acquirer).setServiceParent(root)  # after the node: it sends MPPS to it
    _WorkerService(Router(settings, database)).setServiceParent(root)
    http = endpoints.TCP4ServerEndpoint(reactor_, settings.http.port, interface=settings.http.host)
    listeners = {
        "dicom": f"{settings.dicom.host}:{settings.dicom.port}",
        "mllp": f"{settings.hl7.host}:{settings.hl7.port}",
        "http": f"{settings.http.host}:{settings.http.port}",
    }
    checks = [("dicom", lambda: node.listening), ("mllp", lambda: mllp.listening)]
    StreamServerEndpointService(http, site(database, checks, listeners)).setServiceParent(root)
    return root


def run(settings: Settings) -> int:
    """Start the tree, run until SIGTERM or SIGINT, stop it in reverse order."""
    metrics.BUILD_INFO.labels(__version__).set(1)
    the_reactor: Any = reactor
    try:
        root = build(settings)
        root.startService()
    except Exception as exc:  # a port in use, an unwritable data_dir, a newer database: one clear line
        log.error("startup failed", error=str(exc))
        return 1
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
    the_reactor.run()
    log.info("fabricatord stopped")
    return 0
