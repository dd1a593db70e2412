"""`fabricatord generate`, `show`, `patients` and `patterns` as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import need, run_cli

pytestmark = pytest.mark.integration


def config_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "fabricatord.toml"
    path.write_text(f'[node]\ndata_dir = "data"\n{extra}')
    return path


def field(output: str, label: str) -> str:
    match = re.search(rf"^{label}:\s+(.*)$", output, re.MULTILINE)
    assert match, output
    return match.group(1).strip()


def test_generate_prints_the_study_and_indexes_it(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    out = run_cli("generate", "--config", str(config), "--modality", "CT", "--images", "12").stdout
    study_uid = field(out, "Study Instance UID")
    assert field(out, "Files").startswith("12 (")
    assert "PID0000001" in field(out, "Patient")
    files = sorted((tmp_path / "data" / "storage" / study_uid).rglob("*.dcm"))
    assert len(files) == 12
    positions = sorted(float(dcmread(f).ImagePositionPatient[2]) for f in files)
    assert all(abs(b - a - 2.5) < 1e-6 for a, b in pairwise(positions))
    assert len({dcmread(f).FrameOfReferenceUID for f in files}) == 1
    stats = run_cli("patients", "stats", "--config", str(config)).stdout
    assert "patients:  1" in stats and "instances: 12" in stats


def test_consecutive_studies_get_consecutive_accessions_and_reuse_patients(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    first = run_cli("generate", "--config", str(config), "--modality", "CR").stdout
    second = run_cli("generate", "--config", str(config), "--modality", "DX", "--patient-id", "PID0000001").stdout
    a, b = field(first, "Accession Number"), field(second, "Accession Number")
    assert int(a[-7:]) + 1 == int(b[-7:]) and a[:4] == b[:4]
    assert "[new]" in field(first, "Patient") and "[registered]" in field(second, "Patient")
    assert field(first, "Patient").split(" (")[0] == field(second, "Patient").split(" (")[0]
    shown = run_cli("patients", "show", "PID0000001", "--config", str(config)).stdout
    assert re.search(r"Studies:\s+2", shown) and re.search(r"Instances:\s+4", shown)
    assert "PID0000001" in run_cli("patients", "search", "PID*1", "--config", str(config)).stdout


def test_seeded_runs_into_fresh_data_dirs_make_identical_files(tmp_path: Path) -> None:
    trees = []
    for run in ("one", "two"):
        base = tmp_path / run
        base.mkdir()
        config = config_file(base, "[synth]\nseed = 1234\n")
        run_cli("generate", "--config", str(config), "--modality", "MR", "--images", "2")
        run_cli("generate", "--config", str(config), "--modality", "US", "--images", "1")
        storage = base / "data" / "storage"
        trees.append({str(p.relative_to(storage)): p.read_bytes() for p in storage.rglob("*.dcm")})
    assert len(trees[0]) == 7 and trees[0] == trees[1]


def test_patterns_preview_does_not_consume_the_counter(tmp_path: Path) -> None:
    config = config_file(tmp_path, '[synth]\naccession_pattern = "ACC{7digits}"\n')
    preview = run_cli("patterns", "preview", "ACC{7digits}", "--count", "3", "--config", str(config))
    assert preview.stdout.split() == ["ACC0000001", "ACC0000002", "ACC0000003"]
    assert "counter not consumed" in preview.stderr
    out = run_cli("generate", "--config", str(config), "--modality", "SC").stdout
    assert field(out, "Accession Number") == "ACC0000001"
    again = run_cli("patterns", "preview", "ACC{7digits}", "--count", "1", "--config", str(config))
    assert again.stdout.split() == ["ACC0000002"]


def test_patients_generate_and_list(tmp_path: Path) -> None:
    config = config_file(tmp_path, "[synth]\nseed = 3\n")
    made = run_cli("patients", "generate", "--count", "3", "--sex", "F", "--config", str(config)).stdout.splitlines()
    assert len(made) == 3 and all(" F " in line for line in made)
    listed = run_cli("patients", "list", "--config", str(config)).stdout.splitlines()
    assert listed == made


def test_check_config_lists_every_problem_and_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nport = 70000\nduplicates = "reject"\n')
    result = run_cli("check-config", "--config", str(bad), check=False)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(str(bad)) for line in lines)
    assert "OK" in run_cli("check-config", "--config", str(config_file(tmp_path))).stdout


def test_show_renders_and_ocr_reads_the_accession(tmp_path: Path) -> None:
    tesseract = need("tesseract")
    config = config_file(tmp_path, '[synth]\naccession_pattern = "{YYYY}{7digits}"\n')
    out = run_cli("generate", "--config", str(config), "--modality", "CR").stdout
    accession = field(out, "Accession Number")
    study_uid = field(out, "Study Instance UID")
    image = sorted((tmp_path / "data" / "storage" / study_uid).rglob("*.dcm"))[0]
    png = tmp_path / "cr.png"
    shown = run_cli("show", str(image), "--png", str(png)).stdout
    assert accession in shown and "Computed Radiography Image Storage" in shown
    # One OpenMP thread: tesseract's threads spin against each other, several times slower.
    single = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    text = subprocess.run([tesseract, str(png), "-"], capture_output=True, text=True, timeout=120, env=single).stdout
    assert accession in text.replace(" ", ""), text
    assert "SYNTHETIC" in text and "NOT FOR CLINICAL USE" in text


def test_show_refuses_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    result = run_cli("show", str(junk), check=False)
    assert result.returncode == 65 and "not a readable DICOM file" in result.stderr


def test_mammography_patients_are_women_and_views_are_named(tmp_path: Path) -> None:
    config = config_file(tmp_path, "[synth]\nseed = 5\n")
    for _ in range(3):
        out = run_cli("generate", "--config", str(config), "--modality", "MG").stdout
        assert ", F, born" in field(out, "Patient")
    files = sorted((tmp_path / "data" / "storage").rglob("*.dcm"))
    views = {dcmread(f).ViewCodeSequence[0].CodeMeaning for f in files}
    lateralities = sorted(dcmread(f).ImageLaterality for f in files)
    assert views == {"cranio-caudal", "medio-lateral oblique"}
    assert lateralities == ["L"] * 6 + ["R"] * 6


def test_config_from_the_environment_and_show_without_pixels(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    checked = run_cli("check-config", env={"FABRICATORD_CONFIG": str(config)})
    assert checked.stdout.startswith(f"{config}: OK")
    assert checked.stderr == f"fabricatord: configuration {config} (from FABRICATORD_CONFIG)\n"
    # From a folder holding conf/fabricatord.toml, with nothing set, that file; --config is silent.
    (tmp_path / "conf").mkdir()
    local = tmp_path / "conf" / "fabricatord.toml"
    local.write_text("[dicom]\nport = 11999\n")
    env = {k: v for k, v in os.environ.items() if k != "FABRICATORD_CONFIG"}
    found = subprocess.run(
        [sys.executable, "-m", "fabricatord", "check-config"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert found.returncode == 0 and found.stdout.startswith(f"{local}: OK"), found.stderr
    assert found.stderr == f"fabricatord: configuration {local}\n"
    assert run_cli("check-config", "--config", str(local)).stderr == ""
    out = run_cli("generate", "--modality", "SC", env={"FABRICATORD_CONFIG": str(config)}).stdout
    image = next((tmp_path / "data" / "storage").rglob("*.dcm"))
    assert field(out, "Study Instance UID") in str(image)
    ds = dcmread(image)
    del ds.PixelData
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, enforce_file_format=True)
    result = run_cli("show", str(bare), "--png", str(tmp_path / "x.png"), check=False)
    assert result.returncode == 65 and "has no pixel data" in result.stderr


def test_generate_leaves_a_running_daemons_temporary_files_alone(tmp_path: Path) -> None:
    from fabricatord.service import hold_data_dir

    data = tmp_path / "data"
    (data / "tmp").mkdir(parents=True)
    in_flight = data / "tmp" / "being-written.part"
    env = {"FABRICATORD__NODE__DATA_DIR": str(data)}
    lock = hold_data_dir(data)  # as `serve` holds it
    try:
        in_flight.write_bytes(b"x")
        run_cli("generate", "--modality", "CR", "--images", "1", env=env)
        assert in_flight.exists()  # work in progress of the daemon, not a leftover
    finally:
        os.close(lock)
    run_cli("generate", "--modality", "CR", "--images", "1", env=env)
    assert not in_flight.exists()  # nobody serves: a crash left it, and it is swept
