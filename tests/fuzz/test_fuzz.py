"""Each fuzz target runs for a bounded time on its corpus; any crash or broken property fails.

Longer on demand: `.venv/bin/python tests/fuzz/fuzz_pdu.py -max_total_time=3600 tests/fuzz/corpus/pdu`
(new inputs that add coverage are kept in the corpus folder given first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("FABRICATORD_FUZZ_SECONDS", "20"))


@pytest.mark.parametrize("target", ["pdu", "dataset", "hl7"])
def test_the_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    found = tmp_path / "found"
    found.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
            str(found),
            str(HERE / "corpus" / target),
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SECONDS + 120,
        cwd=tmp_path,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    report = result.stderr[result.stderr.find("=== Uncaught") :] if "=== Uncaught" in result.stderr else result.stderr
    assert result.returncode == 0 and not crashes, f"{crashes}: {report[:4000]}"
    runs = next(line for line in result.stderr.splitlines() if line.startswith("stat::number_of_executed_units"))
    assert int(runs.split(":")[-1]) > 100  # it really ran
