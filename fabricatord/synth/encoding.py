"""Transfer syntaxes of generated files and the pixel encoders behind them."""

from __future__ import annotations

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpegls-lossless": JPEGLSLossless,
}
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})


def available_transfer_syntaxes() -> list[str]:
    """The names whose encoder is installed (JPEG 2000 and JPEG-LS need their plugins)."""
    from pydicom.pixels.encoders.base import get_encoder

    names = []
    for name, uid in TRANSFER_SYNTAXES.items():
        if uid in _NATIVE or get_encoder(uid).is_available:
            names.append(name)
    return names


def encode_pixels(ds: Dataset, pixels: bytes, transfer_syntax: UID) -> None:
    """Put `pixels` (native little-endian) into `ds` in `transfer_syntax`; file meta must exist."""
    vr = "OW" if ds.BitsAllocated > 8 else "OB"
    ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, vr, pixels)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if transfer_syntax in _NATIVE:
        return
    dtype = np.uint16 if ds.BitsAllocated > 8 else np.uint8
    shape = (ds.Rows, ds.Columns, 3) if ds.SamplesPerPixel == 3 else (ds.Rows, ds.Columns)
    array = np.frombuffer(pixels, dtype=dtype).reshape(shape)
    # Keep the SOP Instance UID: the pixels show it, and it was planned up front.
    ds.compress(transfer_syntax, array, generate_instance_uid=False)
    if transfer_syntax == JPEG2000Lossless and ds.SamplesPerPixel == 3:
        # The encoder applies the reversible colour transform to RGB (PS3.5 8.2.4).
        ds.PhotometricInterpretation = "YBR_RCT"
