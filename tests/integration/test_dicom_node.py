"""`fabricatord serve` as a DICOM node, driven over loopback by DCMTK and pynetdicom clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import need, run_cli
from tests.integration.conftest import BOTH_BACKENDS, DCMTK_ENV, Daemon, dcmtk, generated, storescu

pytestmark = pytest.mark.integration


def test_echo_and_called_ae_check(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    echoscu = need("echoscu")
    ok = subprocess.run(
        [echoscu, "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run(
        [echoscu, "-aec", "SOMEONE_ELSE", "127.0.0.1", str(daemon.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
    assert "success" in run_cli("echo", f"FABRICATORD@127.0.0.1:{daemon.port}").stdout


@BOTH_BACKENDS
def test_storescu_stores_and_indexes_in_every_transfer_syntax(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    groups = [
        ([*generated(tmp_path, "CT", 5), *generated(tmp_path, "MR", 2, "implicit")], ()),
        (generated(tmp_path, "US", 2, "rle"), ("-xr",)),
        (generated(tmp_path, "SC", 1, "jpeg2000-lossless"), ("-xv",)),
    ]
    for files, options in groups:
        result = storescu(daemon.port, files, *options)
        assert result.returncode == 0, result.stderr
    sent = [f for files, _ in groups for f in files]
    rows = daemon.rows()
    assert len(rows) == len(sent) == 10
    assert {path for path, _ in rows.values()} == daemon.files()
    for original in sent:
        source = dcmread(original)
        path, size = rows[source.SOPInstanceUID]
        stored = dcmread(daemon.data_dir / "storage" / path)
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert stored.PixelData == source.PixelData and stored.PatientName == source.PatientName
        assert stored.preamble == bytes(128) and (daemon.data_dir / "storage" / path).stat().st_size == size
    # The same instances again: success, nothing new.
    for files, options in groups:
        assert storescu(daemon.port, files, *options).returncode == 0
    assert len(daemon.rows()) == 10
    text = daemon.metrics()
    assert 'fabricatord_dimse_operations_total{peer="other",service="C-STORE",status="success"} 20.0' in text
    assert 'fabricatord_instances_stored_total{outcome="identical",source="received"} 10.0' in text
    assert 'fabricatord_dimse_seconds_count{service="C-STORE"} 20.0' in text
    assert "fabricatord_associations_active 0.0" in text
    established = re.search(r'fabricatord_associations_total\{peer="other",result="established"\} (\S+)', text)
    released = re.search(r'fabricatord_associations_total\{peer="other",result="released"\} (\S+)', text)
    assert established and released and float(established.group(1)) == float(released.group(1)) >= 6
    received = re.search(r"^fabricatord_received_bytes_total (\S+)$", text, re.MULTILINE)
    sizes = sum(f.stat().st_size for f in sent)  # the files add preamble and file meta to each dataset
    assert received and 2 * 0.9 * sizes < float(received.group(1)) < 2 * sizes
    # The audit trail has one C-STORE event per instance sent, each with its status and bytes.
    log = daemon.stop()  # the trail's last batch is written on the way out
    assert "error" not in log.lower()
    stores = run_cli("audit", "--operation", "C-STORE", "--config", str(daemon.config)).stdout.splitlines()
    assert len(stores) == 20 and all(" 0x0000 " in line and " MODALITY " in line for line in stores)
    associations = run_cli("audit", "--operation", "ASSOCIATION", "--config", str(daemon.config)).stdout
    assert associations.count("released") == int(float(released.group(1)))


def test_a_sop_instance_uid_that_is_not_a_uid_is_refused(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    from pydicom import config
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    daemon = start_daemon()
    ds = dcmread(generated(tmp_path, "CT", 1)[0])
    # A peer's bytes are not validated on the way in; neither is what this client sends.
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    ds.SOPInstanceUID = "1.2.3.4.evil/../.."  # what a naive server would turn into a path
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xA900 and "not a UID" in status.ErrorComment
    assert daemon.rows() == {} and daemon.files() == set()
    assert list((daemon.data_dir / "tmp").iterdir()) == []
    # The node keeps serving everyone else.
    assert storescu(daemon.port, generated(tmp_path, "SC", 1)).returncode == 0


def test_a_connection_lost_during_a_store_leaves_nothing(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    daemon = start_daemon()
    ds = dcmread(generated(tmp_path, "SC", 1)[0])
    ds.Rows = ds.Columns = 10240  # 200 MiB of pixels: long enough to cut the connection mid-way
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 16, 16, 15, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    for keyword in ("PlanarConfiguration",):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = bytes(10240 * 10240 * 2)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    sender = subprocess.Popen(
        [need("storescu"), "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port), str(big)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp = daemon.data_dir / "tmp"
    deadline = time.monotonic() + 60
    while not any(tmp.iterdir()) and time.monotonic() < deadline and sender.poll() is None:
        time.sleep(0.005)
    assert any(tmp.iterdir()), "the transfer never started"
    sender.kill()  # the connection goes mid-dataset
    sender.wait()
    deadline = time.monotonic() + 10
    while any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp.iterdir()) == [] and daemon.rows() == {} and daemon.files() == set()
    assert storescu(daemon.port, generated(tmp_path, "CT", 1)).returncode == 0  # everyone else is served
    assert "partial dataset was removed" in daemon.stop()


@BOTH_BACKENDS
def test_kill_during_store_loses_nothing_acknowledged(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    files = generated(tmp_path, "CT", 3)
    crashing = start_daemon(env={"FABRICATORD_FAULTPOINT": "store.after_rename:kill"})
    result = storescu(crashing.port, files)
    assert result.returncode != 0
    crashing.process.wait(timeout=30)
    assert crashing.process.returncode == -signal.SIGKILL
    assert crashing.rows() == {}  # the kill came after the rename, before the index commit
    daemon = start_daemon()  # recovery at start settles what the kill left
    assert daemon.files() == set() and list((daemon.data_dir / "tmp").iterdir()) == []
    assert storescu(daemon.port, files).returncode == 0
    assert len(daemon.rows()) == 3 and {p for p, _ in daemon.rows().values()} == daemon.files()
    assert '"event": "fabricatord stopped"' in daemon.stop()


def test_require_known_ae_rejects_strangers(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(
        '\n[[peers]]\nname = "ct"\nae_title = "MODALITY"\nport = 104\n',
        env={"FABRICATORD__DICOM__REQUIRE_KNOWN_AE": "true"},
    )
    files = generated(tmp_path, "SC", 1)
    assert storescu(daemon.port, files).returncode == 0
    stranger = dcmtk(
        "storescu", "-aet", "STRANGER", "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port), str(files[0]), timeout=60
    )
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr


def test_storage_quota_answers_out_of_resources_and_queries_go_on(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
    )

    daemon = start_daemon(env={"FABRICATORD__DICOM__STORAGE_QUOTA": "1MiB"})
    slices = [dcmread(p) for p in generated(tmp_path, "CT", 3)]  # about 0.5 MiB each
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    try:
        statuses = [assoc.send_c_store(ds) for ds in slices]
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.SOPInstanceUID = ""
        found = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [0x0000, 0xA700, 0xA700]
    assert "quota" in statuses[1].ErrorComment
    assert [int(s.Status) for s, _ in found] == [0xFF00, 0x0000]
    assert len(daemon.rows()) == 1 and list((daemon.data_dir / "tmp").iterdir()) == []


def test_per_peer_permissions(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification  # type: ignore[attr-defined]

    daemon = start_daemon(
        '\n[[peers]]\nname = "ct"\nae_title = "MODALITY"\nport = 104\nallow_echo = false\nallow_find = false\n'
    )
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    try:
        echo = assoc.send_c_echo()
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        found = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert echo.Status == 0x0124
    assert found[0][0].Status == 0x0124 and "may not query" in found[0][0].ErrorComment
    assert storescu(daemon.port, generated(tmp_path, "SC", 1)).returncode == 0  # storing is still allowed


def test_allowed_hosts_closes_other_connections(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(dicom_extra='allowed_hosts = ["10.0.0.0/8"]\n', wait=False)
    result = dcmtk("echoscu", "-aec", "FABRICATORD", "127.0.0.1", str(daemon.port), timeout=30)
    assert result.returncode != 0
    assert "connection from a host not in allowed_hosts" in daemon.stop()


def test_idle_associations_cost_almost_no_cpu(start_daemon: Callable[..., Daemon]) -> None:
    """pynetdicom's reactors poll every millisecond; the node calms them (docs/upstream.md)."""
    from pynetdicom import AE

    daemon = start_daemon()
    ae = AE(ae_title="IDLE")
    ae.add_requested_context("1.2.840.10008.1.1")
    associations = [ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD") for _ in range(10)]
    try:
        assert all(assoc.is_established for assoc in associations)
        time.sleep(0.5)
        before = _cpu_seconds(daemon.process.pid)
        time.sleep(3)
        spent = _cpu_seconds(daemon.process.pid) - before
        assert all(assoc.send_c_echo().Status == 0 for assoc in associations)  # still answering at once
    finally:
        for assoc in associations:
            assoc.release()
    assert spent < 0.7, f"{spent:.2f} s of CPU in 3 s for 10 idle associations"  # polling: 1.4 s


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
