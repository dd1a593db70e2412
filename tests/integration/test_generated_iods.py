"""Every modality template in every transfer syntax, checked by dciodvfy, dcmdump and pydicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from fabricatord.cli import main
from fabricatord.synth.encoding import TRANSFER_SYNTAXES
from fabricatord.synth.templates import MODALITIES
from tests.conftest import need, run_cli

pytestmark = pytest.mark.integration

# Keep the studies small where the template's default is large; projection views stay as they are.
SMALL = {"CT": ["--images", "3"], "MR": ["--images", "2"], "US": ["--images", "2"]}


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    result = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [s for s in lines if s.startswith("Error")], [s for s in lines if s.startswith("Warning")]


@pytest.mark.parametrize("transfer_syntax", list(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("modality", MODALITIES)
def test_template_passes_dciodvfy_dcmdump_and_strict_pydicom(
    modality: str, transfer_syntax: str, tmp_path: Path
) -> None:
    need("dciodvfy")
    dcmdump = need("dcmdump")
    out = tmp_path / "out"
    run_cli(
        "generate",
        "--modality",
        modality,
        "--transfer-syntax",
        transfer_syntax,
        "--out",
        str(out),
        *SMALL.get(modality, []),
        env={"FABRICATORD_CONFIG": "", "FABRICATORD__NODE__DATA_DIR": str(tmp_path / "data")},
    )
    files = sorted(out.rglob("*.dcm"))
    assert files
    for path in files:
        errors, warnings = dciodvfy_findings(path)
        assert errors == [], f"{path.name}: {errors}"
        assert warnings == [], f"{path.name}: {warnings}"
        dumped = subprocess.run([dcmdump, "--print-all", str(path)], capture_output=True, text=True, timeout=60)
        assert dumped.returncode == 0 and "E: " not in dumped.stderr, dumped.stderr
        ds = dcmread(path)  # strict: reading_validation_mode = RAISE (conftest)
        assert ds.preamble == bytes(128)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[transfer_syntax]
        assert ds.BurnedInAnnotation == "YES"
        pixels = ds.pixel_array
        assert pixels.shape[:2] == (ds.Rows, ds.Columns) and pixels.max() > pixels.min()
    png = tmp_path / "first.png"
    assert main(["show", str(files[0]), "--png", str(png)]) == 0
    with Image.open(png) as image:
        assert image.size == (ds.Columns, ds.Rows)
        assert image.mode == ("RGB" if ds.SamplesPerPixel == 3 else "L")
        if image.mode == "RGB":  # the banner is yellow: a wrong colour conversion loses it
            rgb = np.asarray(image).astype(int)
            assert np.any((rgb[..., 0] > 200) & (rgb[..., 1] > 170) & (rgb[..., 2] < 80))


@pytest.mark.parametrize("locale", ["ja_JP", "de_DE", "el_GR"])
def test_other_locales_are_valid_and_carry_their_character_set(locale: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "data"), "FABRICATORD__SYNTH__LOCALE": locale}
    run_cli("generate", "--modality", "MR", "--images", "1", "--series", "1", "--out", str(out), env=env)
    path = next(out.rglob("*.dcm"))
    errors, warnings = dciodvfy_findings(path)
    assert errors == [] and warnings == []
    ds = dcmread(path)
    name = ds.PatientName
    if locale == "ja_JP":
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(name.alphabetic).isascii() and not str(name.ideographic).isascii() and name.phonetic
    elif not str(name).isascii():
        assert ds.SpecificCharacterSet == "ISO_IR 192"
    else:
        assert "SpecificCharacterSet" not in ds
