"""Anonymizing proxies (`[[proxies]]`), as the ITH DICOM Proxy: what arrives at a proxy's AE
title is de-identified (PS3.15 Annex E, `dicom/deid.py`), stored here as any received instance
(routes see only this copy) and forwarded to the proxy's backend by a durable route job; every
attribute removed or replaced is sealed with the proxy's key (Fernet: AES with an HMAC) and kept
for `fabricatord reidentify`.

Keys: a key file holds a Fernet key (`fabricatord proxy keygen`). The first start records a
keyed hash of a fixed text for each proxy; a node that starts with another key (or none) is
refused before it accepts anything, since it could neither read nor extend the records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from pydicom import dcmread
from pydicom.dataset import Dataset

from fabricatord.config import ProxySettings, Settings
from fabricatord.db import Database
from fabricatord.db.audit import AuditLog, AuditRecord
from fabricatord.db.proxies import ProxyStore
from fabricatord.dicom.deid import CannotClean, Deidentifier, Options, clean_burned_in_text
from fabricatord.dicom.storage import InstanceWriter, WriteResult, write_durably
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

_CHECK_TEXT = b"fabricatord proxy key check"


class ProxyKeyError(Exception):
    """A proxy's key file is missing, unreadable, not a key, or not the key its records need."""


class BurnedInRefused(Exception):
    """The instance says its pixels carry text, and the proxy refuses such instances."""


def keygen() -> str:
    """A new key, for a key file."""
    return Fernet.generate_key().decode()


def read_key(where: str, path: Path) -> bytes:
    try:
        text = path.read_text().strip()
        Fernet(text)
    except OSError as exc:
        raise ProxyKeyError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ProxyKeyError(f"{where}: {path} does not hold a key (make one with fabricatord proxy keygen)") from None
    return text.encode()


@dataclass(frozen=True)
class Restored:
    """One attribute as it was before de-identification."""

    sop_instance_uid: str
    """The instance as the backend holds it (its de-identified SOP Instance UID)."""
    path: str
    keyword: str
    action: str
    original: Any


class Proxy:
    """One `[[proxies]]` entry with its key: de-identifies, seals, stores."""

    def __init__(self, settings: ProxySettings, key: bytes, store: ProxyStore, originals: Path) -> None:
        self.settings = settings
        self._fernet = Fernet(key)
        self._store = store
        self._originals = originals
        options = Options(
            retain_uids=settings.retain_uids,
            dates=settings.dates,
            retain_device_identity=settings.retain_device_identity,
            clean_descriptors=settings.clean_descriptors,
            clean_pixel_data=settings.burned_in == "clean",
        )
        self._deid = Deidentifier(hashlib.sha256(key).digest(), options)

    def query(self, identifier: Dataset, settings: Settings, timeouts: Any) -> list[Dataset] | None:
        """A Study Root C-FIND relayed to the backend with de-identified keys: its answers as it
        holds them; None when no de-identified instance could match (nothing is asked)."""
        from fabricatord.dicom import scu

        keys = self._deid.query_keys(identifier)
        if keys is None:
            return None
        return scu.find(scu.Peer.of(self._backend(settings)), self.settings.ae_title, keys, timeouts)

    def fetch(self, identifier: Dataset, settings: Settings, timeouts: Any) -> Dataset | None:
        """A C-MOVE to the proxy: the backend moves what the de-identified keys name to the
        proxy's AE title (it must know it as a modality), where it is kept as it comes; the
        keys, for the move on to the requester's destination from here. None: nothing could
        match."""
        from fabricatord.dicom import scu

        keys = self._deid.query_keys(identifier)
        if keys is None:
            return None
        report = scu.move(
            scu.Peer.of(self._backend(settings)), self.settings.ae_title, self.settings.ae_title, keys, timeouts
        )
        if report.status is None or report.outcome == "failure":
            raise scu.ScuError(f"C-MOVE answered {report.comment or report.status}")
        return keys

    def from_backend(self, calling_ae: str, address: str, settings: Settings) -> bool:
        """Whether a C-STORE to the proxy comes from its backend (a relayed move), by its AE
        title and its host: de-identified already, kept as it is and not forwarded back."""
        backend = settings.peer(self.settings.to)
        host = address.rsplit(":", 1)[0].strip("[]")
        return backend is not None and calling_ae == backend.ae_title and host == backend.host

    def _backend(self, settings: Settings) -> Any:
        backend = settings.peer(self.settings.to)
        if backend is None:
            raise ProxyKeyError(f"proxy {self.settings.name!r}: no [[peers]] entry is named {self.settings.to!r}")
        return backend

    def admits(self, calling_ae: str, settings: Settings) -> bool:
        """`calling_aes`, and the backend always (it brings what a relayed C-MOVE asked for)."""
        backend = settings.peer(self.settings.to)
        allowed = self.settings.calling_aes
        return not allowed or calling_ae in allowed or (backend is not None and calling_ae == backend.ae_title)

    def receive(self, file: Path, calling_ae: str, writer: InstanceWriter) -> WriteResult:
        """De-identify a received file, keep what it was (sealed), store the de-identified copy
        (its route jobs, the forward to the backend among them, committed with its row)."""
        ds = dcmread(file)
        # Not saying NO is not saying there is no text: only an explicit NO goes as it is.
        if str(ds.get("BurnedInAnnotation", "")).upper() != "NO" and "PixelData" in ds:
            if self.settings.burned_in != "clean":
                raise BurnedInRefused("burned-in annotation: this proxy refuses such instances")
            try:
                clean_burned_in_text(ds)
            except CannotClean as exc:
                raise BurnedInRefused(f"burned-in annotation not cleaned: {exc}") from None
        original_uid = str(ds.SOPInstanceUID)
        changes = self._deid.apply(ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        kept = ""
        if self.settings.keep_original:
            target = self._originals / f"{ds.SOPInstanceUID}.sealed"
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_suffix(".part")  # whole or not at all: a resend replaces it
            write_durably(part, [self._fernet.encrypt(file.read_bytes())])
            part.replace(target)
            kept = str(target)
        sealed = self._fernet.encrypt(
            json.dumps({"sop_instance_uid": original_uid, "changes": [asdict(c) for c in changes]}).encode()
        )
        # Sealed first: a crash before the store leaves a record nobody reads (a resend replaces
        # it); the other way round, a forwarded instance could not be re-identified.
        self._store.record(self.settings.name, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), sealed, kept)
        return writer.write(ds, "received", calling_ae, called_ae=self.settings.ae_title)

    def unseal(self, sealed: bytes) -> dict[str, Any]:
        try:
            return dict(json.loads(self._fernet.decrypt(sealed)))
        except InvalidToken:
            raise ProxyKeyError(f"proxies {self.settings.name}: the key does not open its records") from None

    def original(self, path: str) -> bytes:
        return self._fernet.decrypt(Path(path).read_bytes())


class Proxies:
    """The node's proxies, each with its key checked against the database."""

    def __init__(self, settings: Settings, database: Database) -> None:
        store = ProxyStore(database)
        self._by_ae: dict[str, Proxy] = {}
        self._by_name: dict[str, Proxy] = {}
        self._audit = AuditLog(database)
        for index, entry in enumerate(settings.proxies):
            where = f"proxies[{index}].key_file"
            key = read_key(where, entry.key_file)
            check = hmac.new(key, _CHECK_TEXT, hashlib.sha256).hexdigest()
            if not store.check(entry.name, check):
                raise ProxyKeyError(
                    f"{where}: {entry.key_file} is not the key proxy {entry.name!r} sealed its records with "
                    "(every node needs the same key file)"
                )
            proxy = Proxy(entry, key, store, settings.node.data_dir / "proxy" / entry.name / "originals")
            self._by_ae[entry.ae_title] = proxy
            self._by_name[entry.name] = proxy
        self._store = store

    def titles(self) -> frozenset[str]:
        """The AE titles of the proxies this process was started with (a SIGHUP adds none)."""
        return frozenset(self._by_ae)

    def called(self, ae_title: str) -> Proxy | None:
        return self._by_ae.get(ae_title)

    def reidentify(self, study_instance_uid: str, who: str = "") -> list[Restored] | None:
        """Every removed or replaced attribute of a study (as the backend holds it) with its
        original value; None when no proxy sealed any of it. Audited."""
        records = self._store.study(study_instance_uid)
        if not records:
            return None
        restored: list[Restored] = []
        for record in records:
            proxy = self._by_name.get(record.proxy)
            if proxy is None:
                raise ProxyKeyError(f"proxy {record.proxy!r} sealed this study and is not configured here")
            opened = proxy.unseal(record.sealed)
            for change in opened["changes"]:
                restored.append(
                    Restored(
                        record.sop_instance_uid,
                        change["path"],
                        _keyword(change["path"]),
                        change["action"],
                        change["original"].get("Value"),
                    )
                )
        self._audit.append(
            [
                AuditRecord(
                    datetime.now(UTC),
                    "REIDENTIFY",
                    status="done",
                    instances=len(records),
                    detail=f"study {study_instance_uid}: {len(restored)} attributes re-identified",
                    username=who,
                )
            ]
        )
        log.info("study re-identified", study=study_instance_uid, instances=len(records), who=who)
        return restored

    def reidentified_files(self, study_instance_uid: str, stored: dict[str, Path], out: Path) -> list[Path]:
        """Re-identified files of a study into `out`: each stored de-identified instance with its
        attributes restored, or the kept original itself (pixels too) when the proxy kept it."""
        written = []
        out.mkdir(parents=True, exist_ok=True)
        for record in self._store.study(study_instance_uid):
            proxy = self._by_name.get(record.proxy)
            if proxy is None:
                raise ProxyKeyError(f"proxy {record.proxy!r} sealed this study and is not configured here")
            opened = proxy.unseal(record.sealed)
            target = out / f"{opened['sop_instance_uid']}.dcm"
            if record.original_file:
                target.write_bytes(proxy.original(record.original_file))
            elif record.sop_instance_uid in stored:
                ds = dcmread(stored[record.sop_instance_uid])
                _restore(ds, opened["changes"])
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(target, enforce_file_format=True)
            else:
                continue
            written.append(target)
        return written


def _keyword(path: str) -> str:
    from pydicom.datadict import keyword_for_tag

    last = path.rsplit(".", 1)[-1]
    return keyword_for_tag(int(last, 16)) or last


def _restore(ds: Dataset, changes: list[dict[str, Any]]) -> None:
    """Put each removed or replaced attribute back as it was (DICOM JSON), inside sequence items
    too (`00081140[0].00081155`), and take the de-identification's own marks away."""
    for change in changes:
        *items, last = change["path"].split(".")
        target: Dataset | None = ds
        for item in items:
            tag, _, index = item.rstrip("]").partition("[")
            element = target.get(int(tag, 16)) if target is not None else None
            items = element.value if element is not None and element.VR == "SQ" else []
            target = items[int(index)] if int(index) < len(items) else None
        if target is None:
            continue
        for restored in Dataset.from_json({last: change["original"]}):
            target[restored.tag] = restored
    for marker in (
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    ):
        if marker in ds:
            del ds[marker]
