"""Pieces of the command line, one at a time: progress, listings that stop, argument types."""

from __future__ import annotations

import argparse

import pytest

from fabricatord.cli import _positive, _Progress, _shown


def test_progress_off_a_terminal_is_a_plain_line_every_few_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = _Progress(100, "send")  # a short job: nothing before the interval has passed
    for _ in range(100):
        quiet(1)
    assert capsys.readouterr().err == ""
    steady = _Progress(0, "move 1/1", interval=0)
    steady.update(5, 40, "1 failed")
    steady.update(40, 40)  # done: the command's own summary follows, not a progress line
    assert capsys.readouterr().err == "move 1/1: 5 of 40 1 failed\n"


def test_a_listing_that_stops_says_so_and_how_to_see_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    assert _shown([1, 2, 3], 3, "route jobs") == [1, 2, 3]
    assert capsys.readouterr().err == ""
    assert _shown([1, 2, 3, 4], 3, "route jobs") == [1, 2, 3]
    said = capsys.readouterr().err
    assert "only the newest 3 route jobs are shown; more match (--limit 30 shows more)" in said
    _shown([1, 2, 3], 2, "patients", "first", "--offset 2 shows the next 2")
    assert "only the first 2 patients are shown; more match (--offset 2 shows the next 2)" in capsys.readouterr().err


def test_counts_and_limits_are_whole_numbers_of_at_least_one() -> None:
    assert _positive("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
            _positive(bad)
