from __future__ import annotations

import random
from datetime import date

from fabricatord.config.values import is_valid_uid
from fabricatord.synth.patients import make_patient
from fabricatord.synth.uids import UidFactory


def test_uids_are_valid_unique_and_reproducible() -> None:
    for root in (
        "2.25",
        "1.2.826.0.1.3680043.10.999",
        "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.1",
    ):
        factory = UidFactory(root, random.Random(5))
        uids = [factory.new() for _ in range(2000)]
        assert len(set(uids)) == len(uids)
        assert all(is_valid_uid(u) and len(u) <= 64 and u.startswith(root + ".") for u in uids)
        again = UidFactory(root, random.Random(5))
        assert [again.new() for _ in range(3)] == uids[:3]


def test_invalid_uids_are_recognised() -> None:
    for bad in ("1.02.3", "1..2", "1.2.", "a.b", "1.2.3/../..", "1" * 65, ""):
        assert not is_valid_uid(bad)


def test_patients_are_sex_consistent_and_in_the_age_range() -> None:
    from faker.providers.person.en_US import Provider

    males, females = set(Provider.first_names_male), set(Provider.first_names_female)
    today = date(2026, 11, 23)
    rng = random.Random(11)
    for _ in range(200):
        patient = make_patient("P", "I", rng, today, "en_US", min_age=20, max_age=30)
        given = patient.name.split("^")[1]
        assert given in (males if patient.sex == "M" else females)
        born = date(int(patient.birth_date[:4]), int(patient.birth_date[4:6]), int(patient.birth_date[6:]))
        age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
        assert 20 <= age <= 30
        assert "\n" not in patient.address and len(patient.address) <= 64 and len(patient.phone) <= 16


def test_same_seed_same_patient_and_other_locales() -> None:
    first = make_patient("P", "I", random.Random(99), date(2026, 1, 1), "de_DE")
    again = make_patient("P", "I", random.Random(99), date(2026, 1, 1), "de_DE")
    assert first == again
    japanese = make_patient("P", "I", random.Random(1), date(2026, 1, 1), "ja_JP")
    alphabetic, ideographic, phonetic = japanese.name.split("=")
    assert alphabetic.isascii() and "^" in alphabetic
    assert not ideographic.isascii() and not phonetic.isascii()
