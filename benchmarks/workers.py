"""Worker processes and several daemons, in one run: C-STORE and HL7 throughput with 1, 2 and 4
workers, and two daemons against one, all on one private PostgreSQL (fsync on, as Orthanc
fsyncs), with Orthanc on the same files beside them.

    .venv/bin/python benchmarks/workers.py [--quick] [--repeat 3] [--json OUT]

- C-STORE: 2,000 small (10 KB) CT studies and 500 CT 512×512 instances over 8 DCMTK storescu
  associations at once. Two daemons each get 4 of the 8 (as a load balancer would spread them).
- HL7: 10 persistent MLLP connections sending ORM^O01 (`benchmarks/hl7.py`'s sender); two
  daemons each get 5. Orthanc has no MLLP listener.
- The senders share the machine's cores with the servers: their CPU seconds (storescu, or the
  HL7 sender processes) and the servers' are printed beside each rate.

Gate (issue 18): 2 workers ≥ 1.3× one worker's C-STORE rate under 8 associations.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, hl7, peers
from benchmarks.report import RESULTS, finish, gate, table
from benchmarks.report import start as start_report

ASSOCIATIONS = 8
HL7_CONNECTIONS = 10
TICKS = os.sysconf("SC_CLK_TCK")
POSTMASTER: list[int] = []
"""The private PostgreSQL's postmaster: its backends' CPU is the database's share of the cores."""


# -- a private PostgreSQL ----------------------------------------------------------------------


@contextmanager
def postgresql(work: Path) -> Iterator[str]:
    """A PostgreSQL of our own with fsync on; yields its SQLAlchemy URL (database `postgres`)."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if not bindir:
        raise SystemExit("PostgreSQL is not installed (apt install postgresql)")
    base = work / "pg"
    base.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = peers.free_port()
    data_dir = base / "data"
    subprocess.run([*as_user, str(bindir[0] / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "bench"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run([*as_user, str(bindir[0] / "pg_ctl"), "-D", str(data_dir), "-l", str(base / "log"), "-w",
                    "start", "-o", options], check=True, capture_output=True)  # fmt: skip
    POSTMASTER[:] = [int((data_dir / "postmaster.pid").read_text().split()[0])]
    try:
        yield f"postgresql+psycopg://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir[0] / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "stop"],
                       check=False, capture_output=True)  # fmt: skip


def fresh_database(url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + f"/{name}"


# -- the servers ---------------------------------------------------------------------------------


def daemon(place: Path, database: str, workers: int, name: str) -> peers.Server:
    """A daemon of `workers` processes, its log in `place/name`; daemons in one place share `place/data`."""
    work = place / name
    work.mkdir()
    data_dir = place / "data"
    port, http_port, hl7_port = peers.free_port(), peers.free_port(), peers.free_port()
    config = work / f"{name}.toml"
    config.write_text(
        f'[node]\ndata_dir = "{data_dir}"\ndatabase = "{database}"\nname = "{name}"\n'
        f'workers = {workers}\n[log]\nlevel = "warning"\n[dicom]\nport = {port}\nmax_associations = 40\n'
        f'[http]\nport = {http_port}\n[hl7]\nport = {hl7_port}\n[synth]\nacquisition = "manual"\n'
    )
    command = [peers.PYTHON, "-m", "fabricatord", "serve", "--config", str(config)]
    server = peers._launch(name, "FABRICATORD", command, work, port, lambda _s: 0, http_port)
    server.extra["hl7_port"] = hl7_port
    if workers > 1:  # the first worker answers the echo; wait for every one
        deadline = time.monotonic() + 60
        while len(_processes(server.process.pid)) < workers + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
    return server


def _processes(root: int) -> list[int]:
    """The server's processes: its process group and its children (workers sit in groups of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, pgid = int(fields[1]), int(fields[2])
        if int(entry.name) == root or pgid == root or ppid == root:
            found.append(int(entry.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def count_instances(url: str) -> int:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        row = connection.execute("SELECT count(*) FROM instances").fetchone()
    return int(row[0]) if row else 0


def count_orders(url: str) -> int:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection:
        row = connection.execute("SELECT count(*) FROM orders").fetchone()
    return int(row[0]) if row else 0


@contextmanager
def cluster(work: Path, url: str, number: int, daemons: int, workers: int) -> Iterator[tuple[list[peers.Server], str]]:
    """`daemons` daemons of `workers` processes each on a fresh database and storage folder:
    the servers and the database's URL; stopped and the folder removed afterwards."""
    database = fresh_database(url, f"run{number}")
    place = work / f"run{number}"
    place.mkdir()
    servers: list[peers.Server] = []
    try:
        servers.extend(daemon(place, database, workers, f"node{i}") for i in range(daemons))
        yield servers, database
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(place, ignore_errors=True)


# -- what is measured ------------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _database_cpu() -> float:
    return cpu_seconds(_processes(POSTMASTER[0])) if POSTMASTER else 0.0


def store(servers: list[peers.Server], files: list[Path]) -> tuple[float, float, float, float]:
    """The files over 8 associations, spread evenly over `servers`: (seconds, senders' CPU,
    servers' CPU, the database's CPU)."""
    shares = [files[i :: len(servers)] for i in range(len(servers))]
    pids = [pid for server in servers for pid in _processes(server.process.pid)]
    server_cpu = cpu_seconds(pids)
    database_cpu = _database_cpu()
    sender_cpu = _children_cpu()
    started = time.perf_counter()
    threads = [
        threading.Thread(target=peers.storescu, args=(s.port, s.ae_title, share, ASSOCIATIONS // len(servers)))
        for s, share in zip(servers, shares, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return seconds, _children_cpu() - sender_cpu, cpu_seconds(pids) - server_cpu, _database_cpu() - database_cpu


def messages(servers: list[peers.Server], per_connection: int) -> tuple[float, float, float, float]:
    """ORMs over 10 connections spread over `servers`: (messages/s, senders' CPU, servers' CPU,
    the database's CPU)."""
    pids = [pid for server in servers for pid in _processes(server.process.pid)]
    server_cpu = cpu_seconds(pids)
    database_cpu = _database_cpu()
    sender_cpu = _children_cpu()
    results: list[dict[str, Any]] = []
    started = time.perf_counter()

    def run(index: int, server: peers.Server) -> None:
        port = int(server.extra["hl7_port"])  # type: ignore[call-overload]
        first = index * HL7_CONNECTIONS * per_connection
        results.append(hl7.measure(port, "persistent", HL7_CONNECTIONS // len(servers), per_connection, first))

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(servers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    total = sum(int(r["messages"]) for r in results)
    return total / seconds, _children_cpu() - sender_cpu, cpu_seconds(pids) - server_cpu, _database_cpu() - database_cpu


# -- the run -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="less data: a smoke test of the harness")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    datasets = {
        "small2000": data.small_studies(400 if args.quick else 2000),
        "ct500": data.ct_study(100 if args.quick else 500),
    }
    per_connection = 50 if args.quick else 300
    start_report(cores=os.cpu_count(), associations=ASSOCIATIONS, hl7_connections=HL7_CONNECTIONS, repeat=repeat)
    configurations: dict[str, tuple[int, int]] = {  # name: (daemons, workers each)
        "fabricatord 1 worker": (1, 1),
        "fabricatord 2 workers": (1, 2),
        "fabricatord 4 workers": (1, 4),
        "fabricatord 2 daemons": (2, 1),
    }
    store_rows: list[list[Any]] = []
    hl7_rows: list[list[Any]] = []
    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="fabricatord-workers-bench-") as folder:
        work = Path(folder)
        os.chmod(work, 0o755)
        with postgresql(work) as url:
            runs_made = itertools.count(1)
            for name, (daemons, workers) in configurations.items():
                for dataset, files in datasets.items():
                    runs = []
                    for _ in range(repeat):
                        with cluster(work, url, next(runs_made), daemons, workers) as (servers, database):
                            seconds, senders, used, db = store(servers, files)
                        stored = count_instances(database)
                        if stored != len(files):
                            raise RuntimeError(f"{name} indexed {stored} of {len(files)} {dataset}")
                        runs.append((len(files) / seconds, senders, used, db))
                    rate, senders, used, db = sorted(runs)[len(runs) // 2]
                    rates[(name, dataset)] = rate
                    store_rows.append([dataset, name, rate, senders, used, db])
                runs = []
                for _ in range(repeat):
                    with cluster(work, url, next(runs_made), daemons, workers) as (servers, database):
                        runs.append(messages(servers, per_connection))
                    expected = HL7_CONNECTIONS * per_connection
                    if count_orders(database) != expected:
                        raise RuntimeError(f"{name} kept {count_orders(database)} of {expected} orders")
                rate, senders, used, db = sorted(runs)[len(runs) // 2]
                rates[(name, "hl7")] = rate
                hl7_rows.append([name, rate, senders, used, db])
        for dataset, files in datasets.items():
            runs = []
            for _ in range(repeat):
                place = Path(tempfile.mkdtemp(prefix="orthanc-", dir=work))
                server = peers.orthanc(place)
                try:
                    seconds, senders, used, _ = store([server], files)
                    stored = server.count(server)
                finally:
                    server.stop()
                if stored != len(files):
                    raise RuntimeError(f"orthanc stored {stored} of {len(files)} {dataset}")
                runs.append((len(files) / seconds, senders, used))
                shutil.rmtree(place, ignore_errors=True)
            rate, senders, used = sorted(runs)[len(runs) // 2]
            rates[("orthanc", dataset)] = rate
            store_rows.append([dataset, "orthanc", rate, senders, used, "-"])
    for row in store_rows:
        one = rates[("fabricatord 1 worker", row[0])]
        orthanc = rates[("orthanc", row[0])]
        row += [round(row[2] / one, 2), round(row[2] / orthanc, 2)]
    table(
        f"C-STORE over {ASSOCIATIONS} associations (instances/s, median of {repeat}; CPU seconds of the run)",
        ["data", "server", "inst/s", "senders' CPU s", "server's CPU s", "PostgreSQL CPU s", "÷ 1 worker", "÷ orthanc"],
        store_rows,
    )
    for row in hl7_rows:
        row.append(round(row[1] / rates[("fabricatord 1 worker", "hl7")], 2))
    table(
        f"HL7 ORM^O01 over {HL7_CONNECTIONS} connections (messages/s, median of {repeat})",
        ["server", "msg/s", "senders' CPU s", "server's CPU s", "PostgreSQL CPU s", "÷ 1 worker"],
        hl7_rows,
    )
    RESULTS["store"] = [
        dict(
            zip(
                ["data", "server", "rate", "sender_cpu", "server_cpu", "database_cpu", "ratio_one", "ratio_orthanc"],
                r,
                strict=True,
            )
        )
        for r in store_rows
    ]
    RESULTS["hl7"] = [
        dict(zip(["server", "rate", "sender_cpu", "server_cpu", "database_cpu", "ratio_one"], r, strict=True))
        for r in hl7_rows
    ]
    for dataset in datasets:
        gate(
            f"store {dataset}: 2 workers ÷ 1 worker",
            rates[("fabricatord 2 workers", dataset)] / rates[("fabricatord 1 worker", dataset)],
            1.3,
            True,
        )
    finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
