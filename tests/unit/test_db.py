from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fabricatord.db import (
    DatabaseNewerThanCode,
    PatientRecord,
    PatientRegistry,
    Sequences,
    dispose_all,
    open_database,
)
from fabricatord.db.engine import head_revision
from fabricatord.db.models import Base


def test_sequences_are_consecutive_and_keep_their_start(database_url: str) -> None:
    sequences = Sequences(open_database(database_url))
    assert sequences.peek("accession", 100) == 100
    assert sequences.take("accession", 100, 1) == [100]
    assert sequences.take("accession", 5, 1, count=3) == [101, 102, 103]  # a new start never resets
    assert sequences.take("other", 10, 5, count=2) == [10, 15]
    assert sequences.peek("accession", 1) == 104


def _take_many(url: str, n: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    sequences = Sequences(open_database(url))
    queue.put([sequences.take("shared", 1, 1)[0] for _ in range(n)])


def test_sequences_are_never_shared_between_processes(database_url: str) -> None:
    open_database(database_url)
    dispose_all()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_take_many, args=(database_url, 40, queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    values = [v for _ in workers for v in queue.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(values) == list(range(1, 121))


def test_patient_registry(database_url: str) -> None:
    registry = PatientRegistry(open_database(database_url))
    patient = PatientRecord("PID1", "FAB", "Doe^Jane", "19800101", "F", "1 Main St", "555-0100")
    assert registry.add(patient) == patient
    assert registry.add(PatientRecord("PID1", "FAB", "Other^Name", "19900101", "M")) == patient
    assert registry.get("PID1", "FAB") == patient and registry.get("PID1", "ELSEWHERE") is None
    assert [p.patient_id for p in registry.search("doe")] == ["PID1"]
    assert [p.patient_id for p in registry.search("D?e^J*")] == ["PID1"]
    stats = registry.stats()
    assert (stats.patients, stats.by_sex) == (1, {"F": 1})


def test_models_match_migrations(database_url: str) -> None:
    database = open_database(database_url)
    with database.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_sqlite_pragmas(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'p.sqlite'}")
    with database.engine.connect() as connection:
        values = [
            connection.exec_driver_sql(f"PRAGMA {p}").scalar()
            for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        ]
    assert values == ["wal", 2, 1, 10000]


@pytest.mark.parametrize("in_child", [False, True])
def test_a_database_from_a_newer_version_is_refused(tmp_path: Path, in_child: bool) -> None:
    path = tmp_path / "n.sqlite"
    open_database(f"sqlite:///{path}")
    dispose_all()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(DatabaseNewerThanCode, match="9999"):
        open_database(f"sqlite:///{path}", migrate_in_child=in_child)


def test_the_daemon_migrates_in_a_child_and_never_loads_alembic(tmp_path: Path) -> None:
    program = (
        "import sys\n"
        "from fabricatord.db import open_database\n"
        f"open_database('sqlite:///{tmp_path / 'c.sqlite'}', migrate_in_child=True)\n"
        "print('alembic' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    with sqlite3.connect(tmp_path / "c.sqlite") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head_revision()


def test_head_revision_by_file_name_is_alembics_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from fabricatord.db.engine import MIGRATIONS, head_revision

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == head_revision()


def test_retry_wakes_failed_and_backing_off_route_jobs_and_names_them(database_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from fabricatord.db.jobs import RouteJobs

    database = open_database(database_url)
    with database.writer.begin() as connection:
        RouteJobs.enqueue(connection, [(f"1.2.3.{n}", "1.2.3", "pacs", "r") for n in range(4)])
    jobs = RouteJobs(database)
    first, second, third, fourth = (job.id for job in jobs.claim())
    later = datetime.now(UTC) + timedelta(minutes=5)
    jobs.settle([fourth], {second: (later, "refused")}, {first: "gave up"})  # third stays `sending`
    assert jobs.retry([first, second, third, fourth]) == [first, second]
    by_id = {job.id: job for job in jobs.by_ids([first, second, third, fourth])}
    assert [by_id[n].state for n in (first, second, third, fourth)] == ["pending", "pending", "sending", "done"]
    assert by_id[first].attempts == 0 and by_id[second].attempts == 1  # a retry after backoff keeps its count
    due = [by_id[n].next_attempt_at for n in (first, second)]
    assert all(at.replace(tzinfo=at.tzinfo or UTC) <= datetime.now(UTC) for at in due)  # SQLite keeps them naive
    assert jobs.retry([second]) == []  # already due: nothing to touch
