"""Synthetic patients: sex-consistent names, birth dates in an age range, address and phone."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta

from faker import Faker


@dataclass(frozen=True)
class Demographics:
    patient_id: str
    issuer: str
    name: str
    """DICOM PN: Family^Given^Middle."""
    birth_date: str
    """DICOM DA: YYYYMMDD."""
    sex: str
    address: str
    phone: str

    @property
    def age_years(self) -> int:
        return _age(
            date(int(self.birth_date[:4]), int(self.birth_date[4:6]), int(self.birth_date[6:8])),
            date.today(),
        )


def _age(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _clean(text: str, limit: int) -> str:
    """One line of the default repertoire's shape: no backslash, no control characters, at most `limit`."""
    flat = ", ".join(part.strip() for part in text.splitlines() if part.strip())
    return "".join(c for c in flat if c.isprintable() and c not in "\\^=")[:limit]


_fakers: dict[str, Faker] = {}


def _faker(locale: str) -> Faker:
    # Building a Faker loads its locale's providers (~50 ms): once per locale is enough.
    if locale not in _fakers:
        _fakers[locale] = Faker(locale)
    return _fakers[locale]


def _person_name(faker: Faker, sex: str) -> str:
    """DICOM PN. Where the locale knows a name's writings (ja_JP), all three component groups,
    alphabetic=ideographic=phonetic, as Japanese modalities send them (PS3.5 6.2.1.2)."""
    if hasattr(faker, "last_name_pair"):
        first = {"M": faker.first_name_male_pair, "F": faker.first_name_female_pair}.get(sex, faker.first_name_pair)()
        family = faker.last_name_pair()  # (ideographic, phonetic, romanized)
        groups = [(family[2], first[2]), (family[0], first[0]), (family[1], first[1])]
        return "=".join(f"{_clean(f, 32)}^{_clean(g, 31)}" for f, g in groups)
    given = faker.first_name_male() if sex == "M" else faker.first_name_female() if sex == "F" else faker.first_name()
    return f"{_clean(faker.last_name(), 32)}^{_clean(given, 31)}"


def make_patient(
    patient_id: str,
    issuer: str,
    rng: random.Random,
    today: date,
    locale: str = "en_US",
    min_age: int = 1,
    max_age: int = 90,
    sex: str | None = None,
) -> Demographics:
    faker = _faker(locale)
    faker.seed_instance(rng.getrandbits(64))
    sex = sex or rng.choice("MF")
    youngest = today - timedelta(days=round(min_age * 365.25))
    oldest = today - timedelta(days=round((max_age + 1) * 365.25) - 1)
    born = oldest + timedelta(days=rng.randrange((youngest - oldest).days + 1))
    return Demographics(
        patient_id=patient_id,
        issuer=issuer,
        name=_person_name(faker, sex),
        birth_date=born.strftime("%Y%m%d"),
        sex=sex,
        address=_clean(faker.address(), 64),
        phone=_clean(faker.phone_number(), 16),
    )
