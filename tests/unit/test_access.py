"""Users, roles, sign-in and its lockout, sessions and tokens, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fabricatord.cli import ROLE_NAMES
from fabricatord.db import open_database
from fabricatord.db.users import UserStore
from fabricatord.workflow.access import (
    LOCKOUT_WINDOW,
    ROLES,
    BadCredentials,
    Directory,
    LockedOut,
    PasswordRules,
    UserExists,
    may_administer,
    may_change,
    may_reach,
)

PASSWORD = "a long enough password"


def test_the_command_line_offers_the_roles_there_are() -> None:
    assert ROLE_NAMES == ROLES


@pytest.mark.parametrize(
    ("role", "change", "administer", "test_read", "test_write", "prod_read", "prod_write"),
    [
        ("test_read", False, False, True, False, False, False),
        ("prod_read", False, False, True, False, True, False),
        ("test_write", True, False, True, True, False, False),
        ("prod_write", True, False, True, True, True, True),
        ("admin", True, True, True, True, True, True),
    ],
)
def test_what_each_role_may_do(
    role: str, change: bool, administer: bool, test_read: bool, test_write: bool, prod_read: bool, prod_write: bool
) -> None:
    assert (may_change(role), may_administer(role)) == (change, administer)
    assert (may_reach(role, "test", False), may_reach(role, "test", True)) == (test_read, test_write)
    assert (may_reach(role, "prod", False), may_reach(role, "prod", True)) == (prod_read, prod_write)


def test_sign_in_gives_a_session_that_identifies_its_user(database_url: str) -> None:
    directory = Directory(open_database(database_url), session_idle=3600)
    directory.add("alice", "test_write", PASSWORD)
    with pytest.raises(UserExists):
        directory.add("alice", "admin", PASSWORD)
    with pytest.raises(PasswordRules):
        directory.add("bob", "admin", "short")
    with pytest.raises(ValueError, match="role"):
        directory.add("bob", "root", PASSWORD)
    signed = directory.sign_in("alice", PASSWORD)
    identity = directory.identify(signed.secret, "session")
    assert identity is not None and (identity.name, identity.role, identity.kind) == ("alice", "test_write", "session")
    assert identity.csrf_token == signed.identity.csrf_token and len(identity.csrf_token) >= 24
    assert directory.identify(signed.secret, "token") is None  # a session is no bearer token
    assert directory.identify(signed.secret + "x", "session") is None
    user = directory.get("alice")
    assert user is not None and user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    directory.sign_out(identity)
    assert directory.identify(signed.secret, "session") is None


def test_a_session_unused_too_long_ends(database_url: str) -> None:
    database = open_database(database_url)
    directory = Directory(database, session_idle=60)
    directory.add("idle", "test_read", PASSWORD)
    signed = directory.sign_in("idle", PASSWORD)
    UserStore(database).touch(signed.identity.credential_pk, datetime.now(UTC) - timedelta(seconds=61))
    assert directory.identify(signed.secret, "session") is None


def test_five_failures_lock_a_name_out_for_the_window(database_url: str) -> None:
    database = open_database(database_url)
    directory = Directory(database, session_idle=3600)
    directory.add("carol", "test_read", PASSWORD)
    for _ in range(5):
        with pytest.raises(BadCredentials):
            directory.sign_in("carol", "not the password")
    with pytest.raises(LockedOut) as locked:
        directory.sign_in("carol", PASSWORD)
    assert 0 < locked.value.retry_after <= LOCKOUT_WINDOW.total_seconds() + 1
    # Unknown names count too, and look the same as a wrong password.
    with pytest.raises(BadCredentials):
        directory.sign_in("nobody", PASSWORD)
    # Once the failures are older than the window, the right password works again.
    store = UserStore(database)
    store.forget_failures("carol")
    for _ in range(4):
        store.record_failure("carol", datetime.now(UTC) - LOCKOUT_WINDOW - timedelta(seconds=1))
    assert directory.sign_in("carol", PASSWORD).identity.name == "carol"


def test_disabling_ends_sessions_and_tokens_and_enabling_does_not_revive_them(database_url: str) -> None:
    directory = Directory(open_database(database_url), session_idle=3600)
    directory.add("dave", "admin", PASSWORD)
    token = directory.new_token("dave")
    session = directory.sign_in("dave", PASSWORD).secret
    identity = directory.identify(token, "token")
    assert identity is not None and identity.kind == "token" and identity.csrf_token == ""
    directory.disable("dave")
    assert directory.identify(token, "token") is None and directory.identify(session, "session") is None
    with pytest.raises(BadCredentials):
        directory.sign_in("dave", PASSWORD)
    directory.enable("dave")
    assert directory.identify(token, "token") is None
    assert directory.sign_in("dave", PASSWORD).identity.role == "admin"
