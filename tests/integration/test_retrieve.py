"""C-MOVE and C-GET out of the node, by DCMTK's movescu and getscu and by pynetdicom."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import free_port, run_cli
from tests.integration.conftest import Daemon, dcmtk, running_peer

pytestmark = pytest.mark.integration


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    folder = tmp_path / "destination"
    folder.mkdir()
    port = free_port()
    with running_peer(["storescp", "+xa", "-aet", "DEST", "-od", str(folder), str(port)], port, "DEST"):
        yield port, folder


@pytest.fixture
def node(
    start_daemon: Callable[..., Daemon], destination: tuple[int, Path], tmp_path: Path
) -> tuple[Daemon, list[str]]:
    port, _ = destination
    daemon = start_daemon(
        f'\n[[peers]]\nname = "dest"\nae_title = "DEST"\nport = {port}\n'
        f'\n[[peers]]\nname = "gone"\nae_title = "GONE"\nport = {free_port()}\n'
    )
    studies = []
    for args in (["--modality", "CT", "--images", "4", "--transfer-syntax", "rle"], ["--modality", "DX"]):
        out = run_cli(
            "generate",
            "--config",
            str(daemon.config),
            *args,
            "--out",
            str(tmp_path / args[1]),
            "--send",
            f"FABRICATORD@127.0.0.1:{daemon.port}",
        ).stdout
        studies.append(re.search(r"Study Instance UID:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return daemon, studies


def test_movescu_moves_a_study_to_a_configured_peer(
    node: tuple[Daemon, list[str]], destination: tuple[int, Path]
) -> None:
    daemon, studies = node
    result = dcmtk(
        "movescu",
        "-S",
        "-aet",
        "PACS",
        "-aec",
        "FABRICATORD",
        "-aem",
        "DEST",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={studies[0]}",
        "127.0.0.1",
        str(daemon.port),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    received = [dcmread(p) for p in destination[1].iterdir()]
    assert len(received) == 4 and {ds.StudyInstanceUID for ds in received} == {studies[0]}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {"1.2.840.10008.1.2.5"}  # sent as stored
    sizes = daemon.rows()
    moved = sum(sizes[ds.SOPInstanceUID][1] for ds in received)
    assert daemon.metric("fabricatord_sent_bytes_total", peer="dest", service="C-MOVE") == moved


def test_getscu_gets_a_series_over_its_own_association(node: tuple[Daemon, list[str]], tmp_path: Path) -> None:
    daemon, studies = node
    series = dcmtk(
        "findscu",
        "-S",
        "-aec",
        "FABRICATORD",
        "-X",
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={studies[1]}",
        "-k",
        "SeriesInstanceUID",
        "127.0.0.1",
        str(daemon.port),
        timeout=60,
    )
    assert series.returncode == 0
    series_uid = dcmread(next(tmp_path.glob("rsp*.dcm"))).SeriesInstanceUID
    out = tmp_path / "got"
    out.mkdir()
    result = dcmtk(
        "getscu",
        "-S",
        "-aet",
        "VIEWER",
        "-aec",
        "FABRICATORD",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={studies[1]}",
        "-k",
        f"SeriesInstanceUID={series_uid}",
        "127.0.0.1",
        str(daemon.port),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = [dcmread(p) for p in out.iterdir()]
    assert len(got) == 2 and {ds.Modality for ds in got} == {"DX"}
    sizes = daemon.rows()
    taken = sum(sizes[ds.SOPInstanceUID][1] for ds in got)
    assert daemon.metric("fabricatord_sent_bytes_total", peer="other", service="C-GET") == taken


def _move(daemon: Daemon, destination_ae: str, identifier: Dataset) -> list[Dataset]:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

    ae = AE(ae_title="PACS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        return [
            status
            for status, _ in assoc.send_c_move(identifier, destination_ae, StudyRootQueryRetrieveInformationModelMove)
        ]
    finally:
        assoc.release()


def test_move_statuses(node: tuple[Daemon, list[str]], destination: tuple[int, Path]) -> None:
    daemon, studies = node
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = studies[1]
    unknown = _move(daemon, "NOBODY", query)
    assert unknown[-1].Status == 0xA801
    moved = _move(daemon, "DEST", query)
    assert moved[-1].Status == 0x0000 and moved[-1].NumberOfCompletedSuboperations == 2
    assert [s.NumberOfRemainingSuboperations for s in moved[:-1]] == [1, 0]
    nothing = Dataset()
    nothing.QueryRetrieveLevel = "STUDY"
    nothing.StudyInstanceUID = "1.2.3.4.5"
    empty = _move(daemon, "DEST", nothing)
    assert empty[-1].Status == 0x0000 and empty[-1].NumberOfCompletedSuboperations == 0
    bad = Dataset()
    bad.QueryRetrieveLevel = "WARD"
    assert _move(daemon, "DEST", bad)[-1].Status == 0xA900
    gone = _move(daemon, "GONE", query)[-1]  # configured but not listening: every sub-operation failed
    assert (gone.Status, gone.NumberOfFailedSuboperations, gone.NumberOfCompletedSuboperations) == (0xA702, 2, 0)
