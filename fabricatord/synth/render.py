"""Pixels that show what the image is: legible text and simple shapes (Pillow).

A series is rendered once as a base picture with the text that all its images share; each
image then copies it and adds its own lines and a shape that changes from image to image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

BANNER = "SYNTHETIC - NOT FOR CLINICAL USE"


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's built-in scalable font needs no font files on the machine.
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Canvas:
    rows: int
    columns: int
    rgb: bool = False

    @property
    def font_size(self) -> int:
        return max(10, min(self.columns // 34, 64))

    @property
    def margin(self) -> int:
        return max(4, self.columns // 64)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """Break a long line (a UID) so that every piece fits `width` pixels."""
    if font.getlength(text) <= width:
        return [text]
    pieces: list[str] = []
    current = ""
    for char in text:
        if current and font.getlength(current + char) > width:
            pieces.append(current)
            current = "  "
        current += char
    return [*pieces, current]


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
        header: list[str],
        series_number: int,
        images: int,
        lookup: NDArray[np.uint16] | None = None,
    ) -> None:
        self.canvas = canvas
        self.images = images
        self._font = _font(canvas.font_size)
        self._line = round(canvas.font_size * 1.25)
        self._glyphs: dict[str, NDArray[np.uint8]] = {}
        mode = "RGB" if canvas.rgb else "L"
        base = Image.new(mode, (canvas.columns, canvas.rows), 0)
        draw = ImageDraw.Draw(base)
        y = self._text(draw, header, canvas.margin, banner=True)
        self._text_top = y
        y += 3 * self._line  # room for the per-image lines (see paint)
        rows, columns = canvas.rows, canvas.columns
        top = min(y + self._line // 2, rows - 8)
        cx, cy = columns // 2, (top + rows) // 2
        rx, ry = int(columns * 0.4), max(4, (rows - top) // 2 - 4)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(90, 90, 110) if canvas.rgb else 90)
        offset = int(rx * 0.35) * (1 if series_number % 2 else -1)
        side = max(3, ry // 4)
        sx = cx - offset - side
        draw.rectangle(
            (sx, cy - side, sx + 2 * side, cy + side),
            fill=(60, 200, 60) if canvas.rgb else 150 + 20 * (series_number % 4),
        )
        self._lookup = lookup
        self._base = self._final(np.asarray(base))
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

    def _final(self, drawn: NDArray[np.uint8]) -> NDArray[Any]:
        return self._lookup[drawn] if self._lookup is not None else drawn.copy()

    def _text(self, draw: ImageDraw.ImageDraw, lines: list[str], y: int, banner: bool = False) -> int:
        width = self.canvas.columns - 2 * self.canvas.margin
        for index, line in enumerate(lines):
            if self.canvas.rgb:
                fill: Any = (255, 220, 0) if banner and index == 0 else (255, 255, 255)
            else:
                fill = 255
            for piece in _wrap(line, self._font, width):
                draw.text((self.canvas.margin, y), piece, font=self._font, fill=fill)
                y += self._line
        return y

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
        ink = self._final(strip[..., None].repeat(3, axis=2) if self.canvas.rgb else strip)
        np.maximum(region, ink, out=region)

    def paint(self, index: int, sop_instance_uid: str, label: str = "") -> bytes:
        """The pixel bytes (little endian) of image `index` (from 0) of the series."""
        pixels = self._base.copy()
        phase = (index + 0.5) / max(self.images, 1)
        radius = max(2, int(self._max_radius * math.sin(math.pi * phase)))
        region = pixels[self._box]
        region[self._distance2 <= radius * radius] = self._disc_value
        y = self._text_top
        number = f"Image {index + 1} of {self.images}" + (f"   {label}" if label else "")
        for line in (number, "SOP Instance UID:", sop_instance_uid):
            self._stamp(pixels, line, y)
            y += self._line
        return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def lookup_table(background: int, tissue: int, feature: int, text: int, bits: int) -> NDArray[np.uint16]:
    """Map drawn grey levels 0–255 to stored values: 0 → background, 90 → tissue, 200 → feature, 255 → text."""
    points = np.array([0, 90, 200, 255], dtype=np.float64)
    values = np.array([background, tissue, feature, text], dtype=np.float64)
    table = np.interp(np.arange(256), points, values)
    return np.clip(table, 0, (1 << bits) - 1).astype(np.uint16)
