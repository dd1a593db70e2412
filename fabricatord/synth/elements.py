"""Setting the per-image elements of a generated series without pydicom's per-value checks.

Every image of a CT repeats the same few assignments; pydicom's attribute access looks up the
keyword and validates the value each time. Our values are made here and known valid (the tests
read every template back with validation raising), so the per-image elements go in directly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset


@lru_cache(maxsize=256)
def _spec(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return tag, dictionary_VR(tag)


def put(ds: Dataset, keyword: str, value: Any) -> None:
    """`ds.<keyword> = value`, for a value this package made."""
    tag, vr = _spec(keyword)
    ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
