"""Pixels that show what the image is: legible text and simple shapes (Pillow).

A series is rendered once as a base picture with the text that all its images share; each
image then copies it and adds its own lines and a shape that changes from image to image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

BANNER = "SYNTHETIC - NOT FOR CLINICAL USE"
FONT = Path(__file__).parent / "fonts" / "Hack-Regular.ttf"
"""Shipped inside the package: a system font would change a seeded study's pixels from one
machine to the next. Monospaced, with a zero that neither a reader nor OCR takes for O; of
the monospaced fonts Debian ships, the one tesseract read best at 12 pixels."""
READABLE_FONT_SIZE = 12
"""The smallest size OCR reads without error: from 256×256 up every line fits at this size or larger."""
MIN_FONT_SIZE = 8
FIELD_GAP = "   "
"""Between the fields of a line (`Born: …   Sex: F`): where a line breaks first."""


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size)


@dataclass(frozen=True)
class TextLine:
    """A line of burned-in text. `rank`: what a small image keeps first (0 is kept longest), and
    among an image's own lines, which line this is. `uid`: the text (after its `label`) is
    broken into pieces of equal length when it must be, never at a space."""

    text: str
    rank: int
    uid: bool = False
    label: str = ""


@dataclass(frozen=True)
class Canvas:
    rows: int
    columns: int
    rgb: bool = False

    @property
    def font_size(self) -> int:
        """The largest size we use for this width; `layout` goes smaller when the text needs it."""
        return max(READABLE_FONT_SIZE, min(self.columns // 34, 64))

    @property
    def margin(self) -> int:
        return max(3, self.columns // 64)


def _advance(size: int) -> float:
    return float(_font(size).getlength("0"))


def _line_height(size: int) -> int:
    """Ascent and descent: the lines touch nowhere, so a reader (and OCR) tells them apart."""
    ascent, descent = _font(size).getmetrics()
    return int(ascent + descent)


def wrap(line: TextLine, per_line: int) -> list[str]:
    """`line` in pieces of at most `per_line` characters: a UID after its label in pieces of
    equal length (no lone digit on a line of its own), other text at spaces, a word longer than
    a line like a UID."""
    text = f"{line.label} {line.text}" if line.label else line.text
    if len(text) <= per_line:
        return [text]
    if line.uid:
        pieces = _equal_pieces(text, per_line)
        if len(pieces[0]) > len(line.label) + 1:
            return pieces
        # A line too short for the label and digits: the label on lines of its own.
        return [*wrap(TextLine(line.label, line.rank), per_line), *_equal_pieces(line.text, per_line)]
    return _pack(text.split(FIELD_GAP), FIELD_GAP, per_line, lambda field: _pack(field.split(" "), " ", per_line))


def _pack(parts: list[str], gap: str, per_line: int, split: Callable[[str], list[str]] | None = None) -> list[str]:
    """`parts` joined by `gap` into lines of at most `per_line`; a part too long for a line of
    its own is `split` (words), or cut into equal pieces (a word)."""
    lines: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current}{gap}{part}" if current else part
        if len(candidate) <= per_line:
            current = candidate
            continue
        if current:
            lines.append(current)
        if len(part) <= per_line:
            current = part
            continue
        *whole, current = split(part) if split is not None else _equal_pieces(part, per_line)
        lines.extend(whole)
    return [*lines, current] if current else lines


def _equal_pieces(text: str, per_line: int) -> list[str]:
    count = math.ceil(len(text) / per_line)
    size = math.ceil(len(text) / count)
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass(frozen=True)
class Layout:
    """Where the text of a series goes: one font size, the header's lines as drawn, and the
    lines each image adds."""

    font_size: int
    header: list[str]
    image_lines: list[TextLine]
    per_line: int

    @property
    def line_height(self) -> int:
        return _line_height(self.font_size)


def layout(canvas: Canvas, header: list[TextLine], image_lines: list[TextLine]) -> Layout:
    """The largest font size (up to the canvas's) at which every line fits inside the image,
    with room left for the figure; below `MIN_FONT_SIZE`, the lines of highest rank are left
    out until the rest fits. `image_lines` carry the longest text an image of the series will
    have, so that every image's lines fit too."""
    width = canvas.columns - 2 * canvas.margin
    height = canvas.rows - 2 * canvas.margin - FIGURE_MIN
    lines = [*header, *image_lines]
    for size in range(canvas.font_size, MIN_FONT_SIZE - 1, -1):
        per_line = max(1, int(width // _advance(size)))
        count = sum(len(wrap(line, per_line)) for line in lines)
        if count * _line_height(size) <= height:
            break
    kept = sorted(lines, key=lambda line: line.rank)
    while kept and sum(len(wrap(line, per_line)) for line in kept) * _line_height(size) > height:
        kept.pop()
    drawn = {id(line) for line in kept}
    return Layout(
        size,
        [piece for line in header if id(line) in drawn for piece in wrap(line, per_line)],
        [line for line in image_lines if id(line) in drawn],
        per_line,
    )


FIGURE_MIN = 8
"""Rows below the text for the figure, however small."""


class SeriesPainter:
    """Draws the images of one series in their stored pixel values.

    The series text, the body outline and the square are drawn once with Pillow into a base
    array; each image copies it, cuts in a disc whose radius follows the image's place in the
    series (a sphere sliced), and lays its own text from pre-rendered glyphs. That keeps a
    512×512 slice well under a millisecond.
    """

    def __init__(
        self,
        canvas: Canvas,
        header: list[TextLine],
        image_lines: list[TextLine],
        series_number: int,
        images: int,
        lookup: NDArray[np.uint16] | None = None,
    ) -> None:
        """`image_lines` are an image's own lines with the longest texts of the series (their
        placeholders); `paint` is given each image's."""
        self.canvas = canvas
        self.images = images
        self._layout = layout(canvas, header, image_lines)
        self._font = _font(self._layout.font_size)
        self._line = self._layout.line_height
        self._glyphs: dict[str, NDArray[np.uint8]] = {}
        mode = "RGB" if canvas.rgb else "L"
        base = Image.new(mode, (canvas.columns, canvas.rows), 0)
        draw = ImageDraw.Draw(base)
        # Grey-scale text goes on a layer of its own: its smoothed edges are laid between the
        # background's and the text's stored values, not through the tissue ramp of the lookup
        # table, where a window would blow them up into blots that close the zero.
        ink = base if canvas.rgb else Image.new("L", base.size, 0)
        ink_draw = ImageDraw.Draw(ink)
        y = canvas.margin
        for index, piece in enumerate(self._layout.header):
            fill: Any = 255
            if canvas.rgb:
                fill = (255, 220, 0) if index == 0 and piece == BANNER else (255, 255, 255)
            ink_draw.text((canvas.margin, y), piece, font=self._font, fill=fill)
            y += self._line
        self._text_top = y
        self._image_ranks = [line.rank for line in self._layout.image_lines]
        y += sum(len(wrap(line, self._layout.per_line)) for line in self._layout.image_lines) * self._line
        rows, columns = canvas.rows, canvas.columns
        top = min(y + self._line // 2, rows - FIGURE_MIN)
        cx, cy = columns // 2, (top + rows) // 2
        rx, ry = int(columns * 0.4), max(2, (rows - top) // 2 - 2)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(90, 90, 110) if canvas.rgb else 90)
        offset = int(rx * 0.35) * (1 if series_number % 2 else -1)
        side = max(2, ry // 4)
        sx = cx - offset - side
        draw.rectangle(
            (sx, cy - side, sx + 2 * side, cy + side),
            fill=(60, 200, 60) if canvas.rgb else 150 + 20 * (series_number % 4),
        )
        self._lookup = lookup
        self._ink = _ink_table(lookup)
        self._base = self._final(np.asarray(base))
        if not canvas.rgb:
            np.maximum(self._base, self._ink[np.asarray(ink)], out=self._base)
        # The disc: a box around its largest extent and each pixel's squared distance to its centre.
        self._max_radius = max(2, int(min(rx, ry) * 0.6))
        r = self._max_radius
        self._box = (
            slice(max(cy - r, 0), min(cy + r + 1, rows)),
            slice(max(cx + offset - r, 0), min(cx + offset + r + 1, columns)),
        )
        yy, xx = np.ogrid[self._box[0], self._box[1]]
        self._distance2 = (yy - cy) ** 2 + (xx - cx - offset) ** 2
        bright = np.array([200, 160, 60] if canvas.rgb else [200], dtype=np.uint8)
        self._disc_value = self._final(bright.reshape(1, 1, -1) if canvas.rgb else bright.reshape(1, 1))[0, 0]

    @property
    def font_size(self) -> int:
        return self._layout.font_size

    def _final(self, drawn: NDArray[np.uint8]) -> NDArray[Any]:
        return self._lookup[drawn] if self._lookup is not None else drawn.copy()

    def _glyph(self, char: str) -> NDArray[np.uint8]:
        glyph = self._glyphs.get(char)
        if glyph is None:
            advance = max(1, round(self._font.getlength(char)))
            image = Image.new("L", (advance, self._line), 0)
            ImageDraw.Draw(image).text((0, 0), char, font=self._font, fill=255)
            glyph = self._glyphs[char] = np.asarray(image)
        return glyph

    def _stamp(self, pixels: NDArray[Any], text: str, y: int) -> None:
        strip = np.concatenate([self._glyph(c) for c in text], axis=1)
        rows, columns = pixels.shape[0], pixels.shape[1]
        x = self.canvas.margin
        strip = strip[: max(rows - y, 0), : max(columns - x, 0)]
        if strip.size == 0:
            return
        region = pixels[y : y + strip.shape[0], x : x + strip.shape[1]]
        ink = strip[..., None].repeat(3, axis=2) if self.canvas.rgb else self._ink[strip]
        np.maximum(region, ink, out=region)

    def paint(self, index: int, lines: list[TextLine]) -> bytes:
        """The pixel bytes (little endian) of image `index` (from 0) of the series, with its own
        `lines` (of the ranks the layout kept) below the series text."""
        pixels = self._base.copy()
        phase = (index + 0.5) / max(self.images, 1)
        radius = max(2, int(self._max_radius * math.sin(math.pi * phase)))
        region = pixels[self._box]
        region[self._distance2 <= radius * radius] = self._disc_value
        y = self._text_top
        for line in lines:
            if line.rank not in self._image_ranks:
                continue
            for piece in wrap(line, self._layout.per_line):
                if piece:
                    self._stamp(pixels, piece, y)
                y += self._line
        return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def _ink_table(lookup: NDArray[np.uint16] | None) -> NDArray[Any]:
    """Text coverage 0–255 → stored value, straight from the background's value to the text's."""
    coverage = np.arange(256, dtype=np.float64) / 255
    if lookup is None:
        return np.arange(256, dtype=np.uint8)
    low, high = float(lookup[0]), float(lookup[255])
    return np.round(low + coverage * (high - low)).astype(lookup.dtype)


def lookup_table(background: int, tissue: int, feature: int, text: int, bits: int) -> NDArray[np.uint16]:
    """Map drawn grey levels 0–255 to stored values: 0 → background, 90 → tissue, 200 → feature, 255 → text."""
    points = np.array([0, 90, 200, 255], dtype=np.float64)
    values = np.array([background, tissue, feature, text], dtype=np.float64)
    table = np.interp(np.arange(256), points, values)
    return np.clip(table, 0, (1 << bits) - 1).astype(np.uint16)
