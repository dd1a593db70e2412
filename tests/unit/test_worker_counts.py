"""The counts worker processes share through one mapped file, and the seat a parent describes."""

from __future__ import annotations

from pathlib import Path

from fabricatord.servers.listen import WorkerCounts
from fabricatord.servers.workers import Seat


def test_the_association_limit_counts_every_worker(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    WorkerCounts.create(path, 2)
    first, second = WorkerCounts(path, 0, 2), WorkerCounts(path, 1, 2)
    assert first.admit(0, 3) and first.admit(1, 3)
    assert second.admit(0, 3)
    assert not second.admit(1, 3)  # two here and one there: the daemon's three are taken
    assert not first.admit(2, 3)
    second.set("associations", 0)  # its association ended
    assert first.admit(2, 3)


def test_a_dead_workers_counts_are_cleared(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    WorkerCounts.create(path, 2)
    first, second = WorkerCounts(path, 0, 2), WorkerCounts(path, 1, 2)
    assert second.admit(0, 1)
    second.set("dicom", 5)
    first.set("dicom", 0)
    assert not first.admit(0, 1)
    assert second.busier("dicom") and not first.busier("dicom")
    WorkerCounts.clear(path, 1, 2)
    assert first.admit(0, 1)
    assert not second.busier("dicom")


def test_busier_compares_with_the_least_busy_sibling_that_listens(tmp_path: Path) -> None:
    path = tmp_path / "counts"
    WorkerCounts.create(path, 3)
    workers = [WorkerCounts(path, i, 3) for i in range(3)]
    for worker, connections in zip(workers, (2, 1, 3), strict=True):
        worker.set("mllp", connections)
    assert [w.busier("mllp") for w in workers] == [True, False, True]
    # Nobody listens for DICOM yet; then the first and the third do: the second, absent, takes none.
    assert [w.busier("dicom") for w in workers] == [False, False, False]
    workers[0].set("dicom", 1)
    workers[2].set("dicom", 0)
    assert [w.busier("dicom") for w in workers] == [True, False, False]
    WorkerCounts.clear(path, 2, 3)  # the third died: the first is alone again
    assert not workers[0].busier("dicom")


def test_a_seat_survives_the_environment(tmp_path: Path) -> None:
    seat = Seat(1, 4, 1234, tmp_path / "counts", {"dicom": 3, "mllp": 4}, 5)
    assert Seat.from_environ({"FABRICATORD_WORKER": seat.to_environ()}) == seat
    assert Seat.from_environ({}) is None
    assert not seat.first and Seat(0, 4, 1234, tmp_path, {}, 3).first
