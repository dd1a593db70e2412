"""What Prometheus cannot count as it happens: route queues, stored bytes, and whether each
`[[peers]]` entry answers C-ECHO. A thread looks every 15 seconds (echoes at their own
interval), so a scrape never waits on the database or a peer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from fabricatord.config import Settings
from fabricatord.config.values import parse_duration
from fabricatord.db import Database, InstanceIndex
from fabricatord.db.jobs import RouteJobs
from fabricatord.dicom import scu
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

LOOK_EVERY = 15.0
"""Prometheus's usual scrape interval: the route counts and the stored bytes are whole-table
aggregates, not worth reading more often than anyone looks."""
ROUTE_STATES = ("pending", "sending", "done", "failed", "canceled")


class Monitor:
    def __init__(self, settings: Settings, database: Database, leading: Callable[[], bool] = lambda: True) -> None:
        self._settings = settings
        self._leading = leading
        """Peers are echoed by the leader only: several nodes would echo each peer several times."""
        self._jobs = RouteJobs(database)
        self._index = InstanceIndex(database)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._echoed = 0.0
        self._known_peers: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def reload(self, settings: Settings) -> None:
        self._settings = settings
        self._echoed = 0.0  # new peers are looked at at once

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.look()
            except Exception as exc:  # the database away for a moment: the gauges wait
                log.warning("metrics not refreshed", error=str(exc))
            self._stop.wait(LOOK_EVERY)

    def look(self) -> None:
        states, waiting = self._jobs.gauges()
        for state in ROUTE_STATES:
            metrics.ROUTE_JOBS.labels(state).set(states.get(state, 0))
        now = datetime.now(UTC)
        for peer in self._settings.peers:
            count, oldest = waiting.get(peer.name, (0, None))
            metrics.ROUTE_QUEUE.labels(peer.name).set(count)
            age = (now - (oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC))).total_seconds() if oldest else 0
            metrics.ROUTE_OLDEST.labels(peer.name).set(max(age, 0.0))
        metrics.STORAGE_BYTES.set(self._index.total_size())
        interval = parse_duration(self._settings.dicom.peer_echo_interval)
        if not self._leading():
            for gone in self._known_peers:
                metrics.forget_peer(gone)
            self._known_peers = set()
            return
        if interval and time.monotonic() - self._echoed >= interval:
            self._echoed = time.monotonic()
            self._echo_all()

    def _echo_all(self) -> None:
        peers = list(self._settings.peers)
        for gone in self._known_peers - {peer.name for peer in peers}:
            metrics.forget_peer(gone)
        self._known_peers = {peer.name for peer in peers}
        if not peers:
            return
        timeouts = scu.Timeouts.of(self._settings.dicom)
        quick = scu.Timeouts(min(timeouts.connect, 5.0), min(timeouts.acse, 5.0), min(timeouts.dimse or 5.0, 5.0), 10.0)
        with ThreadPoolExecutor(min(len(peers), 8), thread_name_prefix="echo") as pool:
            for peer in peers:
                pool.submit(self._echo, scu.Peer.of(peer), quick)

    def _echo(self, peer: scu.Peer, timeouts: scu.Timeouts) -> None:
        try:
            seconds = scu.echo(peer, self._settings.node.ae_title, timeouts)
        except (scu.ScuError, OSError) as exc:
            metrics.PEER_UP.labels(peer.name).set(0)
            log.info("peer not answering C-ECHO", peer=peer.name, error=str(exc))
            return
        metrics.PEER_UP.labels(peer.name).set(1)
        metrics.PEER_ECHO_SECONDS.labels(peer.name).observe(seconds)
