"""The group commit: every caller's item committed once, in shared transactions, one bad item
failing alone, and two items of one key never in one batch."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from fabricatord.db.group import LARGEST_BATCH, GroupCommit


class Recorder:
    """A commit that takes a while (so callers pile up) and remembers its batches."""

    def __init__(self, refuse: str = "", busy: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.refuse = refuse
        self.busy = busy
        self.gate = threading.Event()

    def __call__(self, items: Sequence[str]) -> list[str]:
        self.gate.wait(5)
        self.batches.append(list(items))
        if self.busy:
            raise TimeoutError("database is locked")
        if self.refuse in items:
            raise ValueError(f"{self.refuse} is bad")
        return [item.upper() for item in items]


def submit_all(group: GroupCommit[str, str], items: list[str]) -> dict[str, str | BaseException]:
    outcomes: dict[str, str | BaseException] = {}

    def one(item: str) -> None:
        try:
            outcomes[item] = group.submit(item)
        except Exception as error:
            outcomes[item] = error

    threads = [threading.Thread(target=one, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return outcomes


def test_callers_waiting_together_share_a_commit_and_each_gets_its_result() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder, key=lambda item: item)
    items = [f"item{n}" for n in range(20)]
    timer = threading.Timer(0.3, recorder.gate.set)  # the first leader waits; the rest queue up
    timer.start()
    outcomes = submit_all(group, items)
    assert outcomes == {item: item.upper() for item in items}
    assert sorted(item for batch in recorder.batches for item in batch) == sorted(items)  # each once
    assert len(recorder.batches) < len(items)  # shared commits
    assert all(len(batch) <= LARGEST_BATCH for batch in recorder.batches)


def test_a_lone_caller_leads_its_own_batch_at_once() -> None:
    recorder = Recorder()
    recorder.gate.set()
    group = GroupCommit(recorder, key=lambda item: item)
    assert group.submit("solo") == "SOLO"
    assert recorder.batches == [["solo"]]


def test_one_bad_item_fails_alone_the_others_are_committed_again_on_their_own() -> None:
    recorder = Recorder(refuse="item3")
    group = GroupCommit(recorder, key=lambda item: item)
    threading.Timer(0.3, recorder.gate.set).start()
    outcomes = submit_all(group, [f"item{n}" for n in range(8)])
    assert isinstance(outcomes.pop("item3"), ValueError)
    assert outcomes == {f"item{n}": f"ITEM{n}" for n in range(8) if n != 3}


def test_a_failure_every_item_would_meet_is_given_to_the_whole_batch_without_retries() -> None:
    recorder = Recorder(busy=True)
    group = GroupCommit(recorder, key=lambda item: item, shared_failure=lambda error: isinstance(error, TimeoutError))
    threading.Timer(0.3, recorder.gate.set).start()
    outcomes = submit_all(group, [f"item{n}" for n in range(6)])
    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes.values()) and len(outcomes) == 6
    assert sum(len(batch) for batch in recorder.batches) == 6  # none tried twice


def test_items_of_one_key_never_share_a_batch() -> None:
    recorder = Recorder()
    group: GroupCommit[str, str] = GroupCommit(recorder, key=lambda item: item.split("-")[0])
    threading.Timer(0.3, recorder.gate.set).start()
    items = [f"{key}-{n}" for key in ("a", "b") for n in range(4)]
    outcomes = submit_all(group, items)
    assert outcomes == {item: item.upper() for item in items}
    for batch in recorder.batches:
        keys = [item.split("-")[0] for item in batch]
        assert len(keys) == len(set(keys))


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_an_exit_in_the_commit_reaches_the_caller(error: type[BaseException]) -> None:
    def commit(_items: Sequence[str]) -> list[str]:
        raise error

    with pytest.raises(error):
        GroupCommit(commit, key=lambda item: item).submit("x")
