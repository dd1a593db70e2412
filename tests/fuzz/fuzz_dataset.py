"""Coverage-guided fuzz target (atheris) for the datasets a peer sends: C-STORE datasets, query
identifiers, MPPS datasets.

    .venv/bin/python tests/fuzz/fuzz_dataset.py -max_total_time=600 tests/fuzz/corpus/dataset

The first byte of the input picks the transfer syntax; the rest is the encoded dataset, walked
by `fabricatord.dicom.walk` as the node walks every dataset before it decodes it. The
properties: the walk either keeps what it was asked for or refuses with `Malformed`, never
another exception, never past its limits; and what it keeps reads back through pydicom, as the
index reads a received instance's header, without raising.
"""

from __future__ import annotations

import sys
import warnings
from io import BytesIO
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["fabricatord.dicom.walk"]):
    from pydicom.uid import UID

    from fabricatord.dicom.walk import Malformed, WalkLimits, dataset_of, walk

SYNTAXES = [
    UID("1.2.840.10008.1.2"),  # Implicit VR Little Endian
    UID("1.2.840.10008.1.2.1"),  # Explicit VR Little Endian
    UID("1.2.840.10008.1.2.2"),  # Explicit VR Big Endian
    UID("1.2.840.10008.1.2.1.99"),  # Deflated Explicit VR Little Endian
    UID("1.2.840.10008.1.2.4.90"),  # JPEG 2000: encapsulated pixel data
]
# What the index reads of a received instance, and an element of every common VR.
KEEP = frozenset(
    {0x00080005, 0x00080016, 0x00080018, 0x00080020, 0x00080060, 0x00100010, 0x00100020, 0x00200013, 0x0020000D}
)
LIMITS = WalkLimits(depth=8, elements=5_000, inflated=1 << 20)
warnings.simplefilter("ignore")  # pydicom warns about every invalid value it decodes


def one_input(data: bytes) -> None:
    if not data:
        return
    syntax = SYNTAXES[data[0] % len(SYNTAXES)]
    try:
        walked = walk(BytesIO(data[1:]), syntax, KEEP, LIMITS)
    except Malformed:
        return
    assert walked.count <= LIMITS.elements and walked.depth <= LIMITS.depth, walked
    assert set(walked.elements) <= KEEP
    ds = dataset_of(walked, syntax)
    for element in ds:
        str(element.value)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
