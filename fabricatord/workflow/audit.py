"""The audit trail's writer: handlers hand events over without waiting, a thread commits them in batches.

An audit row per C-STORE committed on the association's thread would cost a database commit per
instance; batched, the log costs almost nothing. Events still queued when the process is killed
are lost: the trail is a record of traffic, never something a peer was promised.
"""

from __future__ import annotations

import queue
import threading

from fabricatord.db import Database
from fabricatord.db.audit import AuditLog, AuditRecord
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)
BATCH = 500
INTERVAL = 0.5
BACKLOG = 100_000


class AuditTrail:
    def __init__(self, database: Database) -> None:
        self._log = AuditLog(database)
        self._queue: queue.Queue[AuditRecord] = queue.Queue(maxsize=BACKLOG)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._flush()

    def record(self, record: AuditRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:  # the database cannot keep up: traffic goes on, the trail has a gap
            metrics.AUDIT_DROPPED.inc()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self._flush()

    def _flush(self) -> None:
        while True:
            batch: list[AuditRecord] = []
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                return
            try:
                self._log.append(batch)
            except Exception as exc:
                metrics.AUDIT_DROPPED.inc(len(batch))
                log.error("audit events could not be written", events=len(batch), error=str(exc))
                return
