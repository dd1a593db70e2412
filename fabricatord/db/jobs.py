"""Durable jobs: acquisitions (worklist steps the simulated modality performs), route jobs (stored
instances to send to peers) and FHIR jobs (complete studies to send to FHIR servers). A worker
claims a job by moving it to `running` or `sending` in a transaction of its own, under a lease
in its node's name (`FOR UPDATE SKIP LOCKED` on PostgreSQL: several nodes claim side by side
without waiting on each other). The node renews the lease while it works; a job whose lease ran
out (its node died) is claimed by another, and at start a node takes back what it left claimed
itself: a restart neither loses nor forgets a job."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import aliased

from fabricatord.config import Settings
from fabricatord.db import raw
from fabricatord.db.engine import Database, hold_keys
from fabricatord.db.models import Acquisition, FhirJob, RequestedProcedure, RouteJob, ScheduledStep, Study

OPEN_ROUTE = ("pending", "sending")
LEASE = timedelta(seconds=30)
"""How long a claimed job is its node's without a renewal (the node renews it every third of it)."""


@dataclass(frozen=True)
class AcquisitionRecord:
    id: int
    step_pk: int
    policy: str
    state: str
    due_at: datetime | None
    attempts: int
    last_error: str
    study_instance_uid: str
    performed_step_uid: str
    instances: int
    updated_at: datetime


@dataclass(frozen=True)
class RouteRecord:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    peer: str
    route: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str
    updated_at: datetime


_ACQUISITION_COLUMNS = [getattr(Acquisition, name) for name in AcquisitionRecord.__dataclass_fields__]
_ROUTE_COLUMNS = [getattr(RouteJob, name) for name in RouteRecord.__dataclass_fields__]


_ORDER_STEPS = (
    select(ScheduledStep.id, ScheduledStep.modality)
    .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
    .where(RequestedProcedure.order_pk == bindparam("order_pk"))
)
_INSERT_ACQUISITION = insert(Acquisition)
_INSERT_JOB = insert(RouteJob).inline()


def _acquisition_row(step_pk: int, policy: str, due_at: datetime | None, now: datetime) -> dict[str, Any]:
    return {
        "step_pk": step_pk,
        "policy": policy,
        "state": "pending" if due_at is not None else "waiting",
        "due_at": due_at,
        "attempts": 0,
        "last_error": "",
        "study_instance_uid": "",
        "performed_step_uid": "",
        "instances": 0,
        "leased_by": "",
        "created_at": now,
        "updated_at": now,
    }


def _any(database: Database, statement: Select[Any]) -> bool:
    """A look without the write lock: idle workers poll, and must not hold up the writers."""
    with database.engine.connect() as connection:
        return connection.execute(statement.limit(1)).first() is not None


class Acquisitions:
    def __init__(self, database: Database, node: str = "", lease: timedelta = LEASE) -> None:
        self._db = database
        self._node = node
        self._lease = lease

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        return claimable(Acquisition, Acquisition.due_at, "running", now)

    @staticmethod
    def schedule_order(connection: Connection, order_pk: int, settings: Settings) -> int:
        """Acquisition jobs for every step of a new order, each by its modality's policy, in the
        transaction that made the order; how many are due at once."""
        now = datetime.now(UTC)
        rows = []
        cursor = raw.run(connection, _ORDER_STEPS, {"order_pk": order_pk})
        for step_pk, modality in cursor.fetchall():
            policy, seconds = settings.acquisition(modality)
            due = None if seconds is None else now + timedelta(seconds=seconds)
            rows.append(_acquisition_row(step_pk, policy, due, now))
        cursor.close()
        raw.run_many(connection, _INSERT_ACQUISITION, rows)
        return sum(row["due_at"] == now for row in rows)

    @staticmethod
    def cancel(connection: Connection, step_pks: Iterable[int]) -> int:
        """Acquisitions of these steps that have not run stop here (a cancelled order)."""
        pks = list(step_pks)
        if not pks:
            return 0
        result = connection.execute(
            update(Acquisition)
            .where(Acquisition.step_pk.in_(pks), Acquisition.state.in_(("waiting", "pending")))
            .values(state="canceled", updated_at=datetime.now(UTC))
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def release(self, step_pks: Iterable[int], policies: tuple[str, ...] = ("manual", "on_query")) -> int:
        """Waiting acquisitions of these steps become due now (`fabricatord acquire`, or a
        modality fetched the item for `on_query`); how many."""
        pks = list(step_pks)
        if not pks:
            return 0
        now = datetime.now(UTC)
        with self._db.writer.begin() as connection:
            result = connection.execute(
                update(Acquisition)
                .where(
                    Acquisition.step_pk.in_(pks),
                    Acquisition.state == "waiting",
                    Acquisition.policy.in_(policies),
                )
                .values(state="pending", due_at=now, updated_at=now)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def claim(self, limit: int = 1) -> list[AcquisitionRecord]:
        """Due acquisitions, and running ones whose node's lease ran out, moved to `running`
        under this node's lease (one attempt more) before anyone else sees them."""
        now = datetime.now(UTC)
        if not _any(self._db, select(Acquisition.id).where(self._claimable(now))):
            return []
        with self._db.writer.begin() as connection:
            rows = connection.execute(
                select(*_ACQUISITION_COLUMNS)
                .where(self._claimable(now))
                .order_by(Acquisition.due_at, Acquisition.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                take(connection, Acquisition, [row.id for row in rows], "running", self._node, now, self._lease)
            return [AcquisitionRecord(*row) for row in rows]

    def finish(
        self,
        pk: int,
        state: str,
        error: str = "",
        study_instance_uid: str = "",
        performed_step_uid: str = "",
        instances: int = 0,
        retry_at: datetime | None = None,
    ) -> None:
        """`done`, `failed`, or back to `pending` at `retry_at`."""
        values: dict[str, object] = {"state": state, "last_error": error[:512], "updated_at": datetime.now(UTC)}
        if study_instance_uid:
            values.update(study_instance_uid=study_instance_uid, instances=instances)
        if performed_step_uid:
            values["performed_step_uid"] = performed_step_uid
        if retry_at is not None:
            values["due_at"] = retry_at
        with self._db.writer.begin() as connection:
            # Only while the job is still ours: a node that lost its lease leaves the job to its taker.
            connection.execute(
                update(Acquisition)
                .where(Acquisition.id == pk, Acquisition.leased_by == self._node, Acquisition.state == "running")
                .values(**values, lease_until=None)
            )

    def recover(self) -> int:
        """At start: what this node was running when it died runs again (generation repeats the
        same UIDs); rows from before leases had names count as this node's."""
        with self._db.writer.begin() as connection:
            result = connection.execute(
                update(Acquisition)
                .where(Acquisition.state == "running", Acquisition.leased_by.in_((self._node, "")))
                .values(state="pending", lease_until=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def next_due(self) -> datetime | None:
        with self._db.engine.connect() as connection:
            return connection.execute(
                select(func.min(Acquisition.due_at)).where(Acquisition.state == "pending")
            ).scalar_one_or_none()

    def listing(self, states: Iterable[str] = (), limit: int = 50) -> list[AcquisitionRecord]:
        statement = select(*_ACQUISITION_COLUMNS).order_by(Acquisition.id.desc()).limit(limit)
        wanted = list(states)
        if wanted:
            statement = statement.where(Acquisition.state.in_(wanted))
        with self._db.engine.connect() as connection:
            return [AcquisitionRecord(*row) for row in connection.execute(statement)]

    def by_ids(self, pks: Iterable[int]) -> list[AcquisitionRecord]:
        with self._db.engine.connect() as connection:
            rows = connection.execute(select(*_ACQUISITION_COLUMNS).where(Acquisition.id.in_(list(pks))))
            return [AcquisitionRecord(*row) for row in rows]

    def retry(self, pks: Iterable[int]) -> list[int]:
        """Due now, and the ids touched: failed or canceled acquisitions with a fresh count of
        attempts, and pending ones waiting out their backoff (their count goes on)."""
        with self._db.writer.begin() as connection:
            return _due_now(connection, Acquisition, Acquisition.due_at, list(pks))

    def cancel_jobs(self, pks: Iterable[int]) -> list[int]:
        """Waiting or pending acquisitions canceled; the ids touched."""
        with self._db.writer.begin() as connection:
            touched = (
                connection.execute(
                    update(Acquisition)
                    .where(Acquisition.id.in_(list(pks)), Acquisition.state.in_(("waiting", "pending")))
                    .values(state="canceled", updated_at=datetime.now(UTC))
                    .returning(Acquisition.id)
                )
                .scalars()
                .all()
            )
        return sorted(touched)

    def for_steps(self, step_pks: Iterable[int]) -> list[AcquisitionRecord]:
        with self._db.engine.connect() as connection:
            rows = connection.execute(select(*_ACQUISITION_COLUMNS).where(Acquisition.step_pk.in_(list(step_pks))))
            return [AcquisitionRecord(*row) for row in rows]


class RouteJobs:
    def __init__(self, database: Database, node: str = "", lease: timedelta = LEASE) -> None:
        self._db = database
        self._node = node
        self._lease = lease

    @staticmethod
    def enqueue(connection: Connection, jobs: Iterable[tuple[str, str, str, str]]) -> int:
        """(SOP Instance UID, Study Instance UID, peer, route) each, in the caller's transaction
        (the one that indexes the instance: nothing stored escapes its routes)."""
        now = datetime.now(UTC)
        rows = [
            {
                "sop_instance_uid": sop,
                "study_instance_uid": study,
                "peer": peer,
                "route": route,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "last_error": "",
                "leased_by": "",
                "created_at": now,
                "updated_at": now,
            }
            for sop, study, peer, route in jobs
        ]
        raw.run_many(connection, _INSERT_JOB, rows)
        return len(rows)

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        return claimable(RouteJob, RouteJob.next_attempt_at, "sending", now)

    def claim(self, limit: int = 500) -> list[RouteRecord]:
        """Due jobs of one peer and one study (one association sends them), and sending ones
        whose node's lease ran out, moved to `sending` under this node's lease."""
        now = datetime.now(UTC)
        if not _any(self._db, select(RouteJob.id).where(self._claimable(now))):
            return []
        with self._db.writer.begin() as connection:
            first = connection.execute(
                select(RouteJob.peer, RouteJob.study_instance_uid)
                .where(self._claimable(now))
                .order_by(RouteJob.next_attempt_at, RouteJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if first is None:
                return []
            rows = connection.execute(
                select(*_ROUTE_COLUMNS)
                .where(
                    self._claimable(now),
                    RouteJob.peer == first.peer,
                    RouteJob.study_instance_uid == first.study_instance_uid,
                )
                .order_by(RouteJob.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            take(connection, RouteJob, [row.id for row in rows], "sending", self._node, now, self._lease)
            return [RouteRecord(*row) for row in rows]

    def settle(self, done: Iterable[int], retry: dict[int, tuple[datetime, str]], failed: dict[int, str]) -> None:
        """After a send: `done` ids, ids to retry at a time (with why), ids given up (with why).
        A job whose lease this node lost meanwhile is left to the node that took it."""
        settle_claimed(self._db, RouteJob, self._node, done, retry, failed)

    def delivered(self, peer: str, study_instance_uid: str) -> int | None:
        """How many of the study's jobs to `peer` are done; None while any is still open."""
        with self._db.engine.connect() as connection:
            counts = dict(
                connection.execute(
                    select(RouteJob.state, func.count(RouteJob.id))
                    .where(RouteJob.peer == peer, RouteJob.study_instance_uid == study_instance_uid)
                    .group_by(RouteJob.state)
                ).all()
            )
        if any(counts.get(state) for state in OPEN_ROUTE):
            return None
        return int(counts.get("done", 0))

    def verified(self, peer: str, study_instance_uid: str) -> None:
        now = datetime.now(UTC)
        with self._db.writer.begin() as connection:
            connection.execute(
                update(RouteJob)
                .where(
                    RouteJob.peer == peer,
                    RouteJob.study_instance_uid == study_instance_uid,
                    RouteJob.state == "done",
                )
                .values(verified_at=now)
            )

    @staticmethod
    def committed(connection: Connection, verified: Iterable[int], not_committed: dict[int, int]) -> None:
        """A Storage Commitment report on sent jobs, in the caller's transaction: those committed
        verified; the others failed with their Failure Reason, for `jobs retry` to send again."""
        now = datetime.now(UTC)
        confirmed = list(verified)
        if confirmed:
            connection.execute(
                update(RouteJob)
                .where(RouteJob.id.in_(confirmed), RouteJob.state == "done")
                .values(verified_at=now, last_error="")
            )
        for pk, reason in not_committed.items():
            connection.execute(
                update(RouteJob)
                .where(RouteJob.id == pk, RouteJob.state == "done")
                .values(
                    state="failed",
                    last_error=f"sent, but the peer did not commit it: failure reason 0x{reason:04X}",
                    updated_at=now,
                )
            )

    def note(self, pks: Iterable[int], why: str) -> None:
        """Why done jobs are not confirmed (yet): their state stays; one confirmed meanwhile is left."""
        with self._db.writer.begin() as connection:
            connection.execute(
                update(RouteJob)
                .where(RouteJob.id.in_(list(pks)), RouteJob.state == "done", RouteJob.verified_at.is_(None))
                .values(last_error=why[:512], updated_at=datetime.now(UTC))
            )

    def recover(self) -> int:
        """At start: what this node was sending when it died is sent again (C-STORE is
        at-least-once); rows from before leases had names count as this node's."""
        return recover_claimed(self._db, RouteJob, self._node)

    def listing(self, states: Iterable[str] = (), study_instance_uid: str = "", limit: int = 50) -> list[RouteRecord]:
        statement = select(*_ROUTE_COLUMNS).order_by(RouteJob.id.desc()).limit(limit)
        wanted = list(states)
        if wanted:
            statement = statement.where(RouteJob.state.in_(wanted))
        if study_instance_uid:
            statement = statement.where(RouteJob.study_instance_uid == study_instance_uid)
        with self._db.engine.connect() as connection:
            return [RouteRecord(*row) for row in connection.execute(statement)]

    def by_ids(self, pks: Iterable[int]) -> list[RouteRecord]:
        with self._db.engine.connect() as connection:
            rows = connection.execute(select(*_ROUTE_COLUMNS).where(RouteJob.id.in_(list(pks))))
            return [RouteRecord(*row) for row in rows]

    def gauges(self) -> tuple[dict[str, int], dict[str, tuple[int, datetime]]]:
        """(jobs by state, {peer: (jobs waiting, oldest created_at)}) for the metrics."""
        with self._db.engine.connect() as connection:
            states = {
                str(s): int(n)
                for s, n in connection.execute(select(RouteJob.state, func.count()).group_by(RouteJob.state))
            }
            waiting = {
                str(peer): (int(n), oldest)
                for peer, n, oldest in connection.execute(
                    select(RouteJob.peer, func.count(), func.min(RouteJob.created_at))
                    .where(RouteJob.state.in_(OPEN_ROUTE))
                    .group_by(RouteJob.peer)
                )
            }
        return states, waiting

    def retry(self, pks: Iterable[int]) -> list[int]:
        """Due now, and the ids touched: failed or canceled jobs back to pending with a fresh
        count of attempts, and pending ones waiting out their backoff (their count goes on)."""
        with self._db.writer.begin() as connection:
            return _due_now(connection, RouteJob, RouteJob.next_attempt_at, list(pks))

    def cancel(self, pks: Iterable[int]) -> list[int]:
        """Pending jobs canceled; the ids touched."""
        return _cancel_pending(self._db, RouteJob, pks)


@dataclass(frozen=True)
class FhirRecord:
    id: int
    study_instance_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str
    updated_at: datetime


_FHIR_COLUMNS = [getattr(FhirJob, name) for name in FhirRecord.__dataclass_fields__]
_OTHER_FHIR = aliased(FhirJob)


class FhirJobs:
    """Complete studies to send to FHIR destinations: one job per study and destination, put
    in the transaction that made the study complete (or indexed its latest arrival)."""

    def __init__(self, database: Database, node: str = "", lease: timedelta = LEASE) -> None:
        self._db = database
        self._node = node
        self._lease = lease

    @staticmethod
    def schedule(
        connection: Connection, study_uids: Iterable[str], destinations: Sequence[str], due: datetime, sooner: bool
    ) -> int:
        """A pending job per study and destination, due at `due`. One pending already moves to
        `due`: with `sooner` only forward (a study complete now), else wherever it falls (each
        arrival puts its study's job a stable age after it). A study not stored gets none. How
        many were made."""
        wanted = sorted(set(study_uids))
        if not wanted or not destinations:
            return 0
        # Only stored studies: an MPPS COMPLETED may come before the images; their arrival schedules it.
        stored = select(Study.study_instance_uid).where(Study.study_instance_uid.in_(wanted))
        studies = sorted(connection.execute(stored).scalars())
        if not studies:
            return 0
        now = datetime.now(UTC)
        # Moved only while still pending: one the exporter claimed meanwhile may have been built
        # without the newest instance, so the pair gets a pending job of its own below.
        when = case((FhirJob.next_attempt_at > due, due), else_=FhirJob.next_attempt_at) if sooner else due
        pending = connection.execute(
            update(FhirJob)
            .where(
                FhirJob.study_instance_uid.in_(studies),
                FhirJob.destination.in_(list(destinations)),
                FhirJob.state == "pending",
            )
            .values(next_attempt_at=when, updated_at=now)
            .returning(FhirJob.study_instance_uid, FhirJob.destination)
        ).all()
        have = {(row.study_instance_uid, row.destination) for row in pending}
        rows = [
            {
                "study_instance_uid": study,
                "destination": destination,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": due,
                "last_error": "",
                "leased_by": "",
                "created_at": now,
                "updated_at": now,
            }
            for study in studies
            for destination in destinations
            if (study, destination) not in have
        ]
        if rows:
            connection.execute(insert(FhirJob), rows)
        return len(rows)

    def _claimable(self, now: datetime) -> ColumnElement[bool]:
        return claimable(FhirJob, FhirJob.next_attempt_at, "sending", now)

    def claim(self) -> list[FhirRecord]:
        """The due jobs of one study and destination (several when arrivals came during a
        send), never while another node still sends that pair, moved to `sending`."""
        now = datetime.now(UTC)
        if not _any(self._db, select(FhirJob.id).where(self._claimable(now))):
            return []
        busy = select(_OTHER_FHIR.id).where(
            _OTHER_FHIR.study_instance_uid == FhirJob.study_instance_uid,
            _OTHER_FHIR.destination == FhirJob.destination,
            _OTHER_FHIR.state == "sending",
            _OTHER_FHIR.lease_until >= now,
        )
        with self._db.writer.begin() as connection:
            first = connection.execute(
                select(FhirJob.study_instance_uid, FhirJob.destination)
                .where(self._claimable(now), ~exists(busy))
                .order_by(FhirJob.next_attempt_at, FhirJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if first is None:
                return []
            # One claimer per pair at a time (other processes wait here, then see its claim), and
            # every claimable row of the pair nobody else is claiming taken together: never two
            # sends of it at once. A row another claimer locked is skipped, never waited for: it
            # waits for our advisory lock, and we would wait for it.
            hold_keys(connection, [f"f{first.study_instance_uid}|{first.destination}"])
            pair = (FhirJob.study_instance_uid == first.study_instance_uid, FhirJob.destination == first.destination)
            if connection.execute(
                select(FhirJob.id).where(*pair, FhirJob.state == "sending", FhirJob.lease_until >= now).limit(1)
            ).first():
                return []
            rows = connection.execute(
                select(*_FHIR_COLUMNS)
                .where(self._claimable(now), *pair)
                .order_by(FhirJob.id)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            take(connection, FhirJob, [row.id for row in rows], "sending", self._node, now, self._lease)
            return [FhirRecord(*row) for row in rows]

    def settle(self, done: Iterable[int], retry: dict[int, tuple[datetime, str]], failed: dict[int, str]) -> None:
        settle_claimed(self._db, FhirJob, self._node, done, retry, failed)

    def recover(self) -> int:
        """At start: what this node was sending when it died is sent again (the conditional
        requests make a resend harmless)."""
        return recover_claimed(self._db, FhirJob, self._node)

    def listing(self, states: Iterable[str] = (), study_instance_uid: str = "", limit: int = 50) -> list[FhirRecord]:
        statement = select(*_FHIR_COLUMNS).order_by(FhirJob.id.desc()).limit(limit)
        wanted = list(states)
        if wanted:
            statement = statement.where(FhirJob.state.in_(wanted))
        if study_instance_uid:
            statement = statement.where(FhirJob.study_instance_uid == study_instance_uid)
        with self._db.engine.connect() as connection:
            return [FhirRecord(*row) for row in connection.execute(statement)]

    def by_ids(self, pks: Iterable[int]) -> list[FhirRecord]:
        with self._db.engine.connect() as connection:
            return [
                FhirRecord(*row) for row in connection.execute(select(*_FHIR_COLUMNS).where(FhirJob.id.in_(list(pks))))
            ]

    def retry(self, pks: Iterable[int]) -> list[int]:
        """As route jobs, and a done one too: the study sent again (the EHR lost it, or was
        reset), which its conditional requests make harmless."""
        with self._db.writer.begin() as connection:
            return _due_now(connection, FhirJob, FhirJob.next_attempt_at, list(pks), ("failed", "canceled", "done"))

    def cancel(self, pks: Iterable[int]) -> list[int]:
        return _cancel_pending(self._db, FhirJob, pks)


def take(
    connection: Connection, job: Any, ids: list[int], claimed: str, node: str, now: datetime, lease: timedelta
) -> None:
    """Claimed jobs of any kind (`job` its model) moved to `claimed` under `node`'s lease, one attempt more."""
    connection.execute(
        update(job)
        .where(job.id.in_(ids))
        .values(state=claimed, attempts=job.attempts + 1, leased_by=node, lease_until=now + lease, updated_at=now)
    )


def settle_claimed(
    database: Database,
    job: Any,
    node: str,
    done: Iterable[int],
    retry: dict[int, tuple[datetime, str]],
    failed: dict[int, str],
) -> None:
    """Route or FHIR jobs after a send (`job` their model), only those still this node's."""
    now = datetime.now(UTC)
    ours = and_(job.leased_by == node, job.state == "sending")
    with database.writer.begin() as connection:
        finished = list(done)
        if finished:
            connection.execute(
                update(job)
                .where(job.id.in_(finished), ours)
                .values(state="done", last_error="", lease_until=None, updated_at=now)
            )
        for pk, (when, why) in retry.items():
            connection.execute(
                update(job)
                .where(job.id == pk, ours)
                .values(state="pending", next_attempt_at=when, last_error=why[:512], lease_until=None, updated_at=now)
            )
        for pk, why in failed.items():
            connection.execute(
                update(job)
                .where(job.id == pk, ours)
                .values(state="failed", last_error=why[:512], lease_until=None, updated_at=now)
            )


def recover_claimed(database: Database, job: Any, node: str) -> int:
    with database.writer.begin() as connection:
        result = connection.execute(
            update(job)
            .where(job.state == "sending", job.leased_by.in_((node, "")))
            .values(state="pending", lease_until=None)
        )
        return int(getattr(result, "rowcount", 0) or 0)


def _cancel_pending(database: Database, job: Any, pks: Iterable[int]) -> list[int]:
    with database.writer.begin() as connection:
        touched = (
            connection.execute(
                update(job)
                .where(job.id.in_(list(pks)), job.state == "pending")
                .values(state="canceled", updated_at=datetime.now(UTC))
                .returning(job.id)
            )
            .scalars()
            .all()
        )
    return sorted(touched)


def claimable(job: Any, due: Any, claimed: str, now: datetime) -> ColumnElement[bool]:
    """Either kind of job a node may claim now: pending and due, or claimed (`claimed` state)
    by a node whose lease ran out."""
    return or_(and_(job.state == "pending", due <= now), and_(job.state == claimed, job.lease_until < now))


def _due_now(
    connection: Connection, job: Any, due: Any, wanted: list[int], ended: tuple[str, ...] = ("failed", "canceled")
) -> list[int]:
    """`jobs retry` for any kind of job (`job` its model, `due` its due column): `ended` ones
    pending again with a fresh count, pending ones in backoff due at once."""
    now = datetime.now(UTC)
    again = (
        update(job)
        .where(job.id.in_(wanted), job.state.in_(ended))
        .values({job.state: "pending", job.attempts: 0, due: now, job.updated_at: now})
        .returning(job.id)
    )
    sooner = (
        update(job)
        .where(job.id.in_(wanted), job.state == "pending", due > now)
        .values({due: now, job.updated_at: now})
        .returning(job.id)
    )
    return sorted([*connection.execute(again).scalars(), *connection.execute(sooner).scalars()])
