"""Frames the HL7 fuzz target (tests/fuzz/fuzz_hl7.py) found unanswered or crashing the inbox,
sent through a real MLLP client: each gets its ACK, and the oracles hold afterwards."""

from __future__ import annotations

import pytest
from hl7.client import MLLPClient

from tests.robustness.conftest import Node

MSH = "MSH|^~\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124090000||ADT^A08|{cid}|P|2.5.1"
PID = "PID|1||MRN-F1^^^TESTHOSP||Fuzz^Fiona||19800101|F"


def exchange(node: Node, frame: bytes) -> str:
    with MLLPClient("127.0.0.1", node.daemon.hl7_port) as client:
        client.socket.settimeout(30)
        return client.send_message(frame).decode("latin-1").strip("\x0b\x1c\r")


def msa_codes(reply: str) -> list[str]:
    return [segment[4:6] for segment in reply.split("\r") if segment.startswith("MSA")]


@pytest.mark.parametrize(
    ("frame", "codes"),
    [
        # MSH-15 and MSH-16 garbled into values outside HL7 table 0155: answered as AL (was silence),
        # with the commit ACK only.
        ("MSH|^~\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124090000||ADT^A08|F1|P|2.5.1|||X1|Y2\r" + PID, ["CA"]),
        # MSH-2 with only the component and repetition characters (was an IndexError, no ACK).
        ("MSH|^~|ROBUST|TESTFAC|FABRICATORD|RAD|20261124090000||ADT^A08|F2|P|2.5.1\r" + PID, ["AA"]),
        # A separator repeated in MSH-2: python-hl7 asserts (was an AssertionError, no ACK).
        ("MSH|^^\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124090000||ADT^A08|F3|P|2.5.1\r" + PID, ["AR"]),
        # A bare BHS before the message (was an IndexError building the batch ACK).
        ("BHS\r" + MSH.format(cid="F4") + "\r" + PID + "\rBTS|1", ["AA"]),
        # MSH ending where its field separator should be (the ACK was built with CR as separator).
        ("MSH\r" + PID, ["AR"]),
        # A batch trailer without its header, and nothing else (was silence).
        ("BTS|0", ["AR"]),
    ],
    ids=["msh15-16-outside-table", "msh2-two-characters", "repeated-separators", "bare-bhs", "bare-msh", "bare-bts"],
)
def test_a_frame_the_fuzzer_found_gets_its_ack(node: Node, frame: str, codes: list[str]) -> None:
    reply = exchange(node, frame.encode())
    assert reply.startswith(("MSH|", "BHS|")), reply
    assert msa_codes(reply) == codes
    node.check()
