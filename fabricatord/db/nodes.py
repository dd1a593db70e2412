"""The daemons that share this database: who is there, who leads, and the leases on their jobs.

Everything here is rows and timestamps in the shared database, PostgreSQL's row locks doing the
arbitration: a node that stops renewing (it died, or lost its network) loses its leases to the
others after `LEASE`, and a node's name is taken by one live process at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from fabricatord.db.engine import Database, aware
from fabricatord.db.models import Acquisition, Commitment, FhirJob, Lease, Node, RouteJob

LEADER = "leader"


class NodeNameInUse(RuntimeError):
    """Another live process has this node's name."""


@dataclass(frozen=True)
class NodeRecord:
    name: str
    host: str
    pid: int
    version: str
    started_at: datetime
    last_seen_at: datetime
    leader: bool


class Nodes:
    def __init__(self, database: Database) -> None:
        self._db = database

    def register(
        self,
        name: str,
        host: str,
        pid: int,
        version: str,
        stale_after: timedelta,
        gone: Callable[[str, int], bool] = lambda _host, _pid: False,
    ) -> None:
        """This process is node `name` now, unless a live other process is: one seen within
        `stale_after` that `gone(host, pid)` does not know to be dead (a restart after a crash on
        the same host need not wait out the lease)."""
        now = datetime.now(UTC)
        values = {"host": host, "pid": pid, "version": version, "started_at": now, "last_seen_at": now}
        with self._db.writer.begin() as connection:
            row = connection.execute(select(Node).where(Node.name == name).with_for_update()).first()
            if row is None:
                try:
                    with connection.begin_nested():
                        connection.execute(insert(Node).values(name=name, **values))
                    return
                except IntegrityError:  # another process registered the name at this moment
                    row = connection.execute(select(Node).where(Node.name == name).with_for_update()).one()
            same_process = (row.host, row.pid) == (host, pid)
            live = now - aware(row.last_seen_at) < stale_after and not gone(row.host, row.pid)
            if not same_process and live:
                raise NodeNameInUse(
                    f"node name {name!r} is in use by pid {row.pid} on {row.host} (seen "
                    f"{(now - aware(row.last_seen_at)).total_seconds():.0f} s ago): give this daemon "
                    "another [node] name"
                )
            connection.execute(update(Node).where(Node.name == name).values(**values))

    def heartbeat(self, name: str, lease: timedelta) -> None:
        """Still here: the node's row and the leases of the jobs it runs are renewed together."""
        now = datetime.now(UTC)
        until = now + lease
        with self._db.writer.begin() as connection:
            connection.execute(update(Node).where(Node.name == name).values(last_seen_at=now))
            connection.execute(
                update(Acquisition)
                .where(Acquisition.leased_by == name, Acquisition.state == "running")
                .values(lease_until=until)
            )
            connection.execute(
                update(RouteJob)
                .where(RouteJob.leased_by == name, RouteJob.state == "sending")
                .values(lease_until=until)
            )
            connection.execute(
                update(FhirJob).where(FhirJob.leased_by == name, FhirJob.state == "sending").values(lease_until=until)
            )
            connection.execute(
                update(Commitment)
                .where(Commitment.leased_by == name, Commitment.state == "sending")
                .values(lease_until=until)
            )

    def lead(self, name: str, lease: timedelta, role: str = LEADER) -> bool:
        """Take or keep `role` for `lease`; whether this node holds it now."""
        now = datetime.now(UTC)
        with self._db.writer.begin() as connection:
            taken = connection.execute(
                update(Lease)
                .where(Lease.name == role, or_(Lease.holder == name, Lease.expires_at < now))
                .values(holder=name, expires_at=now + lease)
            )
            if int(getattr(taken, "rowcount", 0) or 0):
                return True
            if connection.execute(select(Lease.holder).where(Lease.name == role)).first() is not None:
                return False
            try:
                with connection.begin_nested():
                    connection.execute(insert(Lease).values(name=role, holder=name, expires_at=now + lease))
                return True
            except IntegrityError:  # another node took it first
                return False

    def leave(self, name: str) -> None:
        """A clean stop: the roles this node holds are free at once, its row says when it left."""
        with self._db.writer.begin() as connection:
            connection.execute(delete(Lease).where(Lease.holder == name))
            connection.execute(update(Node).where(Node.name == name).values(last_seen_at=datetime.now(UTC)))

    def listing(self) -> list[NodeRecord]:
        now = datetime.now(UTC)
        with self._db.engine.connect() as connection:
            leader = connection.execute(
                select(Lease.holder).where(Lease.name == LEADER, Lease.expires_at >= now)
            ).scalar_one_or_none()
            return [
                NodeRecord(
                    row.name,
                    row.host,
                    row.pid,
                    row.version,
                    aware(row.started_at),
                    aware(row.last_seen_at),
                    row.name == leader,
                )
                for row in connection.execute(select(Node).order_by(Node.name))
            ]
