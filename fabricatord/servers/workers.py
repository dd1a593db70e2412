"""Worker processes (`[node] workers`): the parent binds the ports, starts that many copies of
the daemon that accept on them, starts again one that dies, and speaks for them all to signals
and to systemd.

The parent serves nothing itself: it holds the node's lock and the listening sockets, and it
watches one pipe per worker, on which the worker says it is ready and then that its reactor
still turns, once a second. systemd's watchdog is fed only while every worker's does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from fabricatord.obs.logging import get_logger
from fabricatord.servers.listen import WorkerCounts

log = get_logger(__name__)

SEAT_VARIABLE = "FABRICATORD_WORKER"
"""The worker's `Seat` as JSON, set by the parent for each worker."""
KILL_AFTER = 5.0
"""A worker still running this long after `[node] shutdown_grace` past SIGTERM gets SIGKILL."""
BEAT_EVERY = 1.0
STALE_AFTER = 5.0
"""A worker that has not said its reactor turns for this long is not well: the watchdog waits."""
RESTART_AFTER = (1.0, 2.0, 5.0, 10.0, 30.0)
STEADY_AFTER = 60.0
"""A worker that lived this long and died starts again at once, not after its predecessors' backoff."""

_READY = b"R"
_BEAT = b"."
_FIRST_FD = 3
_PR_SET_PDEATHSIG = 1
_PARENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class Seat:
    """A worker's place in the daemon, as its parent described it in the environment."""

    index: int
    workers: int
    parent: int
    slots: Path
    listeners: Mapping[str, int]
    """`dicom`, `mllp` and, for the first worker, `http` (each also `NAME-tls` with `[tls]`, and
    without its plain one when it says `plain = false`): inherited listening sockets."""
    beats: int

    @property
    def first(self) -> bool:
        """The first worker serves HTTP and runs the jobs and the periodic work."""
        return self.index == 0

    def counts(self) -> WorkerCounts:
        return WorkerCounts(self.slots, self.index, self.workers)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Seat | None:
        text = environ.get(SEAT_VARIABLE)
        if not text:
            return None
        given = json.loads(text)
        return cls(
            int(given["index"]),
            int(given["workers"]),
            int(given["parent"]),
            Path(given["slots"]),
            {str(name): int(fd) for name, fd in given["listeners"].items()},
            int(given["beats"]),
        )

    def to_environ(self) -> str:
        return json.dumps({**self.__dict__, "slots": str(self.slots), "listeners": dict(self.listeners)})

    def settle_in(self) -> None:
        """A worker outlives no parent (it gets SIGTERM when the parent dies, however it dies),
        and sits in a process group of its own: a terminal's Ctrl-C reaches the parent, which
        stops the workers in order, rather than all of them at once."""
        os.setpgid(0, 0)
        # Until the daemon installs its own handler, a SIGHUP the parent passes on must not end us.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.parent:  # the parent died before prctl took hold
            os.kill(os.getpid(), signal.SIGTERM)

    def ready(self) -> None:
        self._say(_READY)

    def beat(self) -> None:
        self._say(_BEAT)

    def _say(self, what: bytes) -> None:
        with contextlib.suppress(OSError):  # the parent is gone: PR_SET_PDEATHSIG stops us
            os.write(self.beats, what)


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid = 0
        self.started = time.monotonic()
        self.ready = False
        self.last_beat = 0.0

    def connectionMade(self) -> None:
        self.pid = int(self.transport.pid)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N803 (Twisted names it)
        self.last_beat = time.monotonic()
        if _READY in data and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason.value or RuntimeError("ended"))


class WorkerFailedToStart(RuntimeError):
    """A worker ended before it was ready, at the daemon's start: its own log line says why."""


class Supervisor:
    """Starts the workers, watches them, and stops them."""

    def __init__(
        self,
        reactor: Any,
        argv: list[str],
        environ: Mapping[str, str],
        workers: int,
        listeners: Mapping[str, socket.socket],
        slots: Path,
        metrics_dir: Path,
        grace: float = 10.0,
        inherited: tuple[int, ...] = (),
    ) -> None:
        """`listeners`: `dicom` and `mllp` for every worker, `http` for the first only.
        `inherited`: descriptors every worker holds as the parent does (the data_dir's lock:
        while any worker lives, no other daemon may settle this node's storage). `grace`:
        `[node] shutdown_grace`, after which a worker that has not stopped is killed."""
        self._inherited = inherited
        self._grace = grace
        self._reactor = reactor
        self._argv = argv
        self._environ = {k: v for k, v in environ.items() if k not in _PARENT_ONLY}
        self._environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        self._count = workers
        self._listeners = listeners
        self._slots = slots
        self._metrics_dir = metrics_dir
        self._workers: dict[int, _Worker] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False
        self._started: defer.Deferred[None] = defer.Deferred()
        self._ended: defer.Deferred[None] | None = None
        self.on_ready: Callable[[], None] = lambda: None

    def start(self) -> defer.Deferred[None]:
        """Fires when every worker is ready; fails when one ends before it is."""
        metrics_dir = self._metrics_dir
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for leftover in metrics_dir.glob("*.db"):  # a previous run's: its counters are not ours
            leftover.unlink()
        WorkerCounts.create(self._slots, self._count)
        for index in range(self._count):
            self._spawn(index)
        return self._started

    @property
    def healthy(self) -> bool:
        """Every worker ready, and each one's reactor turned within the last few seconds."""
        now = time.monotonic()
        return len(self._workers) == self._count and all(
            worker.ready and now - worker.last_beat < STALE_AFTER for worker in self._workers.values()
        )

    @property
    def pids(self) -> list[int]:
        return [self._workers[index].pid for index in sorted(self._workers)]

    def signal(self, name: str) -> None:
        """Pass a signal (`HUP`, `TERM`) on to every worker."""
        for worker in self._workers.values():
            with contextlib.suppress(Exception):  # it has just ended: processEnded tells
                worker.transport.signalProcess(name)  # type: ignore[union-attr,call-arg,misc]

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM to every worker (each finishes what is in flight, `[node] shutdown_grace`);
        fires when the last has ended."""
        self._stopping = True
        self._ended = defer.Deferred()
        for listener in self._listeners.values():  # no connection waits in a queue nobody reads
            listener.close()
        if not self._workers:
            self._ended.callback(None)
            return self._ended
        self.signal("TERM")
        self._reactor.callLater(self._grace + KILL_AFTER, self.signal, "KILL")
        return self._ended

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        listeners: dict[str, int] = {}
        next_fd = _FIRST_FD
        for name, listener in self._listeners.items():
            if name.startswith("http") and index != 0:
                continue
            child_fds[next_fd] = listener.fileno()
            listeners[name] = next_fd
            next_fd += 1
        for fd in self._inherited:
            child_fds[next_fd] = fd
            next_fd += 1
        child_fds[next_fd] = "r"
        seat = Seat(index, self._count, os.getpid(), self._slots, listeners, next_fd)
        worker = _Worker(self, index)
        environ = {**self._environ, SEAT_VARIABLE: seat.to_environ()}
        self._reactor.spawnProcess(worker, self._argv[0], self._argv, env=environ, childFDs=child_fds)
        self._workers[index] = worker
        log.info("worker started", worker=index, pid=worker.pid)

    def worker_ready(self, worker: _Worker) -> None:
        if (
            not self._started.called
            and len(self._workers) == self._count
            and all(w.ready for w in self._workers.values())
        ):
            self._started.callback(None)
            self.on_ready()

    def worker_ended(self, worker: _Worker, how: BaseException) -> None:
        from prometheus_client import multiprocess

        self._workers.pop(worker.index, None)
        WorkerCounts.clear(self._slots, worker.index, self._count)
        multiprocess.mark_process_dead(worker.pid, str(self._metrics_dir))  # its live gauges go
        outcome = _outcome(how)
        if self._stopping:
            log.info("worker stopped", worker=worker.index, pid=worker.pid, outcome=outcome)
            if not self._workers and self._ended is not None and not self._ended.called:
                self._ended.callback(None)
            return
        if not worker.ready and not self._started.called:
            self._started.errback(WorkerFailedToStart(f"worker {worker.index} ended before it was ready ({outcome})"))
            return
        lived = time.monotonic() - worker.started
        failures = 0 if lived >= STEADY_AFTER else self._failures.get(worker.index, 0) + 1
        self._failures[worker.index] = failures
        delay = RESTART_AFTER[min(failures, len(RESTART_AFTER)) - 1] if failures else 0.0
        log.error("worker ended; starting it again", worker=worker.index, pid=worker.pid, outcome=outcome, after=delay)
        self._reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self._stopping or index in self._workers:
            return
        try:
            self._spawn(index)
        except Exception as exc:  # out of processes or memory for a moment: try again
            log.error("worker not started; trying again", worker=index, error=str(exc), after=RESTART_AFTER[-1])
            self._reactor.callLater(RESTART_AFTER[-1], self._respawn, index)


def _outcome(how: BaseException) -> str:
    signal_number = getattr(how, "signal", None)
    if signal_number:
        return f"signal {signal.Signals(signal_number).name}"
    return f"exit {getattr(how, 'exitCode', '?')}"
