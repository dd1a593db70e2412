"""Users of the console and the API, their credentials (sessions and tokens) and failed sign-ins.

Only digests of credentials are kept: the secrets themselves live in the user's cookie or script.
Several daemons on one PostgreSQL share all of it, so a session made by one is honoured by all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from fabricatord.db.engine import Database
from fabricatord.db.models import Credential, LoginFailure, User


class UserExists(ValueError):
    """A user of that name is already registered."""


class NoSuchUser(LookupError):
    """No user of that name."""


@dataclass(frozen=True)
class UserRecord:
    id: int
    name: str
    role: str
    password_hash: str
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class CredentialRecord:
    id: int
    kind: str
    csrf_token: str
    last_used_at: datetime


def _user(row: User) -> UserRecord:
    return UserRecord(row.id, row.name, row.role, row.password_hash, row.disabled, row.created_at)


class UserStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def add(self, name: str, role: str, password_hash: str) -> UserRecord:
        try:
            with self._db.writes.begin() as session:
                row = User(name=name, role=role, password_hash=password_hash, disabled=False)
                session.add(row)
                session.flush()
                return _user(row)
        except IntegrityError:
            raise UserExists(f"a user named {name!r} exists already") from None

    def get(self, name: str) -> UserRecord | None:
        with self._db.reads() as session:
            row = session.scalar(select(User).where(User.name == name))
            return _user(row) if row else None

    def listing(self) -> list[UserRecord]:
        with self._db.reads() as session:
            return [_user(row) for row in session.scalars(select(User).order_by(User.name))]

    def count(self) -> int:
        with self._db.reads() as session:
            return int(session.scalar(select(func.count(User.id))) or 0)

    def change(self, name: str, *, password_hash: str | None = None, role: str | None = None) -> None:
        """A new password also ends the user's sessions and tokens: whoever held one signs in again."""
        values: dict[str, str] = {}
        if password_hash is not None:
            values["password_hash"] = password_hash
        if role is not None:
            values["role"] = role
        with self._db.writes.begin() as session:
            pk = session.scalar(select(User.id).where(User.name == name))
            if pk is None:
                raise NoSuchUser(name)
            session.execute(update(User).where(User.id == pk).values(**values))
            if password_hash is not None:
                session.execute(delete(Credential).where(Credential.user_pk == pk))

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disabling also ends every session and token of the user, in the same transaction."""
        with self._db.writes.begin() as session:
            pk = session.scalar(select(User.id).where(User.name == name))
            if pk is None:
                raise NoSuchUser(name)
            session.execute(update(User).where(User.id == pk).values(disabled=disabled))
            if disabled:
                session.execute(delete(Credential).where(Credential.user_pk == pk))

    def add_credential(self, user_pk: int, kind: str, secret_hash: str, csrf_token: str, now: datetime) -> None:
        with self._db.writes.begin() as session:
            session.execute(
                insert(Credential).values(
                    user_pk=user_pk,
                    kind=kind,
                    secret_hash=secret_hash,
                    csrf_token=csrf_token,
                    created_at=now,
                    last_used_at=now,
                )
            )

    def credential(self, secret_hash: str) -> tuple[UserRecord, CredentialRecord] | None:
        """The user a credential belongs to, whether or not it is still valid: the caller judges."""
        with self._db.reads() as session:
            row = session.execute(
                select(User, Credential)
                .join(Credential, Credential.user_pk == User.id)
                .where(Credential.secret_hash == secret_hash)
            ).first()
            if row is None:
                return None
            user, credential = row
            return _user(user), CredentialRecord(
                credential.id, credential.kind, credential.csrf_token, credential.last_used_at
            )

    def touch(self, credential_pk: int, now: datetime) -> None:
        with self._db.writes.begin() as session:
            session.execute(update(Credential).where(Credential.id == credential_pk).values(last_used_at=now))

    def drop_credential(self, credential_pk: int) -> None:
        with self._db.writes.begin() as session:
            session.execute(delete(Credential).where(Credential.id == credential_pk))

    def drop_sessions_idle_since(self, cutoff: datetime) -> int:
        with self._db.writes.begin() as session:
            statement = delete(Credential).where(Credential.kind == "session", Credential.last_used_at < cutoff)
            return int(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def record_failure(self, name: str, now: datetime) -> None:
        with self._db.writes.begin() as session:
            session.execute(insert(LoginFailure).values(name=name[:64], at=now))

    def failures_since(self, name: str, since: datetime) -> list[datetime]:
        with self._db.reads() as session:
            statement = (
                select(LoginFailure.at)
                .where(LoginFailure.name == name[:64], LoginFailure.at >= since)
                .order_by(LoginFailure.at)
            )
            return list(session.scalars(statement))

    def forget_failures(self, name: str) -> None:
        """After a successful sign-in."""
        with self._db.writes.begin() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.name == name[:64]))

    def forget_failures_before(self, cutoff: datetime) -> None:
        """Failures of any name older than the lockout's window: guessed names leave no rows behind."""
        with self._db.writes.begin() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.at < cutoff))
