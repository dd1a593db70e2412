"""Who may do what: users, their roles, sign-in with its lockout, sessions and API tokens.

The roles are DICOM Fabricator's. Any role may look at our own node, query and echo, and
generate into our own node; the write roles may also change things and send to peers of their
environment; `admin` may do everything, users and deletion included. A peer with
`environment = "prod"` is reached only by the prod roles (and admin).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from fabricatord.db import Database
from fabricatord.db.engine import aware
from fabricatord.db.users import NoSuchUser, UserExists, UserRecord, UserStore

__all__ = ["NoSuchUser", "UserExists"]

LOCKOUT_FAILURES = 5
LOCKOUT_WINDOW = timedelta(minutes=15)
TOUCH_EVERY = timedelta(seconds=60)
"""A session's last use is written at most this often: not a write per page."""


class Role(StrEnum):
    ADMIN = "admin"
    TEST_WRITE = "test_write"
    TEST_READ = "test_read"
    PROD_WRITE = "prod_write"
    PROD_READ = "prod_read"


ROLES = tuple(role.value for role in Role)
_WRITERS = {Role.ADMIN, Role.TEST_WRITE, Role.PROD_WRITE}
_PROD = {Role.ADMIN, Role.PROD_WRITE, Role.PROD_READ}


def may_change(role: str) -> bool:
    """Create and change worklist items, send HL7, retry and cancel jobs."""
    return role in _WRITERS


def may_administer(role: str) -> bool:
    """Users and deletion."""
    return role == Role.ADMIN


def may_reach(role: str, environment: str, write: bool) -> bool:
    """Query or echo (`write` false), or store, move and send (`write` true), a peer of `environment`."""
    if environment == "prod" and role not in _PROD:
        return False
    return not write or role in _WRITERS


class PasswordRules(ValueError):
    """A password too short (or too long) to be set."""


MIN_PASSWORD = 8
MAX_PASSWORD = 1024

# OWASP's minimum for argon2id (19 MiB, two passes): a sign-in costs tens of milliseconds and
# no more memory than a C-STORE does.
_hasher = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)


@functools.cache
def _decoy() -> str:
    """A hash to check unknown names against, made at the first such sign-in, not at every start."""
    return _hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise PasswordRules(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return _hasher.hash(password)


def digest(secret: str) -> str:
    """What the database keeps of a session or token: high-entropy secrets need no slow hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who sent a request, and by which credential."""

    name: str
    role: str
    credential_pk: int
    kind: str  # session | token
    csrf_token: str


@dataclass(frozen=True)
class SignedIn:
    identity: Identity
    secret: str
    """The session cookie's value: given to the browser, never stored."""


class BadCredentials(PermissionError):
    """Unknown user, wrong password or disabled user: one answer for all three."""


class LockedOut(PermissionError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed sign-ins: try again in {retry_after} s")
        self.retry_after = retry_after


class Directory:
    """The users, as the console, the API and `fabricatord users` see them."""

    def __init__(self, database: Database, session_idle: float) -> None:
        self._store = UserStore(database)
        self._idle = timedelta(seconds=session_idle)

    # -- managing users ----------------------------------------------------------------------

    def add(self, name: str, role: str, password: str | None) -> UserRecord:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not name or len(name) > 64 or not name.isprintable() or name != name.strip() or "/" in name:
            raise ValueError("a user name has 1 to 64 printable characters (no /), without spaces around them")
        return self._store.add(name, role, hash_password(password) if password is not None else "")

    def users(self) -> list[UserRecord]:
        return self._store.listing()

    def get(self, name: str) -> UserRecord | None:
        return self._store.get(name)

    def has_users(self) -> bool:
        return self._store.count() > 0

    def set_password(self, name: str, password: str) -> None:
        self._store.change(name, password_hash=hash_password(password))

    def set_role(self, name: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self._store.change(name, role=role)

    def disable(self, name: str) -> None:
        """The user signs in no more, and its sessions and tokens end now."""
        self._store.set_disabled(name, True)

    def enable(self, name: str) -> None:
        self._store.set_disabled(name, False)

    def new_token(self, name: str) -> str:
        """An API token for `Authorization: Bearer`, shown to its owner once."""
        user = self._store.get(name)
        if user is None:
            raise NoSuchUser(name)
        if user.disabled:
            raise ValueError(f"user {name!r} is disabled")
        secret = "fbt_" + secrets.token_urlsafe(32)
        self._store.add_credential(user.id, "token", digest(secret), "", datetime.now(UTC))
        return secret

    # -- signing in --------------------------------------------------------------------------

    def verify_password(self, name: str, password: str) -> UserRecord | None:
        """The identity step: the user these credentials prove, or None. One function, so that a
        directory (LDAP, SAML) can take its place."""
        user = self._store.get(name)
        if user is None or not user.password_hash:
            _verify(_decoy(), password)  # the same time for a name that does not exist
            return None
        if not _verify(user.password_hash, password) or user.disabled:
            return None
        return user

    def sign_in(self, name: str, password: str) -> SignedIn:
        """A new session, unless the name is locked out or the credentials are wrong."""
        now = datetime.now(UTC)
        window_start = now - LOCKOUT_WINDOW
        failures = [aware(at) for at in self._store.failures_since(name, window_start)]
        if len(failures) >= LOCKOUT_FAILURES:
            unlocked = failures[-LOCKOUT_FAILURES] + LOCKOUT_WINDOW
            raise LockedOut(max(1, int((unlocked - now).total_seconds()) + 1))
        user = self.verify_password(name, password)
        if user is None:
            self._store.record_failure(name, now)
            self._store.forget_failures_before(window_start)
            raise BadCredentials("wrong user name or password")
        self._store.forget_failures(name)
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        self._store.add_credential(user.id, "session", digest(secret), csrf, now)
        self._store.drop_sessions_idle_since(now - self._idle)
        created = self._store.credential(digest(secret))
        assert created is not None
        return SignedIn(Identity(user.name, user.role, created[1].id, "session", csrf), secret)

    def identify(self, secret: str, kind: str) -> Identity | None:
        """Whose session cookie or bearer token `secret` is; None when unknown, idle too long or
        of a disabled user."""
        found = self._store.credential(digest(secret))
        if found is None:
            return None
        user, credential = found
        if credential.kind != kind or user.disabled:
            return None
        now = datetime.now(UTC)
        last_used = aware(credential.last_used_at)
        if kind == "session" and now - last_used > self._idle:
            self._store.drop_credential(credential.id)
            return None
        if now - last_used > TOUCH_EVERY:
            self._store.touch(credential.id, now)
        return Identity(user.name, user.role, credential.id, kind, credential.csrf_token)

    def sign_out(self, identity: Identity) -> None:
        self._store.drop_credential(identity.credential_pk)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
