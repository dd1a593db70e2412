"""The atomic writer killed (SIGKILL) at each of its steps: after recovery nothing is half-kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fabricatord.db import InstanceIndex, dispose_all, open_database
from fabricatord.dicom.storage import InstanceWriter

CHILD = """
import sys
from pathlib import Path
from fabricatord.db import InstanceIndex, open_database
from fabricatord.dicom.storage import InstanceWriter
from tests.helpers import study
base = Path(sys.argv[1])
writer = InstanceWriter(InstanceIndex(open_database(f"sqlite:///{base / 'db.sqlite'}")), base / "storage", base / "tmp")
for result in writer.write_many(study("CT", images=4), "generated", batch=2):
    print(result.sop_instance_uid, flush=True)
"""

POINTS = ["store.after_tmp_write", "store.after_intent", "store.after_rename", "store.after_commit"]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.dcm")} if folder.exists() else set()


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_step_leaves_nothing_half_done(point: str, tmp_path: Path) -> None:
    env = {**os.environ, "FABRICATORD_FAULTPOINT": f"{point}:kill"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    acknowledged = child.stdout.split()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    index = InstanceIndex(open_database(url))
    writer = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp")
    writer.recover()
    # O3: no temporary files, no final file without its row, no row without its file.
    assert list((tmp_path / "tmp").iterdir()) == []
    from sqlalchemy import select

    from fabricatord.db.models import Instance

    with open_database(url).reads() as session:
        rows = {r.path: r for r in session.scalars(select(Instance))}
    assert set(rows) == files_under(tmp_path / "storage")
    for path, row in rows.items():
        assert (tmp_path / "storage" / path).stat().st_size == row.size
    # O2: what was reported stored is there (the kill before commit reports nothing).
    assert set(acknowledged) <= {r.sop_instance_uid for r in rows.values()}
    if point == "store.after_commit":
        assert len(rows) == 2  # the first batch was committed before the kill
    else:
        assert rows == {}
    assert index.intents() == []
    dispose_all()
