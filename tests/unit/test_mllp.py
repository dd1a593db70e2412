"""The MLLP client against small servers on loopback: frames split across reads, closes, silence."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fabricatord.hl7.mllp import MllpClient, MllpError, frame


@pytest.fixture
def server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    threads: list[threading.Thread] = []

    def start(behaviour: Callable[[socket.socket], None]) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            connection, _ = listener.accept()
            with connection, listener:
                behaviour(connection)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    for thread in threads:
        thread.join(timeout=5)


def test_acknowledgements_split_across_reads_and_two_messages_on_one_connection(server: Any) -> None:
    def behaviour(connection: socket.socket) -> None:
        for _ in range(2):
            request = b""
            while not request.endswith(b"\x1c\r"):
                request += connection.recv(100)
            control_id = request.split(b"|")[9]
            ack = frame(b"MSH|^~\\&|A|B|C|D|||ACK|1|P|2.5\rMSA|AA|" + control_id)
            connection.sendall(ack[:7])
            connection.sendall(ack[7:])

    port = server(behaviour)
    with MllpClient("127.0.0.1", port, timeout=5) as client:
        for control_id in (b"C1", b"C2"):
            reply = client.send(b"MSH|^~\\&|X|Y|Z|W|||ORM^O01|" + control_id + b"|P|2.5")
            assert reply.endswith(b"MSA|AA|" + control_id)


def test_a_close_or_silence_is_an_error(server: Any) -> None:
    closing = server(lambda connection: connection.recv(100))
    with MllpClient("127.0.0.1", closing, timeout=5) as client, pytest.raises(MllpError, match="closed"):
        client.send(b"MSH|^~\\&|")
    silent = server(lambda connection: (connection.recv(100), threading.Event().wait(2)))
    with MllpClient("127.0.0.1", silent, timeout=0.5) as client, pytest.raises(OSError):
        client.send(b"MSH|^~\\&|")
