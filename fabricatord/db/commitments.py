"""Storage Commitment transactions (PS3.4 J), both ways, kept so that neither a restart nor
another node forgets one.

A request a peer made of us (`in`) is kept with what we found of each instance before the
N-ACTION is answered; the report it is owed is then a job like a route job: `pending` (first
for the requesting association to take, a while, then for the sender thread), claimed as
`sending` under a node's lease, `done` once the peer answered the N-EVENT-REPORT, `failed` when
the attempts ran out or nobody can be told. A request we made (`out`) waits as `requested` for the peer's report,
which may come on any node's listener, matched by Transaction UID.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from fabricatord.db.engine import Database, hold_keys
from fabricatord.db.jobs import LEASE, RouteJobs, claimable, recover_claimed, settle_claimed, take
from fabricatord.db.models import Commitment, CommitmentItem, Instance, Series, Study

NO_SUCH_OBJECT_INSTANCE = 0x0112
"""The Failure Reason of an instance not held (PS3.4 J.3.3.1.1)."""
CHUNK = 500
"""UIDs per IN (...) list: a request may name thousands of instances."""


@dataclass(frozen=True)
class Item:
    """One instance of a transaction and, once known, its outcome: 0 committed, else the
    Failure Reason (0008,1197); None while no report came."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None = None
    study_instance_uid: str = ""
    route_job_pk: int | None = None


@dataclass(frozen=True)
class Held:
    """An indexed instance, as a commitment request is checked against it."""

    sop_class_uid: str
    study_instance_uid: str
    path: str


@dataclass(frozen=True)
class Transaction:
    id: int
    transaction_uid: str
    direction: str
    peer_ae: str
    peer: str
    study_instance_uid: str
    state: str
    attempts: int
    last_error: str
    created_at: datetime
    reported_at: datetime | None
    items: list[Item] = field(default_factory=list)

    @property
    def failed(self) -> list[Item]:
        return [item for item in self.items if item.failure_reason]

    @property
    def committed(self) -> list[Item]:
        return [item for item in self.items if item.failure_reason == 0]


_COLUMNS = (
    Commitment.id,
    Commitment.transaction_uid,
    Commitment.direction,
    Commitment.peer_ae,
    Commitment.peer,
    Commitment.study_instance_uid,
    Commitment.state,
    Commitment.attempts,
    Commitment.last_error,
    Commitment.created_at,
    Commitment.reported_at,
)
_ITEM_COLUMNS = (
    CommitmentItem.sop_class_uid,
    CommitmentItem.sop_instance_uid,
    CommitmentItem.failure_reason,
    CommitmentItem.study_instance_uid,
    CommitmentItem.route_job_pk,
)


def _chunks(values: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), CHUNK):
        yield list(values[start : start + CHUNK])


class Commitments:
    def __init__(self, database: Database, node: str = "", lease: timedelta = LEASE) -> None:
        self._db = database
        self._node = node
        self._lease = lease

    def held(self, sop_instance_uids: Sequence[str]) -> dict[str, Held]:
        """What the index holds of `sop_instance_uids`, by SOP Instance UID."""
        found: dict[str, Held] = {}
        with self._db.engine.connect() as connection:
            for chunk in _chunks(sop_instance_uids):
                rows = connection.execute(
                    select(Instance.sop_instance_uid, Instance.sop_class_uid, Study.study_instance_uid, Instance.path)
                    .join(Series, Instance.series_pk == Series.id)
                    .join(Study, Series.study_pk == Study.id)
                    .where(Instance.sop_instance_uid.in_(chunk))
                )
                found.update({row[0]: Held(row[1], row[2], row[3]) for row in rows})
        return found

    def received(
        self, transaction_uid: str, calling_ae: str, peer: str, items: Sequence[Item], report_after: float
    ) -> list[Item]:
        """A peer's request, with each instance's outcome, kept before the N-ACTION is answered;
        the outcomes as kept. An instance decided committed that is no longer indexed when the
        transaction commits is kept as 0x0112 (a study deleted meanwhile). The report is due
        `report_after` seconds from now: the time the requesting association has to take it
        first (`reported_here`). A Transaction UID asked again is asked anew: its items
        replaced, its report owed again."""
        try:
            return self._received(transaction_uid, calling_ae, peer, items, report_after)
        except IntegrityError:  # the same Transaction UID kept by another process meanwhile
            return self._received(transaction_uid, calling_ae, peer, items, report_after)

    def _received(
        self, transaction_uid: str, calling_ae: str, peer: str, items: Sequence[Item], report_after: float
    ) -> list[Item]:
        now = datetime.now(UTC)
        with self._db.writer.begin() as connection:
            promised = [item for item in items if item.failure_reason == 0]
            # A deletion of these studies (cleanup) waits for this promise, then sees it and spares them.
            hold_keys(connection, [], shared=sorted({f"s{item.study_instance_uid}" for item in promised}))
            still: set[str] = set()
            for chunk in _chunks([item.sop_instance_uid for item in promised]):
                still.update(
                    connection.execute(
                        select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))
                    ).scalars()
                )
            kept = [
                replace(item, failure_reason=NO_SUCH_OBJECT_INSTANCE)
                if item.failure_reason == 0 and item.sop_instance_uid not in still
                else item
                for item in items
            ]
            known = connection.execute(
                select(Commitment.id)
                .where(Commitment.direction == "in", Commitment.transaction_uid == transaction_uid)
                .with_for_update()
            ).scalar()
            values = {
                "peer_ae": calling_ae,
                "peer": peer,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now + timedelta(seconds=report_after),
                "last_error": "",
                "leased_by": "",
                "lease_until": None,
                "reported_at": None,
                "created_at": now,
                "updated_at": now,
            }
            if known is None:
                pk = int(
                    connection.execute(
                        insert(Commitment)
                        .values(transaction_uid=transaction_uid, direction="in", **values)
                        .returning(Commitment.id)
                    ).scalar_one()
                )
            else:
                pk = int(known)
                connection.execute(update(Commitment).where(Commitment.id == pk).values(**values))
                connection.execute(delete(CommitmentItem).where(CommitmentItem.commitment_pk == pk))
            _add_items(connection, pk, kept)
        return kept

    def reported_here(self, transaction_uid: str, error: str, nobody: bool) -> None:
        """After the attempt on the requesting association, unless the sender thread took the
        report meanwhile: done when the peer answered it; else due now for the sender thread,
        or, `nobody` to send it to, failed with `error`."""
        now = datetime.now(UTC)
        if not error:
            values: dict[str, object] = {"state": "done", "reported_at": now}
        elif nobody:
            values = {"state": "failed", "last_error": error[:512]}
        else:
            values = {"next_attempt_at": now, "last_error": error[:512]}
        with self._db.writer.begin() as connection:
            connection.execute(
                update(Commitment)
                .where(
                    Commitment.direction == "in",
                    Commitment.transaction_uid == transaction_uid,
                    Commitment.state == "pending",
                )
                .values(updated_at=now, **values)
            )

    def requested(self, transaction_uid: str, peer_ae: str, peer: str, study_instance_uid: str,
                  items: Sequence[Item]) -> int:  # fmt: skip
        """A request of ours, kept before the N-ACTION goes out (its report may come at once)."""
        now = datetime.now(UTC)
        with self._db.writer.begin() as connection:
            pk = int(
                connection.execute(
                    insert(Commitment)
                    .values(
                        transaction_uid=transaction_uid,
                        direction="out",
                        peer_ae=peer_ae,
                        peer=peer,
                        study_instance_uid=study_instance_uid,
                        state="requested",
                        attempts=1,
                        next_attempt_at=now,
                        last_error="",
                        leased_by="",
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(Commitment.id)
                ).scalar_one()
            )
            _add_items(connection, pk, items)
        return pk

    def refused(self, pk: int, why: str) -> None:
        """Our N-ACTION was not accepted: no report will come."""
        with self._db.writer.begin() as connection:
            connection.execute(
                update(Commitment)
                .where(Commitment.id == pk, Commitment.state == "requested")
                .values(state="refused", last_error=why[:512], updated_at=datetime.now(UTC))
            )

    def reported(self, transaction_uid: str, failures: dict[str, int], committed: Iterable[str]) -> Transaction | None:
        """A peer's report on a request of ours: each instance's outcome, the transaction
        `committed` or `failed`, and the route jobs that sent them told (committed: verified;
        not committed: failed, with the reason, for `jobs retry`). None for a Transaction UID we
        never asked with. An instance the report leaves out counts as failed (0x0110)."""
        now = datetime.now(UTC)
        committed_uids = set(committed)
        with self._db.writer.begin() as connection:
            found = connection.execute(
                select(Commitment.id, Commitment.state)
                .where(Commitment.direction == "out", Commitment.transaction_uid == transaction_uid)
                .with_for_update()
            ).first()
            if found is None:
                return None
            pk = found.id
            if found.state not in ("requested", "refused"):  # reported before: kept as it was
                return _transaction(connection, connection.execute(select(*_COLUMNS).where(Commitment.id == pk)).one())
            items = connection.execute(
                select(CommitmentItem.id, CommitmentItem.sop_instance_uid, CommitmentItem.route_job_pk).where(
                    CommitmentItem.commitment_pk == pk
                )
            ).all()
            outcome: dict[int, list[int]] = {}
            verified: list[int] = []
            not_committed: dict[int, int] = {}
            for item_pk, sop_instance_uid, route_job_pk in items:
                reason = 0 if sop_instance_uid in committed_uids else failures.get(sop_instance_uid, 0x0110)
                outcome.setdefault(reason, []).append(item_pk)
                if route_job_pk is not None:
                    if reason:
                        not_committed[route_job_pk] = reason
                    else:
                        verified.append(route_job_pk)
            for reason, pks in outcome.items():
                connection.execute(
                    update(CommitmentItem).where(CommitmentItem.id.in_(pks)).values(failure_reason=reason)
                )
            failed = bool(outcome.keys() - {0})
            connection.execute(
                update(Commitment)
                .where(Commitment.id == pk)
                .values(state="failed" if failed else "committed", reported_at=now, updated_at=now)
            )
            RouteJobs.committed(connection, verified, not_committed)
        return self.transaction(transaction_uid, "out")

    def transaction(self, transaction_uid: str, direction: str) -> Transaction | None:
        with self._db.engine.connect() as connection:
            row = connection.execute(
                select(*_COLUMNS).where(
                    Commitment.direction == direction, Commitment.transaction_uid == transaction_uid
                )
            ).first()
            return None if row is None else _transaction(connection, row)

    def state(self, pk: int) -> str:
        """A transaction's state now (polled while a report is awaited)."""
        with self._db.engine.connect() as connection:
            return str(connection.execute(select(Commitment.state).where(Commitment.id == pk)).scalar() or "")

    # -- the reports we owe ----------------------------------------------------------------------

    def claim(self) -> Transaction | None:
        """The next report due (or one whose sender's lease ran out), `sending` under our lease;
        as it was read before the claim (its attempts not counting this one)."""
        now = datetime.now(UTC)
        due = and_(Commitment.direction == "in", claimable(Commitment, Commitment.next_attempt_at, "sending", now))
        with self._db.engine.connect() as connection:
            if connection.execute(select(Commitment.id).where(due).limit(1)).first() is None:
                return None
        with self._db.writer.begin() as connection:
            row = connection.execute(
                select(*_COLUMNS)
                .where(due)
                .order_by(Commitment.next_attempt_at, Commitment.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            claimed = _transaction(connection, row)
            take(connection, Commitment, [row.id], "sending", self._node, now, self._lease)
        return claimed

    def settle(self, done: Iterable[int], retry: dict[int, tuple[datetime, str]], failed: dict[int, str]) -> None:
        """After a report was sent, or could not be: only rows still this node's."""
        finished = list(done)
        settle_claimed(self._db, Commitment, self._node, finished, retry, failed)
        if finished:
            with self._db.writer.begin() as connection:
                connection.execute(
                    update(Commitment)
                    .where(Commitment.id.in_(finished), Commitment.state == "done")
                    .values(reported_at=datetime.now(UTC))
                )

    def recover(self) -> int:
        """At start: reports this node was sending when it died are owed again."""
        return recover_claimed(self._db, Commitment, self._node)


def _transaction(connection: Connection, row: Any) -> Transaction:
    items = connection.execute(
        select(*_ITEM_COLUMNS).where(CommitmentItem.commitment_pk == row.id).order_by(CommitmentItem.id)
    ).all()
    return Transaction(**row._mapping, items=[Item(*item) for item in items])


def _add_items(connection: Connection, pk: int, items: Sequence[Item]) -> None:
    if items:
        connection.execute(
            insert(CommitmentItem),
            [
                {
                    "commitment_pk": pk,
                    "sop_class_uid": item.sop_class_uid[:64],
                    "sop_instance_uid": item.sop_instance_uid[:64],
                    "study_instance_uid": item.study_instance_uid[:64],
                    "failure_reason": item.failure_reason,
                    "route_job_pk": item.route_job_pk,
                }
                for item in items
            ],
        )
