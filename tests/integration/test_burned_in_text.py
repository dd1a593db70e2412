"""The text burned into every generated image reads back: tesseract OCRs the accession, the
patient ID and each UID of an image of every modality at its default size, and of CT and MG
(the largest default) at 256×256, where the text is smallest; they must match the header
character by character (seed 002: the text is there to be read back, by people and by machines).

Tesseract's line model reads a zero that follows letters (`PID0000001`) as the letter O whatever
the typeface, alone reads both as a zero, and now and then takes a letter among digits for a
digit (an I for a 1). So the reader does what a careful person does with this typeface: UIDs are
read as digits (tesseract's whitelist), and a word of letters and digits is read several times,
each round glyph settled by the bar inside that marks the zero and each stem by the bar that
marks the I. A typeface without those marks fails here, as the one before it did."""

from __future__ import annotations

import csv
import difflib
import io
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from pydicom import dcmread

from fabricatord.cli import main
from fabricatord.synth.templates import MODALITIES
from tests.conftest import need, run_cli

pytestmark = pytest.mark.integration

DIGITS = "0123456789."
UID_LABELS = ("Study Instance", "Series Instance", "SOP Instance")
INK_PIXELS = 30
"""Tesseract reads best when a line's ink is about this tall: every line is scaled to it."""


@dataclass
class Word:
    text: str
    left: int
    right: int
    top: int
    bottom: int


def _ocr(image: Image.Image, whitelist: str = "") -> list[Word]:
    """One line of text (black on white), as tesseract's words with their horizontal extent."""
    command = [need("tesseract"), "stdin", "stdout", "--psm", "7"]
    if whitelist:
        command += ["-c", f"tessedit_char_whitelist={whitelist}"]
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    result = subprocess.run([*command, "tsv"], input=buffer.getvalue(), capture_output=True, timeout=60, check=True)
    rows = csv.DictReader(io.StringIO(result.stdout.decode()), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [
        Word(
            row["text"],
            int(row["left"]),
            int(row["left"]) + int(row["width"]),
            int(row["top"]),
            int(row["top"]) + int(row["height"]),
        )
        for row in rows
        if row["level"] == "5" and row["text"].strip()
    ]


ROUND = "0OoQ"
STEMS = "1I"


def _glyphs(pixels: np.ndarray, word: Word) -> list[tuple[int, int]]:
    """The columns of each glyph of a word: runs of inked columns between blank ones, and a run
    as wide as several glyphs (two that touch) cut into as many: the font is monospaced."""
    inked = (pixels[word.top : word.bottom, word.left : word.right] < 160).any(axis=0)
    runs: list[tuple[int, int]] = []
    start = None
    for column, ink in enumerate([*inked, False]):
        if ink and start is None:
            start = column
        elif not ink and start is not None:
            runs.append((word.left + start, word.left + column))
            start = None
    if not runs:
        return runs
    usual = float(np.median([right - left for left, right in runs]))
    glyphs = []
    for left, right in runs:
        count = max(1, round((right - left) / usual))
        step = (right - left) / count
        glyphs += [(round(left + i * step), round(left + (i + 1) * step)) for i in range(count)]
    return glyphs


def read_word(line: Image.Image, word: Word, whitelist: str = "") -> str:
    """A word of letters and digits, read as a careful person reads it: several times (the
    crop at five scales: tesseract's slips change with the scale, the glyphs do not), each
    round glyph settled by its middle (ink there is the zero's bar), a stem by its top right
    (ink there is the I's bar), and each character the one most readings agree on. Readings
    with more or fewer characters than the word has glyphs are left out. A UID is read with the
    digits and dot as `whitelist`."""
    pixels = np.asarray(line.convert("L"), dtype=np.float64)
    glyphs = _glyphs(pixels, word)
    crop = line.crop((word.left - 8, word.top - 8, word.right + 8, word.bottom + 8))
    texts = []
    for scale in (1.0, 0.8, 0.9, 1.1, 1.25):
        seen = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
        texts.append("".join(w.text for w in _ocr(seen, whitelist)))
    readings = [text for text in texts if len(text) == len(glyphs)]
    if not readings:
        return texts[0]
    height = word.bottom - word.top
    middle, half = (word.top + word.bottom) / 2, 0.15 * height
    settled = []
    for position, (left, right) in enumerate(glyphs):
        char = Counter(reading[position] for reading in readings).most_common(1)[0][0]
        x, width = (left + right) / 2, right - left
        if char in ROUND:
            core = pixels[
                round(middle - half) : round(middle + half) + 1, round(x - 0.1 * width) : round(x + 0.1 * width) + 1
            ]
            if core.mean() < 200:
                char = "0"
            elif char != "Q":
                char = "O"
        elif char in STEMS and not whitelist:  # the I's top bar reaches right of its stem, the 1's flag does not
            corner = pixels[word.top : round(word.top + 0.2 * height) + 1, round(x + 0.2 * width) : right + 1]
            char = "I" if corner.size and corner.min() < 128 else "1"
        settled.append(char)
    return "".join(settled)


def _lines(png: Path) -> list[Image.Image]:
    """Each line of text of a rendered image, black on white, scaled for tesseract: rows of ink
    separated by empty rows, from the top down to the figure."""
    grey = Image.open(png).convert("L")
    ink = np.asarray(grey) > 96
    lines: list[Image.Image] = []
    heights: list[int] = []
    top = None
    for row, inked in enumerate([*ink.any(axis=1), False]):
        if inked and top is None:
            top = row
        elif not inked and top is not None:
            height = row - top
            if heights and height > 4 * heights[0]:  # the figure: the text is above it
                break
            crop = grey.crop((0, max(top - 2, 0), grey.width, min(row + 2, grey.height)))
            line = ImageOps.expand(ImageOps.invert(crop), border=4, fill=255)
            scale = INK_PIXELS / height
            lines.append(line.resize((round(line.width * scale), round(line.height * scale)), Image.Resampling.LANCZOS))
            heights.append(height)
            top = None
    return lines


def _joined(words: list[Word]) -> Word:
    """Words tesseract split (it may see a gap inside a long run of digits) as one."""
    return Word(
        "".join(w.text for w in words),
        min(w.left for w in words),
        max(w.right for w in words),
        min(w.top for w in words),
        max(w.bottom for w in words),
    )


def read_back(png: Path) -> dict[str, str]:
    """What a reader finds: `Accession`, `ID` and each `… Instance UID`, a UID put together from
    the digits after its label and the lines of digits below it (each read as digits only)."""
    found: dict[str, str] = {}
    lines = _lines(png)
    for index, line in enumerate(lines):
        words = _ocr(line)
        texts = [w.text for w in words]
        for label, key in (("Accession:", "Accession"), ("ID:", "ID")):  # each ends its line
            if label in texts and texts.index(label) + 1 < len(texts):
                found[key] = read_word(line, _joined(words[texts.index(label) + 1 :]))
        # The label ends with `UID:`, whatever one of its letters was read as (VID:).
        uid = next((n for n, text in enumerate(texts) if len(text) == 4 and text.endswith("ID:")), None)
        if uid is None:
            continue
        said = " ".join(texts[:uid])
        label = next(iter(difflib.get_close_matches(said, UID_LABELS, n=1, cutoff=0.6)), said)
        after = words[uid + 1 :]
        digits = read_word(line, _joined(after), DIGITS) if after else ""
        for below in lines[index + 1 :]:  # lines of digits (mostly, as first read) continue the UID
            seen = _ocr(below)
            first = "".join(w.text for w in seen)
            if not first or sum(char in DIGITS for char in first) < 0.7 * len(first):
                break
            digits += read_word(below, _joined(seen), DIGITS)
        found[label] = digits
    return found


def _expected(path: Path) -> dict[str, str]:
    ds = dcmread(path)
    return {
        "Accession": str(ds.AccessionNumber),
        "ID": str(ds.PatientID),
        "Study Instance": str(ds.StudyInstanceUID),
        "Series Instance": str(ds.SeriesInstanceUID),
        "SOP Instance": str(ds.SOPInstanceUID),
    }


@pytest.mark.parametrize(
    ("modality", "size"),
    [*((modality, "default") for modality in MODALITIES), ("CT", "256"), ("MG", "256")],
)
def test_the_burned_in_identifiers_read_back_character_by_character(tmp_path: Path, modality: str, size: str) -> None:
    need("tesseract")
    shape = ["--rows", "256", "--columns", "256"] if size == "256" else []
    out = tmp_path / "study"
    run_cli(
        "generate",
        "--modality",
        modality,
        "--series",
        "1",
        "--images",
        "2",
        *shape,
        "--out",
        str(out),
        env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "data"), "FABRICATORD__SYNTH__SEED": "2"},
    )
    image = sorted(out.rglob("*.dcm"))[-1]
    png = tmp_path / "image.png"
    assert main(["show", str(image), "--png", str(png)]) == 0
    assert read_back(png) == _expected(image)
