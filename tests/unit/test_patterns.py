from __future__ import annotations

import random
from datetime import date

import pytest

from fabricatord.synth.patterns import Pattern, PatternError

TODAY = date(2026, 3, 7)


def test_default_patterns() -> None:
    accession = Pattern.parse("{YYYY}{2letters}{7digits}")
    value = accession.render(42, TODAY, random.Random(1))
    assert value.startswith("2026") and value.endswith("0000042")
    assert value[4:6].isalpha() and value[4:6].isupper()
    assert accession.max_length == 13 and accession.counter_width == 7
    assert Pattern.parse("PID{7digits}").render(1, TODAY, random.Random(1)) == "PID0000001"


def test_date_and_random_tokens() -> None:
    pattern = Pattern.parse("{YY}{MM}{DD}-{4hex}")
    value = pattern.render(None, TODAY, random.Random(3))
    assert value[:7] == "260307-"
    assert all(c in "0123456789ABCDEF" for c in value[7:]) and len(value) == 11
    assert pattern.counter_width is None


def test_counter_overflow_is_refused_not_wrapped() -> None:
    with pytest.raises(PatternError, match="does not fit"):
        Pattern.parse("A{2digits}").render(100, TODAY, random.Random())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{3digits}{2digits}", "at most one"),
        ("A{x}", "unknown placeholder"),
        ("A}", "unbalanced"),
        ("A\\B", "backslash"),
        ("", "empty"),
        ("{0digits}", "unknown placeholder"),
    ],
)
def test_bad_patterns(text: str, message: str) -> None:
    with pytest.raises(PatternError, match=message):
        Pattern.parse(text)
