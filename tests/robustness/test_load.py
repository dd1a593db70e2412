"""The loads of ROBUSTNESS.md, sized to finish in CI; `pytest --soak tests/robustness/test_load.py`
runs them at full size. After each, the oracles: nothing acknowledged lost, threads, files and
memory back near their baseline, the node still serving."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import halt
from tests.robustness.conftest import Node, start_node
from tests.robustness.dimse import ROOT, associated, instance, store
from tests.robustness.mllp import Link, framed, order
from tests.robustness.wire import (
    A_RELEASE_RP,
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    P_DATA_TF,
    Response,
    context,
    echo_rq,
    encode,
    p_data,
    pdu,
    pdv,
    store_rq,
)

DICOM_SETTINGS = 'network_timeout = "5s"\nacse_timeout = "3s"\n'  # max_dataset_size: the default 4 GiB
MIB = 2**20
MULTI_FRAME = 2**30
"""The multi-frame instance's pixel data: 1 GiB, as ROBUSTNESS.md sizes it."""


def sized(soak: bool, ci: int, full: int) -> int:
    return full if soak else ci


def in_parallel(work: Callable[[int], object], count: int, workers: int = 4) -> list[object]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, range(count)))


def test_short_associations_one_after_another_leak_nothing(node: Node, soak: bool) -> None:
    """10,000 associations (2,000 in CI), each an echo and a release, four at a time."""
    count = sized(soak, 2_000, 10_000)
    rss = node.rss()

    def one(_: int) -> bool:
        with associated(node.daemon.port, context(1, "1.2.840.10008.1.1")) as wire:
            wire.send(p_data(pdv(1, 3, echo_rq())))
            answered = wire.read().kind == P_DATA_TF
            wire.send(pdu(0x05, bytes(4)))
            return answered and wire.read().kind == A_RELEASE_RP

    assert all(in_parallel(one, count))
    assert node.rss() - rss < 32 * MIB
    node.check()


def test_silent_connects_leak_nothing(node: Node, soak: bool) -> None:
    """10,000 TCP connections (2,000 in CI) that send nothing and go: no slot, thread or file kept."""
    count = sized(soak, 2_000, 10_000)
    rss = node.rss()

    def one(_: int) -> None:
        with socket.create_connection(("127.0.0.1", node.daemon.port), timeout=30):
            pass

    in_parallel(one, count, workers=8)
    assert node.rss() - rss < 32 * MIB
    node.check()


def test_c_store_streams_from_several_associations_keep_every_instance(node: Node, soak: bool) -> None:
    """Ten associations storing at once (50 instances each in CI, 1,000 with --soak)."""
    each = sized(soak, 50, 1_000)

    def stream(sender: int) -> list[int]:
        statuses = []
        with associated(node.daemon.port) as wire:
            for number in range(each):
                uid = f"{ROOT}.60.{sender}.{number}"
                statuses.append(store(wire, uid, encode(instance(uid)), message_id=number + 1).status)
        return statuses

    answered = in_parallel(stream, 10, workers=10)
    assert answered == [[0x0000] * each] * 10
    rows = node.daemon.rows()
    assert all(f"{ROOT}.60.{s}.{n}" in rows for s in range(10) for n in range(each))
    node.check()


def test_mllp_bursts_from_ten_senders_are_answered_in_order_and_kept_once(node: Node, soak: bool) -> None:
    """10 connections pipelining ORMs (100 each in CI, 1,000 with --soak): one ACK per message
    in order, the worklist holds each message once, and "database is locked" (AR 206) never
    reaches a sender."""
    each = sized(soak, 100, 1_000)

    def burst(sender: int) -> list[tuple[str, str]]:
        with Link(node.daemon.hl7_port, timeout=120) as link:
            link.send(framed(*(order(f"B{sender}-{n}", f"ACCB{sender}X{n}") for n in range(each))))
            return [(ack.code, ack.control_id) for ack in link.frames(each)]

    answered = in_parallel(burst, 10, workers=10)
    for sender, acks in enumerate(answered):
        assert acks == [("AA", f"B{sender}-{n}") for n in range(each)]
    with sqlite3.connect(node.daemon.data_dir / "fabricatord.sqlite") as connection:
        orders = connection.execute("SELECT COUNT(*) FROM orders WHERE accession_number LIKE 'ACCB%'").fetchone()[0]
    assert orders == 10 * each
    node.check()


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Node]:
    """A node of its own, removed with its gigabyte at the end."""
    free = shutil.disk_usage(tmp_path).free
    if free < 4 * MULTI_FRAME:
        pytest.skip(f"{free // MIB} MiB free: too little for a 1 GiB instance")
    node = start_node(tmp_path, DICOM_SETTINGS)
    yield node
    halt(node.daemon)
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def test_a_1_gib_multi_frame_instance_costs_less_than_100_mib_of_memory(roomy: Node) -> None:
    """The dataset goes to a file as it arrives, its header is walked there, and it is linked
    into storage: resident memory stays flat however large the instance."""
    node, uid = roomy, f"{ROOT}.61.1"
    frames = MULTI_FRAME // (512 * 512 * 2)
    header = encode(
        instance(uid, NumberOfFrames=frames, Rows=512, Columns=512, BitsAllocated=16, BitsStored=16, HighBit=15),
        implicit=False,
    )
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, MULTI_FRAME)
    chunk = bytes(MIB - 16)
    peak, rss, done = [0], node.rss(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], node.rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with associated(node.daemon.port, context(1, CT_IMAGE_STORAGE, EXPLICIT_LE)) as wire:
            wire.send(p_data(pdv(1, 3, store_rq(CT_IMAGE_STORAGE, uid))) + p_data(pdv(1, 0, header + pixel_header)))
            left = MULTI_FRAME
            while left:
                part = chunk[: min(len(chunk), left)]
                left -= len(part)
                wire.send(p_data(pdv(1, 0 if left else 2, part)))
            answer = wire.response()
    finally:
        done.set()
        sampler.join()
    assert isinstance(answer, Response) and answer.status == 0x0000, answer
    assert node.daemon.rows()[uid][1] > MULTI_FRAME
    assert peak[0] - rss < 100 * MIB, f"resident memory grew {(peak[0] - rss) // MIB} MiB"
    node.check()
