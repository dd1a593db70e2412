"""This daemon among the others on one database: it says it is alive, renews the leases of the
jobs it runs, and holds the leader's lease when nobody else does (the leader runs the periodic
work: peer echoes, and later retention), all on one thread."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

from fabricatord import __version__
from fabricatord.db import Database
from fabricatord.db.nodes import NodeNameInUse, Nodes
from fabricatord.obs.logging import get_logger

__all__ = ["NodeNameInUse", "Presence"]

log = get_logger(__name__)


class Presence:
    def __init__(self, database: Database, name: str, lease: timedelta, pid: int | None = None) -> None:
        """`pid`: the process the node is known by; a worker process signs in as its parent,
        which the node's second process would have to get past."""
        self.name = name
        self._pid = pid if pid is not None else os.getpid()
        self._nodes = Nodes(database)
        self._lease = lease
        self._every = lease.total_seconds() / 3
        self._leader = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leader(self) -> bool:
        return self._leader

    def join(self) -> None:
        """Register under our name before anything claims a job: a second live process of that
        name is refused (NodeNameInUse) here, before it could take the first one's jobs."""
        self._nodes.register(
            self.name, socket.gethostname(), self._pid, __version__, stale_after=self._lease, gone=_gone
        )
        self._beat()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self._nodes.leave(self.name)
        except Exception as exc:  # the database is gone: the leases run out by themselves
            log.warning("node not signed off", error=str(exc))
        self._leader = False

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._beat()
            except Exception as exc:  # the database away for a moment: our leases may run out
                log.warning("heartbeat failed", error=str(exc))

    def _beat(self) -> None:
        self._nodes.heartbeat(self.name, self._lease)
        leading = self._nodes.lead(self.name, self._lease)
        if leading != self._leader:
            log.info("leader now" if leading else "no longer leader", node=self.name)
        self._leader = leading


def _gone(host: str, pid: int) -> bool:
    """Whether a process of ours that held a node name has died (only this host can tell)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
