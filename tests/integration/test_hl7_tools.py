"""`fabricatord hl7 orm` and `hl7 send` against an MLLP server that is not ours: hl7apy's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest

from tests.conftest import free_port, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def order_filler() -> Iterator[tuple[int, list[str]]]:
    """hl7apy's MLLPServer, acknowledging every ORM^O01 with AA and keeping what it received."""
    from hl7apy.mllp import AbstractHandler, MLLPServer

    received: list[str] = []

    class Acknowledge(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            received.append(self.incoming_message)
            control_id = str(hl7.parse(self.incoming_message).segment("MSH")[10])
            header = "MSH|^~\\&|RIS|HOSPITAL|FABRICATORD|FABRICATORD|20261123||ACK^O01"
            ack = f"{header}|A{control_id}|P|2.5.1\rMSA|AA|{control_id}"
            return f"\x0b{ack}\x1c\r"

    port = free_port()
    handlers: dict[str, Any] = {"ORM^O01": (Acknowledge,), "ORM^O01^ORM_O01": (Acknowledge,)}
    server = MLLPServer("127.0.0.1", port, handlers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port, received
    server.shutdown()
    server.server_close()


def test_a_synthetic_order_is_sent_and_its_ack_printed(order_filler: tuple[int, list[str]], tmp_path: Path) -> None:
    port, received = order_filler
    env = {"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "data")}
    out = run_cli(
        "hl7", "orm", "--modality", "MR", "--referring", "House^Gregory", "--send", f"127.0.0.1:{port}", env=env
    )
    assert ": AA " in out.stdout
    message = hl7.parse(received[0])
    assert str(message.segment("OBR")[24]) == "MR" and str(message.segment("PV1")[8][0][1]) == "House"
    # The patient is the registry's: `patients show` knows it.
    patient_id = str(message.segment("PID")[3][0][0])
    assert patient_id in run_cli("patients", "show", patient_id, env=env).stdout


def test_files_with_any_line_ends_go_as_cr_separated_messages(
    order_filler: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, received = order_filler
    env = {"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "data")}
    run_cli("hl7", "orm", "--version", "2.3", "--out", str(tmp_path / "orders"), env=env)
    (original,) = (tmp_path / "orders").glob("*.hl7")
    as_typed = tmp_path / "typed.hl7"
    as_typed.write_bytes(original.read_bytes().replace(b"\r", b"\n"))  # as an editor saves it
    out = run_cli("hl7", "send", f"127.0.0.1:{port}", str(as_typed))
    assert out.stdout.startswith("typed.hl7: AA ")
    assert received[0].rstrip("\r") == original.read_bytes().decode()
    refused = run_cli("hl7", "send", f"127.0.0.1:{free_port()}", str(as_typed), check=False)
    assert refused.returncode == 69 and "127.0.0.1" in refused.stderr
