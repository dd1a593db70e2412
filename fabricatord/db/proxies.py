"""What anonymizing proxies keep: the check of each proxy's key, and per de-identified
instance its sealed originals (ciphertext only: the key is never in the database)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from fabricatord.db.engine import Database
from fabricatord.db.models import ProxyKey, ProxyRecord


@dataclass(frozen=True)
class Sealed:
    proxy: str
    sop_instance_uid: str
    sealed: bytes
    original_file: str


class ProxyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def check(self, proxy: str, check_value: str) -> bool:
        """Whether `check_value` is the proxy's: the first key a proxy starts with is recorded,
        and every later start must bring the same one."""
        insert_ = pg_insert if self._db.dialect == "postgresql" else sqlite_insert
        with self._db.writes.begin() as session:  # several workers may start together
            session.execute(insert_(ProxyKey).values(proxy=proxy, check_value=check_value).on_conflict_do_nothing())
            known = session.scalar(select(ProxyKey.check_value).where(ProxyKey.proxy == proxy))
            return bool(known == check_value)

    def record(self, proxy: str, study_instance_uid: str, sop_instance_uid: str, sealed: bytes, original: str) -> None:
        """Keep (or, for a resend, replace) what one de-identified instance was."""
        with self._db.writes.begin() as session:
            session.execute(
                delete(ProxyRecord).where(ProxyRecord.proxy == proxy, ProxyRecord.sop_instance_uid == sop_instance_uid)
            )
            session.execute(
                insert(ProxyRecord).values(
                    proxy=proxy,
                    study_instance_uid=study_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                    sealed=sealed,
                    original_file=original,
                )
            )

    def study(self, study_instance_uid: str) -> list[Sealed]:
        """Every record of a study as a backend holds it (its de-identified Study Instance UID)."""
        with self._db.reads() as session:
            rows = session.execute(
                select(ProxyRecord.proxy, ProxyRecord.sop_instance_uid, ProxyRecord.sealed, ProxyRecord.original_file)
                .where(ProxyRecord.study_instance_uid == study_instance_uid)
                .order_by(ProxyRecord.id)
            )
            return [Sealed(*row) for row in rows]
