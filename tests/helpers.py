"""Small builders shared by tests."""

from __future__ import annotations

import random
from datetime import date, datetime

from pydicom.dataset import Dataset

from fabricatord.synth.builder import StudyRequest, build_instances, plan_study
from fabricatord.synth.patients import make_patient


def study(
    modality: str = "CT",
    images: int = 3,
    seed: int = 1,
    transfer_syntax: str = "explicit",
    **kwargs: object,
) -> list[Dataset]:
    rng = random.Random(seed)
    patient = make_patient("PID0000001", "FABRICATORD", rng, date(2026, 11, 23))
    request = StudyRequest(modality, patient, "2026AB0000001", images=images, transfer_syntax=transfer_syntax, **kwargs)  # type: ignore[arg-type]
    return list(build_instances(plan_study(request, rng, "2.25", datetime(2026, 11, 23, 12, 0))))
