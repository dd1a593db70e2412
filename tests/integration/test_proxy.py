"""The anonymizing proxy between DCMTK's storescu and a real Orthanc: what arrives at Orthanc is
de-identified (dciodvfy clean, no original value left, UIDs consistent across the study and a
resend), `reidentify` gives every original back, a wrong or missing key stops the daemon, and an
instance with burned-in text is refused, never forwarded."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import free_port, need, run_cli
from tests.integration.conftest import Daemon, Orthanc, dcmtk, launch, running_peer
from tests.integration.test_acquisition import wait_for

pytestmark = pytest.mark.integration


def keygen(path: Path) -> Path:
    path.write_text(run_cli("proxy", "keygen").stdout)
    return path


def proxy_config(orthanc_port: int, key_file: Path, extra: str = "") -> str:
    return (
        f'[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nport = {orthanc_port}\n'
        f'[[proxies]]\nname = "research"\nae_title = "ANON"\nto = "orthanc"\nkey_file = "{key_file}"\n{extra}'
    )


def without_burned_in_text(tmp_path: Path, images: int = 3) -> list[Path]:
    """A generated CT study that says its pixels carry no text (as a modality's would)."""
    out = tmp_path / "sent"
    run_cli("generate", "--modality", "CT", "--series", "1", "--images", str(images), "--out", str(out),
            env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "gen")})  # fmt: skip
    files = sorted(out.rglob("*.dcm"))
    for file in files:
        ds = dcmread(file)
        ds.BurnedInAnnotation = "NO"
        ds.save_as(file)
    return files


def send_to_proxy(daemon: Daemon, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", "-aet", "MODALITY", "-aec", "ANON", "127.0.0.1", str(daemon.port), *map(str, files),
                 timeout=120)  # fmt: skip


Started = tuple[Daemon, Orthanc, Path]


@pytest.fixture
def proxy_node(tmp_path: Path, orthanc: object) -> Iterator[Callable[..., Started]]:
    """A daemon with the proxy `ANON` (more `options` of its own, more `peers`) in front of a
    real Orthanc that knows ANON: the daemon, Orthanc and the key file."""
    started: list[Daemon] = []

    def start(options: str = "", peers: str = "") -> Started:
        orthanc_port = free_port()
        pacs: Orthanc = orthanc(orthanc_port, free_port(), "ANON")  # type: ignore[operator]
        key = keygen(tmp_path / "proxy.key")
        daemon = launch(tmp_path, extra=peers + proxy_config(orthanc_port, key, options))
        started.append(daemon)
        return daemon, pacs, key

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def proxied(proxy_node: Callable[..., Started]) -> Started:
    return proxy_node('dates = "shift"\n')


def test_what_reaches_orthanc_is_de_identified_and_reidentify_gives_it_back(
    proxied: tuple[Daemon, Orthanc, Path], tmp_path: Path
) -> None:
    daemon, pacs, _ = proxied
    files = without_burned_in_text(tmp_path)
    originals = [dcmread(f) for f in files]
    assert send_to_proxy(daemon, files).returncode == 0
    wait_for(lambda: len(pacs.call("/instances")) == len(files), 60)
    identifying = set()
    for ds in originals:
        identifying |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber,
                        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.StudyDate,
                        str(ds.InstitutionName)}  # fmt: skip
    received, dumps = [], []
    for number, instance in enumerate(pacs.call("/instances")):
        path = tmp_path / f"at-orthanc-{number}.dcm"
        with urllib.request.urlopen(f"{pacs.http}/instances/{instance}/file") as response:
            path.write_bytes(response.read())
        received.append(path)
        report = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True)
        assert "Error" not in report.stdout + report.stderr, report.stderr
        dump = dcmtk("dcmdump", "+L", str(path)).stdout
        dumps.append(dump)
        assert not [value for value in identifying if value and value in dump]
    held = [dcmread(p) for p in received]
    assert len({ds.StudyInstanceUID for ds in held}) == 1
    assert all(ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
               for ds in held)  # fmt: skip
    assert "113100" in [item.CodeValue for item in held[0].DeidentificationMethodCodeSequence]
    # A resend: the same replacements, so the same instances (identical: nothing new to forward).
    assert send_to_proxy(daemon, files).returncode == 0
    assert set(daemon.rows()) == {ds.SOPInstanceUID for ds in held}
    assert daemon.metric("fabricatord_instances_stored_total", source="received", outcome="identical") == len(files)
    assert len(pacs.call("/instances")) == len(files)
    # Re-identified by the Study Instance UID the backend holds.
    study = held[0].StudyInstanceUID
    out = tmp_path / "reidentified"
    result = run_cli("reidentify", study, "--json", "--out", str(out), env={"FABRICATORD_CONFIG": str(daemon.config)})
    restored = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    names = {r["keyword"]: r["original"] for r in restored}
    # None of the values removed or replaced is anywhere in what Orthanc holds (short ones such as
    # a series number of 1 say nothing and stand in other attributes too).
    originals_text = {str(v.get("Alphabetic", v)) if isinstance(v, dict) else str(v)
                      for r in restored for v in r["original"] or []}  # fmt: skip
    assert not [text for text in originals_text if len(text) >= 6 and any(text in dump for dump in dumps)]
    assert names["PatientName"] == [{"Alphabetic": str(originals[0].PatientName)}]
    assert names["PatientID"] == [originals[0].PatientID]
    assert names["StudyInstanceUID"] == [originals[0].StudyInstanceUID]
    back = {dcmread(f).SOPInstanceUID: dcmread(f) for f in out.iterdir()}
    for ds in originals:  # every attribute as it was sent, nested ones too; none added
        again = back[ds.SOPInstanceUID]
        sent = {e.tag: str(e.value) for e in ds.iterall() if e.tag != 0x7FE00010}
        restored = {e.tag: str(e.value) for e in again.iterall() if e.tag != 0x7FE00010}
        assert restored == sent
    assert daemon.query("SELECT count(*) FROM audit_events WHERE operation = 'REIDENTIFY'")[0][0] == 1


def test_an_instance_with_burned_in_text_is_refused_and_never_forwarded(
    proxied: tuple[Daemon, Orthanc, Path], tmp_path: Path
) -> None:
    daemon, pacs, _ = proxied
    out = tmp_path / "burned"
    run_cli("generate", "--modality", "CR", "--out", str(out), env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "g")})
    files = sorted(out.rglob("*.dcm"))
    assert all(dcmread(f).BurnedInAnnotation == "YES" for f in files)
    send_to_proxy(daemon, files)
    assert daemon.rows() == {} and pacs.call("/instances") == []
    assert "burned-in annotation" in daemon.log.read_text()


@pytest.mark.parametrize("broken", ["missing", "wrong", "not a key"])
def test_a_missing_or_wrong_key_stops_the_daemon_with_a_clear_message(tmp_path: Path, broken: str) -> None:
    key = keygen(tmp_path / "proxy.key")
    first = launch(tmp_path, "first", extra=proxy_config(free_port(), key))
    first.stop()  # the database now knows the key
    if broken == "missing":
        key.unlink()
    elif broken == "wrong":
        keygen(key)
    else:
        key.write_text("hunter2\n")
    config = tmp_path / "fabricatord.toml"
    result = subprocess.run([sys.executable, "-m", "fabricatord", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "key_file" in message and str(key) in message, message


def test_burned_in_text_is_cleaned_when_the_proxy_says_clean(
    proxy_node: Callable[..., Started], tmp_path: Path
) -> None:
    daemon, pacs, _ = proxy_node('burned_in = "clean"\nkeep_original = true\n')
    out = tmp_path / "burned"
    run_cli("generate", "--modality", "CT", "--images", "2", "--series", "1", "--out", str(out),
            env={"FABRICATORD__NODE__DATA_DIR": str(tmp_path / "g")})  # fmt: skip
    files = sorted(out.rglob("*.dcm"))
    assert send_to_proxy(daemon, files).returncode == 0
    wait_for(lambda: len(pacs.call("/instances")) == len(files), 60)
    for instance in pacs.call("/instances"):
        with urllib.request.urlopen(f"{pacs.http}/instances/{instance}/file") as response:
            path = tmp_path / f"{instance}.dcm"
            path.write_bytes(response.read())
        ds = dcmread(path)
        assert ds.BurnedInAnnotation == "NO"
        assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]  # Clean Pixel Data
        pixels = ds.pixel_array
        sent = next(dcmread(f) for f in files if dcmread(f).InstanceNumber == ds.InstanceNumber).pixel_array
        text_rows = [row for row in range(pixels.shape[0] // 2) if (sent[row] != sent[0, 0]).any()]
        assert text_rows, "the image sent carried text"
        assert all((pixels[row] == pixels[0, 0]).all() for row in text_rows)  # every text row blank now
    # The originals were kept: re-identified files are the files sent, text and all.
    back = tmp_path / "back"
    run_cli("reidentify", str(ds.StudyInstanceUID), "--out", str(back), env={"FABRICATORD_CONFIG": str(daemon.config)})
    assert sorted(f.read_bytes() for f in back.iterdir()) == sorted(f.read_bytes() for f in files)


def test_a_c_find_through_the_proxy_is_answered_by_the_backend_with_de_identified_keys(
    proxied: tuple[Daemon, Orthanc, Path], tmp_path: Path
) -> None:
    daemon, pacs, _ = proxied
    files = without_burned_in_text(tmp_path, images=2)
    original = dcmread(files[0])
    assert send_to_proxy(daemon, files).returncode == 0
    wait_for(lambda: len(pacs.call("/instances")) == len(files), 60)

    def find(*keys: str) -> list[Any]:
        out = tmp_path / f"find-{len(list(tmp_path.glob('find-*')))}"
        out.mkdir()
        result = dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "ANON", "-X", "-od", str(out),
                       "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID",
                       "-k", "NumberOfStudyRelatedInstances", *[a for key in keys for a in ("-k", key)],
                       "127.0.0.1", str(daemon.port))  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]

    # By the original Patient ID, and by the original Study Instance UID: the backend's answer,
    # de-identified, as it holds the study.
    for key in (f"PatientID={original.PatientID}", f"StudyInstanceUID={original.StudyInstanceUID}"):
        answers = find(key)
        assert len(answers) == 1, key
        assert answers[0].StudyInstanceUID != original.StudyInstanceUID
        assert answers[0].PatientID != original.PatientID
        assert int(answers[0].NumberOfStudyRelatedInstances) == len(files)
    # A shifted study date, asked with the patient: found; an emptied attribute: nothing.
    assert len(find(f"PatientID={original.PatientID}", f"StudyDate={original.StudyDate}")) == 1
    assert find(f"AccessionNumber={original.AccessionNumber}") == []
    assert find("PatientID=NOBODY") == []


def test_a_c_move_through_the_proxy_is_relayed_from_the_backend_to_the_destination(
    proxy_node: Callable[..., Started], tmp_path: Path
) -> None:
    destination_port = free_port()
    destination_peer = f'[[peers]]\nname = "dest"\nae_title = "DEST"\nport = {destination_port}\n'
    daemon, pacs, _ = proxy_node(peers=destination_peer)
    # Orthanc moves to the proxy's AE title: it must know where that is.
    body = json.dumps({"AET": "ANON", "Host": "127.0.0.1", "Port": daemon.port}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{pacs.http}/modalities/anon", body, method="PUT")).close()
    files = without_burned_in_text(tmp_path, images=2)
    original = dcmread(files[0])
    assert send_to_proxy(daemon, files).returncode == 0
    wait_for(lambda: len(pacs.call("/instances")) == len(files), 60)
    received = tmp_path / "destination"
    received.mkdir()
    with running_peer(["storescp", "-aet", "DEST", "-od", str(received), str(destination_port)],
                      destination_port, "DEST"):  # fmt: skip
        moved = dcmtk("movescu", "-S", "-aet", "VIEWER", "-aec", "ANON", "-aem", "DEST",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={original.StudyInstanceUID}",
                      "127.0.0.1", str(daemon.port), timeout=120)  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    got = [dcmread(f) for f in received.iterdir()]
    assert len(got) == len(files)
    assert {ds.StudyInstanceUID for ds in got} != {original.StudyInstanceUID}  # as the backend holds it
    assert all(ds.PatientIdentityRemoved == "YES" for ds in got)
    # Orthanc did move them to the proxy first: kept as they came, not de-identified again.
    log = [json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    assert any(r.get("event") == "association established" and r.get("calling_ae") == "ORTHANC" for r in log)
    assert len(daemon.rows()) == len(files)
    assert len(pacs.call("/instances")) == len(files)  # nothing forwarded back
