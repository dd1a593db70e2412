"""Storage as the DRAW DICOM server keeps it: every layout and file naming stores what DCMTK
sends and gives it back by C-MOVE and C-GET; cleanup keeps a full node accepting, spares what
it must, and a deletion killed half-way is finished at the next start."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import free_port, run_cli
from tests.integration.conftest import Daemon, dcmtk, launch, running_peer, storescu

pytestmark = pytest.mark.integration

UID = r"[0-9.]+"
SHAPES = {
    # layout, naming: what a stored file's path looks like under storage/
    ("study/series", "sop-uid"): rf"{UID}/{UID}/{UID}\.dcm",
    ("study", "instance-number"): rf"{UID}/\d+(-\d+)?\.dcm",
    ("patient/study/series", "timestamp"): rf"P[0-9a-f]{{16}}/{UID}/{UID}/\d{{20}}\.dcm",
    ("received-date", "sequence"): rf"\d{{4}}/\d{{2}}/\d{{2}}/{UID}/{UID}/\d{{8}}\.dcm",
    ("date", "instance-number"): rf"\d{{4}}/\d{{2}}/\d{{2}}/{UID}/{UID}/\d+\.dcm",
    ("flat", "sequence"): r"\d{8}\.dcm",
    ("patient", "sop-uid"): rf"P[0-9a-f]{{16}}/{UID}/{UID}/{UID}\.dcm",
}


def two_series(tmp_path: Path) -> list[Path]:
    """A CT study of two series with instances 1 and 2 each: two files per instance number."""
    out = tmp_path / "sent"
    run_cli("generate", "--modality", "CT", "--series", "2", "--images", "2", "--out", str(out),
            env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "gen")})  # fmt: skip
    return sorted(out.rglob("*.dcm"))


@pytest.mark.parametrize(("layout", "naming"), list(SHAPES))
def test_each_layout_and_naming_stores_and_gives_back(tmp_path: Path, layout: str, naming: str) -> None:
    files = two_series(tmp_path)
    study_uid = dcmread(files[0]).StudyInstanceUID
    destination = tmp_path / "destination"
    destination.mkdir()
    port = free_port()
    daemon = launch(
        tmp_path,
        dicom_extra=f'storage_layout = "{layout}"\nfile_naming = "{naming}"\n',
        extra=f'[[peers]]\nname = "dest"\nae_title = "DEST"\nport = {port}\n',
    )
    try:
        result = storescu(daemon.port, files)
        assert result.returncode == 0, result.stderr
        stored = daemon.files()
        assert len(stored) == 4 and len(daemon.rows()) == 4
        assert all(re.fullmatch(SHAPES[(layout, naming)], path) for path in stored), stored
        assert {path for path, _ in daemon.rows().values()} == stored  # the index knows each file
        if (layout, naming) == ("study", "instance-number"):  # one folder, two of each number
            assert sorted(Path(path).name for path in stored) == ["1-2.dcm", "1.dcm", "2-2.dcm", "2.dcm"]
        with running_peer(["storescp", "+xa", "-aet", "DEST", "-od", str(destination), str(port)], port, "DEST"):
            moved = dcmtk("movescu", "-S", "-aet", "PACS", "-aec", "FABRICATORD", "-aem", "DEST",
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                          "127.0.0.1", str(daemon.port), timeout=60)  # fmt: skip
        assert moved.returncode == 0, moved.stderr
        sent = {dcmread(f).SOPInstanceUID for f in files}
        assert {dcmread(f).SOPInstanceUID for f in destination.iterdir()} == sent
        got = tmp_path / "got"
        got.mkdir()
        taken = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "FABRICATORD", "-od", str(got),
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                      "127.0.0.1", str(daemon.port), timeout=60)  # fmt: skip
        assert taken.returncode == 0, taken.stderr
        assert {dcmread(f).SOPInstanceUID for f in got.iterdir()} == sent
    finally:
        daemon.stop()


def instance_number_with_flat_is_refused(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "flat.toml"
    config.write_text('[dicom]\nstorage_layout = "flat"\nfile_naming = "instance-number"\n')
    return subprocess.run([sys.executable, "-m", "fabricatord", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_instance_numbers_in_one_flat_folder_are_a_configuration_error(tmp_path: Path) -> None:
    result = instance_number_with_flat_is_refused(tmp_path)
    assert result.returncode == 78
    assert "dicom.file_naming" in result.stderr and "flat.toml" in result.stderr


def stored_format(moment: datetime) -> str:
    """A UTC moment as SQLAlchemy writes one into SQLite (it compares them as text)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def age(daemon: Daemon, study_uid: str, days: float) -> None:
    """As if the study's instances had arrived `days` ago."""
    when = stored_format(datetime.now(UTC) - timedelta(days=days))
    daemon.query(
        "UPDATE instances SET created_at = ? WHERE series_pk IN (SELECT s.id FROM series s JOIN studies t "
        "ON s.study_pk = t.id WHERE t.study_instance_uid = ?)",
        (when, study_uid),
    )


def studies(tmp_path: Path, count: int) -> list[list[Path]]:
    """`count` one-instance CT studies of about the same size."""
    made = []
    for number in range(count):
        out = tmp_path / f"study{number}"
        run_cli("generate", "--modality", "CT", "--series", "1", "--images", "1", "--rows", "64", "--columns", "64",
                "--out", str(out), env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "gen")})  # fmt: skip
        made.append(sorted(out.rglob("*.dcm")))
    return made


def uid_of(files: list[Path]) -> str:
    return str(dcmread(files[0]).StudyInstanceUID)


def test_a_full_quota_with_cleanup_keeps_accepting_and_spares_what_it_must(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    made = studies(tmp_path, 6)
    size = max(f.stat().st_size for files in made for f in files)
    unreachable = free_port()
    daemon = start_daemon(
        f'[[peers]]\nname = "away"\nae_title = "AWAY"\nport = {unreachable}\n'
        '[[routes]]\nname = "keep-one"\nto = ["away"]\n[routes.match]\nstudy_description = "^NEVER$"\n',
        dicom_extra=f'storage_quota = "{int(size * 3.6)}"\ncleanup = true\nretention = "1d"\n',
    )
    for files in made[:3]:
        assert storescu(daemon.port, files).returncode == 0
    # The oldest is past retention but has a route job waiting for a peer that does not answer;
    # the second is past retention; the third is young.
    daemon.query(
        "INSERT INTO route_jobs (sop_instance_uid, study_instance_uid, peer, route, state, attempts, "
        "next_attempt_at, last_error, leased_by) VALUES (?, ?, 'away', 'keep-one', 'pending', 0, ?, '', '')",
        (
            str(dcmread(made[0][0]).SOPInstanceUID),
            uid_of(made[0]),
            stored_format(datetime.now(UTC) + timedelta(days=1)),
        ),
    )
    age(daemon, uid_of(made[0]), 5)
    age(daemon, uid_of(made[1]), 4)
    # The quota is reached: the fourth study is accepted, and the oldest eligible one makes room.
    assert storescu(daemon.port, made[3]).returncode == 0
    held = {uid for (uid,) in daemon.query("SELECT study_instance_uid FROM studies")}
    assert held == {uid_of(made[0]), uid_of(made[2]), uid_of(made[3])}
    audit = daemon.query("SELECT detail FROM audit_events WHERE operation = 'CLEANUP'")
    assert len(audit) == 1 and uid_of(made[1]) in audit[0][0] and "(quota)" in audit[0][0]
    assert daemon.metric("fabricatord_cleanup_studies_deleted_total", reason="quota") == 1
    # Nothing else is eligible (a job waits on one, the others are young): refused, 0xA700.
    storescu(daemon.port, made[4])
    assert '"status": "0xA700"' in daemon.log.read_text()
    assert daemon.metric("fabricatord_storage_write_failures_total", reason="quota") == 1
    assert uid_of(made[4]) not in {uid for (uid,) in daemon.query("SELECT study_instance_uid FROM studies")}
    assert len(daemon.files()) == 3 and len(daemon.rows()) == 3


def test_cleanup_command_lists_then_deletes_and_a_kill_between_commit_and_unlink_loses_nothing(
    tmp_path: Path,
) -> None:
    made = studies(tmp_path, 3)
    daemon = launch(tmp_path, dicom_extra='retention = "2d"\n')
    for files in made:
        assert storescu(daemon.port, files).returncode == 0
    age(daemon, uid_of(made[0]), 3)
    age(daemon, uid_of(made[1]), 7)
    daemon.stop()
    env = {"FABRICATORD_CONFIG": str(daemon.config)}
    dry = run_cli("cleanup", "--dry-run", "--json", env=env)
    *planned, total = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [(p["study_instance_uid"], p["reason"], p["deleted"]) for p in planned] == [
        (uid_of(made[1]), "age", False),
        (uid_of(made[0]), "age", False),
    ]
    assert (total["studies"], total["instances"]) == (2, 2)
    assert total["bytes"] == sum(p["bytes"] for p in planned) and total["deleted"] is False
    assert len(daemon.files()) == 3
    # Killed after the rows and the delete intents are committed, before any file is unlinked.
    killed = subprocess.run(
        [sys.executable, "-m", "fabricatord", "cleanup", "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "FABRICATORD_FAULTPOINT": "delete.after_commit:kill"},
    )  # fmt: skip
    assert killed.returncode < 0
    assert len(daemon.rows()) == 2 and len(daemon.files()) == 3  # one study's rows gone, its file not yet
    assert len(daemon.query("SELECT id FROM storage_intents")) == 1
    # The next start finishes that deletion: no orphan, no dangling row.
    again = launch(tmp_path, dicom_extra='retention = "2d"\n')
    try:
        assert daemon.query("SELECT id FROM storage_intents") == []
        assert {path for path, _ in again.rows().values()} == again.files()
        assert len(again.files()) == 2
    finally:
        again.stop()
    done = run_cli("cleanup", env=env)
    assert re.search(r"deleted 1 studies, 1 instances", done.stdout), done.stdout
    assert uid_of(made[0]) in done.stdout and "age" in done.stdout
    assert {uid for (uid,) in daemon.query("SELECT study_instance_uid FROM studies")} == {uid_of(made[2])}
