"""Two daemons on one PostgreSQL and one storage folder, as two nodes behind a load balancer:
what one is told the other answers, a duplicate order is kept once, and when one is killed in
the middle of routing the other finishes its jobs after the lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PostgresServer, free_port, need
from tests.integration.conftest import Daemon, dcmtk, findscu, halt, launch, running_peer, storescu
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import msa, order, send

LEASE = "3s"


@pytest.fixture
def cluster(
    tmp_path: Path, postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Daemon]]:
    """Start nodes that share `tmp_path/data` and one fresh PostgreSQL database."""
    url = postgres_server.fresh_database(f"nodes_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}")
    started: list[Daemon] = []

    def start(name: str, extra: str = "", fault: str = "") -> Daemon:
        env = {"FABRICATORD__NODE__NAME": name, "FABRICATORD__NODE__LEASE": LEASE}
        if fault:
            env["FABRICATORD_FAULTPOINT"] = fault
        daemon = launch(tmp_path, name, extra, env=env, database_url=url)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        halt(daemon)


def nodes(daemon: Daemon) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "fabricatord", "nodes", "--json", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "FABRICATORD_CONFIG": "", "FABRICATORD__NODE__DATABASE": daemon.database_url},
        timeout=60,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_two_nodes_share_orders_worklist_storage_and_retrieval(cluster: Callable[..., Daemon], tmp_path: Path) -> None:
    destination_port = free_port()
    peers = f'[[peers]]\nname = "dest"\nae_title = "DEST"\nport = {destination_port}\n'
    alpha, beta = cluster("alpha", peers), cluster("beta", peers)
    # HL7 to the first, the worklist from the second; the same order sent to both is kept once.
    assert msa(send(alpha, order("N-1", "NW", "SC", "ACCN1")))[0] == "AA"
    assert msa(send(beta, order("N-2", "NW", "SC", "ACCN1")))[0] == "AA"
    [item] = findscu(beta, tmp_path, "-W", "AccessionNumber=ACCN1")
    assert item.AccessionNumber == "ACCN1"
    # C-STOREs spread over both: each instance indexed once, in the one storage folder.
    generated = tmp_path / "made"
    subprocess.run(
        [sys.executable, "-m", "fabricatord", "generate", "--modality", "CT", "--series", "1", "--images", "6",
         "--out", str(generated)],
        check=True, capture_output=True, env={**os.environ, "FABRICATORD__NODE__DATA_DIR": str(tmp_path / "gen")},
        timeout=300,
    )  # fmt: skip
    files = sorted(generated.rglob("*.dcm"))
    assert storescu(alpha.port, files[:3]).returncode == 0
    assert storescu(beta.port, files[3:]).returncode == 0
    [study] = findscu(
        alpha, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "NumberOfStudyRelatedInstances"
    )
    assert int(study.NumberOfStudyRelatedInstances) == 6
    # A C-MOVE from the second node of what the first stored: the files are where both look.
    received = tmp_path / "dest"
    received.mkdir()
    storescp = ["storescp", "-aet", "DEST", "-od", str(received), "--accept-all", str(destination_port)]
    with running_peer(storescp, destination_port, "ANY"):
        moved = dcmtk(
            "movescu", "-S", "-aet", "PACS", "-aec", "FABRICATORD", "-aem", "DEST",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.StudyInstanceUID}",
            "127.0.0.1", str(beta.port),
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr
    assert len(list(received.iterdir())) == 6
    listed = {n["name"]: n for n in nodes(alpha)}
    assert set(listed) >= {"alpha", "beta"}
    assert [name for name, n in listed.items() if n["leader"]] in (["alpha"], ["beta"])


def test_a_node_killed_mid_routing_leaves_its_jobs_to_the_other(cluster: Callable[..., Daemon], tmp_path: Path) -> None:
    need("storescp")
    peer_port = free_port()
    route = (
        f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nport = {peer_port}\n'
        '[[routes]]\nname = "all"\nmatch = { source = "generated" }\nto = ["pacs"]\n'
    )
    received = tmp_path / "pacs"
    received.mkdir()
    storescp = ["storescp", "-aet", "PACS", "-od", str(received), "--accept-all", str(peer_port)]
    with running_peer(storescp, peer_port, "ANY"):
        alpha = cluster("alpha", route, fault="route.after_send:kill")
        made = subprocess.run(
            [sys.executable, "-m", "fabricatord", "generate", "--modality", "CT", "--series", "1", "--images", "8",
             "--config", str(alpha.config)],
            capture_output=True, text=True,
            env={**os.environ, "FABRICATORD_CONFIG": "", "FABRICATORD__NODE__DATABASE": alpha.database_url},
            timeout=300,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        alpha.process.wait(timeout=60)  # the fault kills it after its first send
        assert alpha.process.returncode == -signal.SIGKILL
        # alpha sent the study and died before it recorded so: its jobs are still `sending`,
        # under its lease. beta takes them once the lease has run out and sends them again.
        assert {state for state, _ in route_jobs(alpha)} == {"sending"}
        beta = cluster("beta", route)
        wait_for(lambda: route_jobs(beta) == [("done", "beta")] * 8, seconds=90)
        assert len(list(received.iterdir())) == 8  # each SOP Instance UID once at the peer
        # The leader's lease passed to beta too: it echoes the peers, alpha's row stays as last seen.
        wait_for(lambda: beta.metric("fabricatord_peer_up", peer="pacs") == 1.0, seconds=60)
    listed = {n["name"]: n for n in nodes(beta)}
    assert listed["beta"]["leader"] is True and listed["alpha"]["leader"] is False


def route_jobs(daemon: Daemon) -> list[tuple[str, str]]:
    return [
        (str(state), str(node)) for state, node in daemon.query("SELECT state, leased_by FROM route_jobs ORDER BY id")
    ]
