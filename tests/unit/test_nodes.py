"""Several nodes on one database: names, the leader's lease, job leases and whose storage intents
are whose, on SQLite and on PostgreSQL (where claims skip each other's locked rows)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from fabricatord.config.values import check_node_name
from fabricatord.db import InstanceIndex, open_database
from fabricatord.db.jobs import RouteJobs
from fabricatord.db.models import Lease, RouteJob
from fabricatord.db.nodes import NodeNameInUse, Nodes

LEASE = timedelta(seconds=30)


def _jobs(database: object, count: int, study: str = "1.2.3") -> None:
    with database.writer.begin() as connection:  # type: ignore[attr-defined]
        RouteJobs.enqueue(connection, [(f"{study}.{n}", study, "pacs", "r") for n in range(count)])


def test_a_node_name_is_one_live_process_at_a_time(database_url: str) -> None:
    nodes = Nodes(open_database(database_url))
    nodes.register("alpha", "host1", 100, "0.1.0", stale_after=LEASE)
    nodes.register("alpha", "host1", 100, "0.1.0", stale_after=LEASE)  # the same process again: fine
    with pytest.raises(NodeNameInUse, match="pid 100 on host1"):
        nodes.register("alpha", "host2", 200, "0.1.0", stale_after=LEASE)
    # A holder known to be dead (a crash on this host) gives its name up at once.
    nodes.register("alpha", "host2", 150, "0.1.0", stale_after=LEASE, gone=lambda host, pid: pid == 100)
    nodes.register("alpha", "host1", 100, "0.1.0", stale_after=timedelta(0))
    # Once the holder has not been seen for longer than the lease, its name is free.
    nodes.register("alpha", "host2", 200, "0.1.0", stale_after=timedelta(0))
    [listed] = nodes.listing()
    assert (listed.name, listed.host, listed.pid) == ("alpha", "host2", 200)


def test_one_leader_until_it_leaves_or_its_lease_runs_out(database_url: str) -> None:
    database = open_database(database_url)
    nodes = Nodes(database)
    for name in ("alpha", "beta"):
        nodes.register(name, "host", hash(name) % 1000, "0.1.0", stale_after=LEASE)
    assert nodes.lead("alpha", LEASE) is True
    assert nodes.lead("beta", LEASE) is False
    assert nodes.lead("alpha", LEASE) is True  # renewing
    assert [n.name for n in nodes.listing() if n.leader] == ["alpha"]
    with database.writer.begin() as connection:  # alpha stops renewing
        connection.execute(update(Lease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert nodes.lead("beta", LEASE) is True
    assert nodes.lead("alpha", LEASE) is False
    nodes.leave("beta")
    assert nodes.lead("alpha", LEASE) is True


def test_a_claimed_job_is_its_nodes_until_the_lease_runs_out(database_url: str) -> None:
    database = open_database(database_url)
    _jobs(database, 3)
    alpha, beta = RouteJobs(database, "alpha", LEASE), RouteJobs(database, "beta", LEASE)
    claimed = alpha.claim()
    assert len(claimed) == 3
    assert beta.claim() == []
    Nodes(database).heartbeat("alpha", LEASE)  # renewing keeps them
    assert beta.claim() == []
    with database.writer.begin() as connection:  # alpha died: nobody renews
        connection.execute(update(RouteJob).values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))
    taken = beta.claim()
    assert sorted(job.id for job in taken) == sorted(job.id for job in claimed)
    assert all(job.attempts == 1 for job in taken)  # as read at the claim: one attempt before
    # alpha coming back late cannot settle what beta holds now; beta can.
    alpha.settle([job.id for job in claimed], {}, {})
    assert {job.state for job in beta.listing()} == {"sending"}
    assert alpha.recover() == 0  # alpha's restart takes back only its own
    beta.settle([job.id for job in taken], {}, {})
    assert {job.state for job in beta.listing()} == {"done"}


def test_a_restarted_node_takes_back_what_it_left_claimed(database_url: str) -> None:
    database = open_database(database_url)
    _jobs(database, 2)
    RouteJobs(database, "alpha", LEASE).claim()
    assert RouteJobs(database, "beta", LEASE).recover() == 0
    assert RouteJobs(database, "alpha", LEASE).recover() == 2
    assert {job.state for job in RouteJobs(database).listing()} == {"pending"}


def test_nodes_claiming_at_once_never_share_a_job(database_url: str) -> None:
    database = open_database(database_url)
    for study in range(20):
        _jobs(database, 2, f"1.2.{study + 1}")
    taken: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def work(name: str) -> None:
        jobs = RouteJobs(database, name, LEASE)
        barrier.wait()
        mine: list[int] = []
        while claimed := jobs.claim():
            mine += [job.id for job in claimed]
            jobs.settle([job.id for job in claimed], {}, {})
        taken[name] = mine

    threads = [threading.Thread(target=work, args=(f"node{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    every = [pk for ids in taken.values() for pk in ids]
    assert len(every) == 40 and len(set(every)) == 40


def test_recovery_settles_only_this_nodes_storage_intents(database_url: str) -> None:
    database = open_database(database_url)
    InstanceIndex(database, node="alpha").add_intents([("1.2.3.1", "a/1.dcm")])
    InstanceIndex(database, node="beta").add_intents([("1.2.3.2", "b/2.dcm")])
    assert [i.path for i in InstanceIndex(database, node="alpha").intents()] == ["a/1.dcm"]
    assert [i.path for i in InstanceIndex(database, node="beta").intents()] == ["b/2.dcm"]


@pytest.mark.parametrize(
    ("name", "ok"), [("", True), ("node-1.example_a", True), ("a" * 64, True), ("a" * 65, False), ("a/b", False)]
)
def test_node_names(name: str, ok: bool) -> None:
    assert (check_node_name(name) is None) is ok
