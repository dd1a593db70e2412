"""The text burned into every generated image reads back: tesseract OCRs the accession, the
patient ID and each UID of an image of every modality at its default size and at 256×256, where
the text is smallest; they must match the header character by character (seed 002: the text is
there to be read back, by people and by machines).

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
import os
import subprocess
import tempfile
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


def _ocr(images: list[Image.Image], whitelist: str = "") -> list[list[Word]]:
    """Each image one line of text (black on white), as tesseract's words with their horizontal
    extent. One tesseract run reads them all, a page each (its start-up is most of the time of a
    single line)."""
    if not images:
        return []
    with tempfile.TemporaryDirectory(prefix="ocr-") as folder:
        pages = []
        for number, image in enumerate(images):
            page = Path(folder) / f"{number}.png"
            image.save(page, "PNG")
            pages.append(str(page))
        listing = Path(folder) / "pages.txt"
        listing.write_text("\n".join(pages) + "\n")
        command = [need("tesseract"), str(listing), "stdout", "--psm", "7"]
        if whitelist:
            command += ["-c", f"tessedit_char_whitelist={whitelist}"]
        # One thread: tesseract's OpenMP threads spin against each other on lines this small,
        # several times slower than one.
        result = subprocess.run(
            [*command, "tsv"], capture_output=True, timeout=120, check=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}
        )
    rows = csv.DictReader(io.StringIO(result.stdout.decode()), delimiter="\t", quoting=csv.QUOTE_NONE)
    words: list[list[Word]] = [[] for _ in images]
    for row in rows:
        if row["level"] == "5" and row["text"].strip():
            left, top = int(row["left"]), int(row["top"])
            word = Word(row["text"], left, left + int(row["width"]), top, top + int(row["height"]))
            words[int(row["page_num"]) - 1].append(word)
    return words


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


SCALES = (1.0, 0.8, 0.9, 1.1, 1.25)
"""A word is read at these scales of its crop: tesseract's slips change with the scale, the
glyphs do not."""


def read_words(wanted: list[tuple[Image.Image, Word]], whitelist: str = "") -> list[str]:
    """Words of letters and digits (each in its line), read as a careful person reads them:
    several times (at each of SCALES), each round glyph settled by its middle (ink there is the
    zero's bar), a stem by its top right (ink there is the I's bar), and each character the one
    most readings agree on. Readings with more or fewer characters than the word has glyphs are
    left out. UIDs are read with the digits and dot as `whitelist`."""
    crops = []
    for line, word in wanted:
        crop = line.crop((word.left - 8, word.top - 8, word.right + 8, word.bottom + 8))
        crops += [
            crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
            for scale in SCALES
        ]
    seen = _ocr(crops, whitelist)
    read = []
    for number, (line, word) in enumerate(wanted):
        texts = ["".join(w.text for w in words) for words in seen[number * len(SCALES) : (number + 1) * len(SCALES)]]
        read.append(_settled(line, word, texts, whitelist))
    return read


def _settled(line: Image.Image, word: Word, texts: list[str], whitelist: str) -> str:
    pixels = np.asarray(line.convert("L"), dtype=np.float64)
    glyphs = _glyphs(pixels, word)
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
    lines = _lines(png)
    words_of = _ocr(lines)
    labelled: list[tuple[str, Image.Image, Word]] = []  # read as letters and digits
    uids: dict[str, list[tuple[Image.Image, Word]]] = {}  # the parts of each UID, read as digits
    for index, (line, words) in enumerate(zip(lines, words_of, strict=True)):
        texts = [w.text for w in words]
        for label, key in (("Accession:", "Accession"), ("ID:", "ID")):  # each ends its line
            if label in texts and texts.index(label) + 1 < len(texts):
                labelled.append((key, line, _joined(words[texts.index(label) + 1 :])))
        # The label ends with `UID:`, whatever one of its letters was read as (VID:).
        uid = next((n for n, text in enumerate(texts) if len(text) == 4 and text.endswith("ID:")), None)
        if uid is None:
            continue
        said = " ".join(texts[:uid])
        label = next(iter(difflib.get_close_matches(said, UID_LABELS, n=1, cutoff=0.6)), said)
        parts = uids.setdefault(label, [])
        if words[uid + 1 :]:
            parts.append((line, _joined(words[uid + 1 :])))
        for below, seen in zip(lines[index + 1 :], words_of[index + 1 :], strict=True):
            first = "".join(w.text for w in seen)  # lines of digits (mostly, as first read) continue the UID
            if not first or sum(char in DIGITS for char in first) < 0.7 * len(first):
                break
            parts.append((below, _joined(seen)))
    found = dict(
        zip([key for key, _, _ in labelled], read_words([(line, word) for _, line, word in labelled]), strict=True)
    )
    digits = iter(read_words([part for parts in uids.values() for part in parts], DIGITS))
    for label, parts in uids.items():
        found[label] = "".join(next(digits) for _ in parts)
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
    [(modality, size) for modality in MODALITIES for size in ("default", "256")],
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
