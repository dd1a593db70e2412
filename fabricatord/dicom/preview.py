"""Pixels as a person looks at them: a frame through its modality and VOI LUTs, as PNG."""

from __future__ import annotations

import io
from typing import Any


class NoPixels(ValueError):
    """The dataset has no image to render, or not the frame asked for."""


def render_png(ds: Any, frame: int = 0, max_size: int | None = None) -> bytes:
    """Frame `frame` (from 0) of `ds` as a PNG, scaled down to fit `max_size` pixels a side."""
    import numpy as np
    from PIL import Image
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise NoPixels("the instance has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise NoPixels(f"the instance has {frames} frame(s); frame {frame + 1} does not exist")
    pixels = ds.pixel_array  # colour comes back as RGB whatever the stored colour space
    if frames > 1:
        pixels = pixels[frame]
    if ds.SamplesPerPixel == 3:
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    else:
        # Stored values → modality values (HU for CT) → the window the image asks for.
        pixels = apply_modality_lut(pixels, ds)
        if "WindowCenter" in ds:
            pixels = apply_voi_lut(pixels, ds)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low or 1.0))
        if ds.PhotometricInterpretation == "MONOCHROME1":
            scaled = 255 - scaled
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if max_size is not None:
        image.thumbnail((max_size, max_size))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
