"""HL7 ORM^O01 → ACK over MLLP: fabricatord against hl7apy's MLLPServer and a bare asyncio server.

    .venv/bin/python benchmarks/hl7.py [--quick] [--shared ../shared/bench] [--json OUT]

Every sender waits for each ACK before it sends the next message (as interface engines do).
- `one`: one persistent connection, 2,000 messages.
- `ten`: ten persistent connections at once, 300 messages each.
- `per-connection`: a new connection per message, 1,000 messages (hl7apy's MLLPServer reads
  one message per connection, so this is the only shape it can be measured in).

fabricatord parses every message with python-hl7, maps it, commits the order, its worklist
item and the raw message (SQLite WAL, synchronous=FULL) and only then answers AA. The peers
come from the shared harness (`hl7bench.py serve`): hl7apy's MLLPServer with a handler that
splits MSH and does not parse, and an asyncio server that answers without parsing: they are
the ceilings of a Python MLLP listener, not order fillers. The senders are separate processes.
Figures drift between runs on a shared machine: the ratios of one run are what to compare.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers
from benchmarks.report import RESULTS, finish, gate, table
from benchmarks.report import start as start_report

START, END = b"\x0b", b"\x1c\r"


def orm(number: int) -> bytes:
    """A realistic ORM^O01 (IHE layout, original acknowledgment mode) with unique identifiers."""
    stamp = "20261124101500"
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|HOSPITAL|FABRICATORD|RADIOLOGY|{stamp}||ORM^O01^ORM_O01|BENCH{number:010d}|P|2.5.1",
            f"PID|1||PAT{number % 100000:05d}^^^HOSPITAL^MR||SMITH^JAMES^A^^^^L||19600315|M|||"
            "123 MAIN ST^^SPRINGFIELD^IL^62701^USA^H||(555)555-1234^PRN^PH",
            f"PV1|1|O|RAD^ROOM1^BED1^HOSPITAL||||1234^REFERRER^ALICE^^^DR|||RAD||||1|||||OP|VIS{number:07d}",
            f"ORC|NW|ORD{number:09d}^RIS|FIL{number:09d}^PACS||SC||1^once^^20261124110000^^R||{stamp}",
            f"OBR|1|ORD{number:09d}^RIS|FIL{number:09d}^PACS|CTCHEST^CT CHEST W CONTRAST^L|||{stamp}"
            f"|||||||||1234^REFERRER^ALICE^^^DR||ACC{number:09d}|RP{number:09d}|SPS{number:09d}||||CT|||"
            "1^once^^20261124110000^^R",
        ]
    ).encode()


def read_ack(connection: socket.socket, buffer: bytearray) -> bytes:
    while True:
        end = buffer.find(END)
        if end >= 0:
            ack = bytes(buffer[:end])
            del buffer[: end + 2]
            return ack
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the ACK")
        buffer += chunk


def connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _sender(job: tuple[int, str, int, int]) -> tuple[float, float, list[float], int]:
    """One sender process: (start, end, latencies, messages not answered AA/CA)."""
    port, shape, first, count = job
    messages = [START + orm(first + i) + END for i in range(count)]
    latencies = []
    refused = 0
    started = time.perf_counter()
    connection = connect(port) if shape == "persistent" else None
    buffer = bytearray()
    for message in messages:
        sent = time.perf_counter()
        link = connection or connect(port)
        link.sendall(message)
        ack = read_ack(link, buffer)
        if connection is None:
            link.close()
            buffer.clear()
        latencies.append(time.perf_counter() - sent)
        refused += b"MSA|AA" not in ack and b"MSA|CA" not in ack
    if connection is not None:
        connection.close()
    return started, time.perf_counter(), latencies, refused


def measure(port: int, shape: str, connections: int, count: int, first: int) -> dict[str, Any]:
    jobs = [(port, shape, first + worker * count, count) for worker in range(connections)]
    with multiprocessing.get_context("fork").Pool(connections) as pool:
        results = pool.map(_sender, jobs)
    latencies = sorted(value for result in results for value in result[2])
    span = max(result[1] for result in results) - min(result[0] for result in results)

    def percentile(share: float) -> float:
        return latencies[min(len(latencies) - 1, int(share * (len(latencies) - 1) + 0.5))] * 1000

    return {
        "messages": len(latencies),
        "refused": sum(result[3] for result in results),
        "per_second": len(latencies) / span,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    }


SCENARIOS = {
    # name: (shape, connections, messages per connection, quick messages per connection)
    "one": ("persistent", 1, 2000, 300),
    "ten": ("persistent", 10, 300, 50),
    "per-connection": ("per-connection", 1, 1000, 200),
}


def _peer(shared: Path, implementation: str) -> tuple[subprocess.Popen[bytes], int]:
    port = peers.free_port()
    process = subprocess.Popen(
        [peers.PYTHON, str(shared / "hl7bench.py"), "serve", "--impl", implementation, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"hl7bench {implementation} did not listen")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few messages: a smoke test of the harness")
    parser.add_argument("--shared", default=str(peers.ROOT.parent / "shared" / "bench"),
                        help="the shared harness, for its hl7apy and asyncio servers")  # fmt: skip
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    shared = Path(args.shared) if (Path(args.shared) / "hl7bench.py").exists() else None
    start_report(
        shared_harness=str(shared) if shared else None,
    )
    if shared is None:
        print("no shared harness: hl7apy's MLLPServer and the asyncio server are not measured")
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="fabricatord-hl7-bench-") as folder:
        # The listener alone: orders wait for `fabricatord acquire` instead of making studies.
        server = peers.fabricatord(Path(folder), '[synth]\nacquisition = "manual"\n')
        port = int(server.extra["hl7_port"])  # type: ignore[call-overload]
        first = 0
        try:
            for name, (shape, connections, count, quick) in SCENARIOS.items():
                per = quick if args.quick else count
                results[name]["fabricatord"] = measure(port, shape, connections, per, first)
                first += connections * per
            with sqlite3.connect(Path(folder) / "data" / "fabricatord.sqlite") as database:
                items = database.execute("SELECT count(*) FROM scheduled_steps").fetchone()[0]
        finally:
            server.stop()
    RESULTS["fabricatord_worklist_items"] = items
    print(f"fabricatord kept {items} worklist items for {first} messages sent")
    if shared is not None:
        for implementation in ("asyncio", "hl7apy"):
            process, peer_port = _peer(shared, implementation)
            try:
                for name, (shape, connections, count, quick) in SCENARIOS.items():
                    if implementation == "hl7apy" and shape == "persistent":
                        continue  # it closes the connection after one message
                    per = quick if args.quick else count
                    results[name][implementation] = measure(peer_port, shape, connections, per, 0)
            finally:
                process.terminate()
                process.wait(timeout=30)
    for name, by_server in results.items():
        ours = by_server["fabricatord"]
        rows = []
        for server_name, figures in by_server.items():
            ratio = ours["per_second"] / figures["per_second"]
            rows.append(
                [
                    server_name,
                    figures["messages"],
                    figures["refused"],
                    figures["per_second"],
                    figures["p50_ms"],
                    figures["p99_ms"],
                    "—" if server_name == "fabricatord" else ratio,
                ]
            )
        table(
            f"{name}: {SCENARIOS[name][1]} connection(s), {SCENARIOS[name][0]}",
            ["server", "messages", "not AA", "msg/s", "p50 ms", "p99 ms", "fabricatord ÷ server"],
            rows,
        )
    RESULTS["scenarios"] = results
    print()
    gate("ORM/s, one connection", results["one"]["fabricatord"]["per_second"], 500, True)
    gate("ORM/s, ten connections", results["ten"]["fabricatord"]["per_second"], 1000, True)
    gate("p99 ms, one connection", results["one"]["fabricatord"]["p99_ms"], 10, False)
    gate("p99 ms, ten connections", results["ten"]["fabricatord"]["p99_ms"], 20, False)
    finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
