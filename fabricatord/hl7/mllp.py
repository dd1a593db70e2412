"""MLLP framing (HL7 v2 Appendix C: VT message FS CR) and a blocking client that waits for
each acknowledgement, with a timeout and a frame check python-hl7's `MLLPClient` lacks."""

from __future__ import annotations

import socket
import ssl
import time

START = b"\x0b"
END = b"\x1c\r"


class MllpError(OSError):
    """The peer closed, did not answer in time, or sent something that is not an MLLP frame."""


def frame(message: bytes) -> bytes:
    return START + message + END


class MllpClient:
    def __init__(self, host: str, port: int, timeout: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: MLLP over TLS with this context."""
        connection = socket.create_connection((host, port), timeout=timeout)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                connection = tls.wrap_socket(connection, server_hostname=host)
            except OSError:
                connection.close()
                raise
        self._socket = connection
        self._timeout = timeout
        self._buffer = b""

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close()

    def send(self, message: bytes) -> bytes:
        """Send one message; the acknowledgement, without its frame."""
        self._socket.sendall(frame(message))
        deadline = time.monotonic() + self._timeout
        while END not in self._buffer:
            if time.monotonic() > deadline:
                raise MllpError(f"no acknowledgement within {self._timeout:g} s")
            chunk = self._socket.recv(65536)
            if not chunk:
                raise MllpError("the peer closed the connection without an acknowledgement")
            self._buffer += chunk
        reply, _, self._buffer = self._buffer.partition(END)
        start = reply.find(START)
        if start < 0:
            raise MllpError("the reply is not an MLLP frame (no start block)")
        return reply[start + 1 :]


def as_wire(data: bytes) -> bytes:
    """A message as a file or a paste holds it (CR, LF or CRLF between segments, blank lines) as
    the wire carries it: segments separated by CR."""
    return b"\r".join(line for line in data.replace(b"\r\n", b"\n").replace(b"\n", b"\r").split(b"\r") if line.strip())
