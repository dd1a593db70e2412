"""One engine per process, SQLite pragmas in one place, migrations applied at start."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fabricatord.obs.faults import faultpoint

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 10_000
MIGRATION_LOCK = 0x66616272
"""PostgreSQL advisory lock key held while migrating ("fabr")."""


@dataclass(frozen=True)
class Database:
    engine: Engine
    reads: sessionmaker[Session]
    """Sessions for queries; on SQLite their transactions take no lock until they write."""
    writes: sessionmaker[Session]
    """Sessions for changes; on SQLite they take the write lock at BEGIN, so two writers wait
    on the busy timeout instead of deadlocking when both try to upgrade a read lock."""
    writer: Engine
    """The engine `writes` uses, for Core statements on hot paths where the ORM costs more than
    the disk: `with database.writer.begin() as connection`."""

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


class DatabaseNewerThanCode(RuntimeError):
    """The database was migrated by a newer fabricatord than this one."""


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` is the database still locked by another writer after the busy timeout: a
    refusal the sender may retry unchanged (C-STORE 0xA700, HL7 AR 206)."""
    return isinstance(exc, OperationalError) and "locked" in str(exc).lower()


class MigrationFailed(RuntimeError):
    """The schema could not be brought up to date; being one transaction, nothing changed."""


_lock = threading.Lock()
_databases: dict[str, Database] = {}


def open_database(url: str, migrate_in_child: bool = False) -> Database:
    """The process's engine for `url`, migrated to the newest schema.

    `migrate_in_child`: run the migrations in a short-lived child process, so that Alembic
    (12 MB of modules) never loads into a long-running daemon.
    """
    with _lock:
        database = _databases.get(url)
        if database is None:
            database = _connect(url)
            if not migrate_in_child:
                migrate(database.engine)
            elif _current_revision(database.engine) != head_revision():
                _migrate_in_child(url)
            _databases[url] = database
        return database


_NEWER_EXIT = 3
_MIGRATE_URL = "FABRICATORD_MIGRATE_URL"  # in the environment, never on a command line `ps` shows


def _migrate_in_child(url: str) -> None:
    program = (
        "import os, sys\n"
        "from fabricatord.db.engine import DatabaseNewerThanCode, _connect, migrate\n"
        "try:\n"
        f"    migrate(_connect(os.environ['{_MIGRATE_URL}']).engine)\n"
        "except DatabaseNewerThanCode as exc:\n"
        "    print(exc, file=sys.stderr)\n"
        f"    sys.exit({_NEWER_EXIT})\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", program],
        check=False,
        env={**os.environ, _MIGRATE_URL: url},
        capture_output=True,
        text=True,
    )
    if child.returncode == _NEWER_EXIT:
        raise DatabaseNewerThanCode(child.stderr.strip())
    if child.returncode < 0:
        raise MigrationFailed(f"the migration was killed by signal {-child.returncode} and rolled back")
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise MigrationFailed(f"the migration failed and was rolled back: {last}")


def aware(moment: datetime) -> datetime:
    """A stored moment with its zone: SQLite gives back naive datetimes, and every one stored was UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


_HOLD_KEYS = text(
    "SELECT CASE WHEN s THEN pg_advisory_xact_lock_shared(k) ELSE pg_advisory_xact_lock(k) END "
    "FROM unnest(CAST(:keys AS BIGINT[]), CAST(:shared AS BOOLEAN[])) AS t(k, s)"
)


def hold_keys(connection: Any, names: Iterable[str], shared: Iterable[str] = ()) -> None:
    """On PostgreSQL, where other processes (worker processes, other nodes) write the same
    tables: wait until no other transaction holds one of these names, and hold them until this
    one ends. Names are `i<SOP Instance UID>`, `s<Study Instance UID>`, `p<Patient ID>\\<issuer>`;
    taken in one order, so two holders of several cannot wait on each other. `shared` names are
    held alongside other shared holders (stores into a study) and exclude only exclusive ones
    (its deletion). SQLite: nothing to do, its one writer already serializes."""
    if connection.dialect.name != "postgresql":
        return
    modes = {_key(name): True for name in shared}
    modes.update({_key(name): False for name in names})  # exclusive wins
    keys = sorted(modes)
    if keys:
        connection.execute(_HOLD_KEYS, {"keys": keys, "shared": [modes[key] for key in keys]})


def _key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def patient_key(patient_id: str, issuer: str) -> str:
    return f"p{patient_id}\\{issuer}"


def dispose_all() -> None:
    """Close every engine; tests and forked children use it."""
    with _lock:
        for database in _databases.values():
            database.engine.dispose()
        _databases.clear()


def _connect(url: str) -> Database:
    parsed = make_url(url)
    options: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        }
    else:
        options["pool_pre_ping"] = True
    engine = create_engine(url, **options)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling is switched off in _sqlite_pragmas; BEGIN is ours.
        event.listen(engine, "begin", _sqlite_begin)
    writer = engine.execution_options(fabricatord_write=True)
    return Database(
        engine,
        sessionmaker(engine, expire_on_commit=False),
        sessionmaker(writer, expire_on_commit=False),
        writer,
    )


def _sqlite_begin(connection: Any) -> None:
    write = connection.get_execution_options().get("fabricatord_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL with synchronous=NORMAL can lose committed transactions on power loss: FULL it is.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def head_revision() -> str:
    """The newest migration's revision, from the file names (`NNNN_what.py` holds revision NNNN)."""
    return max(path.name.split("_", 1)[0] for path in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def revisions(url: str) -> tuple[str | None, str]:
    """(the database's schema revision, the newest this code knows)."""
    return _current_revision(_connect(url).engine), head_revision()


def migrate(engine: Engine) -> None:
    """Apply every migration not yet applied; refuse a database newer than the code.

    Alembic is imported only when there is something to migrate: a daemon whose database is
    current does not keep its 12 MB of modules for nothing.
    """
    current = _current_revision(engine)
    if current == head_revision():
        return
    from alembic import command
    from alembic.script import ScriptDirectory

    config = _alembic_config(engine)
    script = ScriptDirectory.from_config(config)
    try:
        known = current is None or script.get_revision(current) is not None
    except Exception:  # alembic raises several resolution errors for an unknown revision
        known = False
    if not known:
        raise DatabaseNewerThanCode(
            f"database schema revision {current} is unknown to this fabricatord: it was migrated by a newer version"
        )
    # One transaction for every step: a migration interrupted at any point leaves the schema
    # as it was (SQLite and PostgreSQL both roll DDL back).
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Nodes starting together migrate one after the other: the second finds the schema
            # current (Alembic reads the revision again) and has nothing to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        faultpoint("migrate.before_commit")
