"""The MLLP listener (HL7 v2 Appendix C): framing only, then the workflow's inbox answers.

Frames are cut from the byte stream here (bytes before VT and a missing CR after FS tolerated),
handed one at a time per connection to the inbox on a single worker thread, and the replies
written back in order. A connection never holds more than one frame's worth of unread bytes
plus a short queue: beyond that we stop reading from it until the queue drains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from fabricatord.config import Settings
from fabricatord.config.values import parse_duration
from fabricatord.hl7.mllp import END, START, frame
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger
from fabricatord.servers import worker_pool
from fabricatord.servers.listen import Listening, WorkerCounts
from fabricatord.servers.tls import ServerTls
from fabricatord.workflow.hl7 import Frame, Inbox

log = get_logger(__name__)

FS = END[:1]
QUEUE_LIMIT = 32
"""Frames waiting per connection before we stop reading from it (pipelining senders)."""
GROUP_LIMIT = 64
"""Most frames committed in one transaction."""


class MllpProtocol(Protocol, TimeoutMixin):
    def __init__(self, factory: MllpFactory, peer: str) -> None:
        self._factory = factory
        self._peer = peer
        self._buffer = bytearray()
        self._in_frame = False
        self._queue: deque[tuple[bytes, bool]] = deque()
        """Frames cut and not yet answered, each with True if it was cut short at the cap."""
        self._busy = False
        self._paused = False
        self._closed = False
        self._counted = False
        self._closing_after_queue = False

    @property
    def _link(self) -> Any:
        """The TCP transport (Twisted types it as optional; it is set before any callback)."""
        return self.transport

    def connectionMade(self) -> None:
        factory = self._factory
        if factory.active >= factory.settings.hl7.max_connections:
            metrics.HL7_FRAMES_REFUSED.labels("too_many_connections").inc()
            log.warning(
                "mllp connection refused: too many", why="too_many_connections", peer=self._peer, limit=factory.active
            )
            self._link.loseConnection()
            self._closed = True
            return
        factory.active += 1
        factory.on_count(factory.active)
        self._counted = True
        metrics.HL7_CONNECTIONS_ACTIVE.inc()
        self.setTimeout(factory.idle_timeout)
        log.debug("mllp connection", peer=self._peer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._counted:
            self._counted = False
            self._factory.active -= 1
            self._factory.on_count(self._factory.active)
            metrics.HL7_CONNECTIONS_ACTIVE.dec()
        self._closed = True
        if self._in_frame and self._buffer and not self._closing_after_queue:
            metrics.HL7_FRAMES_REFUSED.labels("unfinished").inc()
            log.warning(
                "mllp connection closed inside a frame: nothing kept",
                why="unfinished",
                peer=self._peer,
                bytes=len(self._buffer),
            )

    def timeoutConnection(self) -> None:
        metrics.HL7_FRAMES_REFUSED.labels("idle").inc()
        log.info("mllp connection idle: closed", why="idle", peer=self._peer, seconds=self._factory.idle_timeout)
        self._link.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing_after_queue:
            return
        self.resetTimeout()
        self._buffer += data
        self._cut(self._factory.settings.hl7.max_message_bytes)
        self._next()

    def _cut(self, limit: int) -> None:
        """Move every complete frame from the buffer to the queue."""
        while self._buffer:
            if not self._in_frame:
                start = self._buffer.find(START)
                if start < 0:
                    self._buffer.clear()  # noise between frames (a CR after FS, LFs, garbage)
                    return
                del self._buffer[: start + 1]
                self._in_frame = True
            end = self._buffer.find(FS)
            if (end < 0 and len(self._buffer) > limit) or end > limit:
                self._oversized(limit)
                return
            if end < 0:
                return
            self._queue.append((bytes(self._buffer[:end]), False))
            del self._buffer[: end + 1]
            self._in_frame = False

    def _oversized(self, limit: int) -> None:
        """AR for a frame over the cap, then close: reading on would only buffer more of it."""
        metrics.HL7_FRAMES_REFUSED.labels("oversized").inc()
        log.warning("mllp frame over max_message_bytes: AR and close", why="oversized", peer=self._peer, limit=limit)
        prefix = bytes(self._buffer[:65536])
        self._buffer.clear()
        self._queue.append((prefix, True))
        self._closing_after_queue = True
        self._link.pauseProducing()
        self._next()

    def _next(self) -> None:
        if self._busy:
            return
        if not self._queue:
            if self._closing_after_queue:
                self._link.loseConnection()
            elif self._paused:
                self._paused = False
                self._link.resumeProducing()
            return
        if len(self._queue) >= QUEUE_LIMIT and not self._paused:
            self._paused = True
            self._link.pauseProducing()
        message, oversized = self._queue.popleft()
        self._busy = True
        self._factory.submit(self, Frame(message, self._peer, oversized))

    def answered(self, replies: list[bytes]) -> None:
        self._busy = False
        if not self._closed:
            for reply in replies:
                self._link.write(frame(reply))
        self._next()

    def failed(self, reason: str) -> None:
        """The inbox answers every failure it knows; anything else closes without an ACK, so the
        sender resends rather than believing it was kept."""
        self._busy = False
        log.error("mllp frame not processed: closing", peer=self._peer, error=reason)
        self._queue.clear()
        self._link.loseConnection()


class MllpFactory(Factory):
    """Connections and the one worker thread they share. Frames that arrive while a group is
    being committed wait and go together in the next group, so ten busy senders cost about one
    commit per round, not ten."""

    def __init__(self, settings: Settings, inbox: Inbox, pool: ThreadPool) -> None:
        self.settings = settings
        self.inbox = inbox
        self.pool = pool
        self.active = 0
        self.on_count: Callable[[int], None] = lambda _active: None
        """Told how many connections are open after each change (a worker tells its siblings)."""
        self.idle_timeout = parse_duration(settings.hl7.idle_timeout)
        self._waiting: list[tuple[MllpProtocol, Frame]] = []
        self._running = False

    def buildProtocol(self, addr: IAddress | None) -> MllpProtocol:
        host, port = getattr(addr, "host", "?"), getattr(addr, "port", 0)
        return MllpProtocol(self, f"{host}:{port}")

    def submit(self, protocol: MllpProtocol, frame: Frame) -> None:
        self._waiting.append((protocol, frame))
        self._run()

    def _run(self) -> None:
        if self._running or not self._waiting:
            return
        group, self._waiting = self._waiting[:GROUP_LIMIT], self._waiting[GROUP_LIMIT:]
        self._running = True
        work = deferToThreadPool(reactor, self.pool, self.inbox.receive_all, [frame for _, frame in group])
        work.addCallbacks(self._done, self._failed, callbackArgs=(group,), errbackArgs=(group,))

    def _done(self, replies: list[list[bytes]], group: list[tuple[MllpProtocol, Frame]]) -> None:
        # Still "running" while the replies go out, so that the frames they release join one group.
        for (protocol, _), reply in zip(group, replies, strict=True):
            protocol.answered(reply)
        self._running = False
        self._run()

    def _failed(self, failure: Failure, group: list[tuple[MllpProtocol, Frame]]) -> None:
        for protocol, _ in group:
            protocol.failed(failure.getErrorMessage())
        self._running = False
        self._run()


class MllpListener(Service):
    """The listener and its worker thread, started and stopped with the daemon."""

    def __init__(
        self,
        settings: Settings,
        inbox: Inbox,
        reactor_: Any = reactor,
        inherited: Mapping[str, int] | None = None,
        counts: WorkerCounts | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        """A worker process listens on the sockets `inherited` from its parent and counts its
        connections in `counts`, beside its siblings'."""
        self._settings = settings
        self._listening = Listening("mllp", inherited)
        self._tls = tls
        self._counts = counts
        self._reactor = reactor_
        self._pool = worker_pool("hl7", 1)
        self._factory = MllpFactory(settings, inbox, self._pool)
        if counts is not None:
            self._factory.on_count = lambda active: counts.set("mllp", active)

    @property
    def listening(self) -> bool:
        return bool(self._listening.ports)

    def startService(self) -> None:
        hl7 = self._settings.hl7
        counts = self._counts
        busier = (lambda: counts.busier("mllp")) if counts is not None else (lambda: False)
        self._listening.open(self._reactor, self._factory, hl7, self._tls, busier)
        if counts is not None:
            counts.set("mllp", 0)  # listening now: siblings may leave connections to us
        self._pool.start()  # after the port: a start that fails leaves no thread to wait for
        log.info(
            "mllp listener started",
            host=hl7.host,
            port=self._listening.number() if hl7.plain else None,
            tls_port=self._listening.number(tls=True) if self._tls else None,
        )
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        stopped = self._listening.close()
        self._pool.stop()  # waits for the message in hand: its ACK is committed or never sent
        return stopped
