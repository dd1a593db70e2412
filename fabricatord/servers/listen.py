"""Listening sockets shared by worker processes (`[node] workers`), and the association count
they share.

The parent binds each port once and hands the socket down; every worker accepts from the same
queue. A restarted worker takes up the socket again without a moment when the port is closed,
and port 0 means one port for all of them, which SO_REUSEPORT (one queue per socket, each a
port of its own until bound) would not give.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_SLOT = struct.Struct("=q")
ABSENT = -1
"""The connections of a worker that is not listening (not started yet, or dead)."""


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening socket the parent's children inherit."""
    listener = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    listener.set_inheritable(True)
    return listener


HOLD_OFF = 0.005
"""How long a worker that holds more connections than a sibling leaves a new one to the sibling."""


def adopt(reactor: Any, fd: int, factory: Any, busier: Callable[[], bool] = lambda: False) -> Any:
    """Listen on a socket handed down by the parent. Every worker waits on the one queue and the
    kernel wakes them all; left to itself, the same one would win each race while it idles,
    and take a burst of connections in one batch. So each wake accepts one connection, and a
    worker that holds more than a sibling (`busier`) steps back for a few milliseconds first:
    an idle sibling takes the connection, a busy or stalled one leaves it to us after all."""
    with socket.socket(fileno=os.dup(fd)) as probe:
        family = probe.family
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # the port holds a duplicate of its own
    read = port.doRead
    stepped_back = [False]

    def accept() -> Any:
        port.numberAccepts = 1
        if stepped_back[0]:  # back after the pause: the connection that waited is ours
            stepped_back[0] = False
        elif busier():
            stepped_back[0] = True
            port.stopReading()
            reactor.callLater(HOLD_OFF, resume)
            return None
        return read()

    def resume() -> None:
        if port.connected:  # not stopped meanwhile
            port.startReading()

    port.doRead = accept
    return port


class WorkerCounts:
    """Each worker's counts in a file every worker maps: `associations` (live DICOM associations,
    which `[dicom] max_associations` limits over the whole daemon), and open `dicom` and `mllp`
    connections (which `adopt` balances). Each worker writes only its own slots; an admission
    reads the others' under a lock on the file, so two workers cannot both take the last place."""

    ROWS = ("associations", "dicom", "mllp")

    def __init__(self, path: Path, index: int, workers: int) -> None:
        self._index = index
        self._workers = workers
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._map = mmap.mmap(self._fd, _SLOT.size * workers * len(self.ROWS))

    @classmethod
    def create(cls, path: Path, workers: int) -> None:
        """The parent's part, before any worker starts: no associations, and no worker listening
        (`ABSENT` connections: a sibling that is not there takes no connection from the others)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        values = [0 if row == "associations" else ABSENT for row in cls.ROWS for _ in range(workers)]
        path.write_bytes(b"".join(_SLOT.pack(value) for value in values))

    @classmethod
    def clear(cls, path: Path, index: int, workers: int) -> None:
        """A worker died: what it held is free again, and it listens no more."""
        with open(path, "r+b") as slots:
            fcntl.flock(slots, fcntl.LOCK_EX)
            for row, name in enumerate(cls.ROWS):
                slots.seek(_SLOT.size * (row * workers + index))
                slots.write(_SLOT.pack(0 if name == "associations" else ABSENT))

    def _offset(self, row: str, index: int) -> int:
        return _SLOT.size * (self.ROWS.index(row) * self._workers + index)

    def _others(self, row: str) -> list[int]:
        return [
            int(_SLOT.unpack_from(self._map, self._offset(row, i))[0]) for i in range(self._workers) if i != self._index
        ]

    def admit(self, mine: int, limit: int) -> bool:
        """Whether one more association fits beside the `mine` this worker holds; when it does,
        it is counted at once."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            fits = mine + sum(self._others("associations")) < limit
            self.set("associations", mine + 1 if fits else mine)
            return fits
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def set(self, row: str, value: int) -> None:
        _SLOT.pack_into(self._map, self._offset(row, self._index), value)

    def busier(self, row: str) -> bool:
        """Whether this worker holds more than the least busy of its siblings that listen."""
        mine = int(_SLOT.unpack_from(self._map, self._offset(row, self._index))[0])
        return mine > min((other for other in self._others(row) if other != ABSENT), default=mine)


class Listening:
    """A listener's ports: the plain one (unless `plain = false`) and, with `[tls]`, the TLS one,
    each bound here or adopted from the parent (`inherited`: `name` and `name-tls`)."""

    def __init__(self, name: str, inherited: Mapping[str, int] | None = None) -> None:
        """`inherited` None: this process binds its ports; else it is a worker, and serves
        only the sockets its parent bound and passed (never a port of its own beside them)."""
        self.name = name
        self._inherited = inherited
        self.ports: dict[str, Any] = {}

    def open(
        self,
        reactor: Any,
        factory: Any,
        section: Any,
        tls: Any,
        busier: Callable[[], bool] = lambda: False,
        backlog: int = 50,
    ) -> None:
        """`section`: the settings' `[dicom]`, `[hl7]` or `[http]` (host, port, tls_port, plain);
        `tls`: a `servers.tls.ServerTls`, or None."""
        wanted = []
        if section.plain:
            wanted.append((self.name, factory, section.port))
        if tls is not None:
            wanted.append((f"{self.name}-tls", tls.wrap(factory, self.name), section.tls_port))
        for key, serving, number in wanted:
            if self._inherited is None:
                self.ports[key] = reactor.listenTCP(number, serving, backlog=backlog, interface=section.host)
            elif key in self._inherited:
                self.ports[key] = adopt(reactor, self._inherited[key], serving, busier)

    def number(self, tls: bool = False) -> int:
        """The bound port (the configured one, or the one the system chose for port 0)."""
        return int(self.ports[f"{self.name}-tls" if tls else self.name].getHost().port)

    def close(self) -> Any:
        """Stop listening on every port; a Deferred that fires when all have stopped."""
        from twisted.internet import defer

        ports, self.ports = list(self.ports.values()), {}
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
