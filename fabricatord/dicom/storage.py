"""Stored files: the folder layouts and the atomic writer every DICOM-writing path shares.

Write order (ROBUSTNESS.md): temporary file in `data_dir/tmp` → fsync → intent committed →
rename → fsync of the folder → index row committed (the intent retired in the same
transaction). A received file is adopted with one transaction instead: its tmp name, which
says where it goes, is the intent (see `InstanceWriter.adopt`). A reader never sees half a file
or a row without its file; a crash leaves at most a temporary file (swept at start), an intent
or an adopted tmp name that `recover` settles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Literal

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import TEXT_VR_DELIMS
from pynetdicom import AllStoragePresentationContexts

from fabricatord.config.values import is_valid_uid, show_size
from fabricatord.db import IndexEntry, InstanceIndex
from fabricatord.db.audit import AuditRecord
from fabricatord.db.group import GroupCommit
from fabricatord.db.index import Eligible, StoredInstance
from fabricatord.dicom.part10 import Part10Encoder
from fabricatord.obs import metrics
from fabricatord.obs.faults import faultpoint

Layout = Literal["study/series", "study", "patient", "patient/study/series", "date", "received-date", "flat"]
Naming = Literal["sop-uid", "instance-number", "timestamp", "sequence"]
Outcome = Literal["new", "identical", "kept", "overwritten"]
STORAGE_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)
"""Every storage SOP Class we accept and can hold (pynetdicom's list)."""
_IO_THREADS = 2
_UID_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_MAX_SUFFIX = 100_000
_MARK = "~"
"""Stands for `/` in the tmp name of an adopted file: storage paths hold no `~`."""


class InvalidInstance(ValueError):
    """The dataset cannot be stored as it is; the message names the attribute."""


class OutOfSpace(Exception):
    """Storing the instance would pass the storage quota or the free-space watermark."""

    def __init__(self, message: str, reason: str = "quota") -> None:
        super().__init__(message)
        self.reason = reason
        """`quota` or `free_space`: which limit, as cleanup names it (`names`: no free file name)."""


@dataclass(frozen=True)
class WriteResult:
    sop_instance_uid: str
    path: Path
    size: int
    outcome: Outcome


@dataclass(frozen=True)
class Deleted:
    study_instance_uid: str
    files: int
    bytes: int


@dataclass(frozen=True)
class RecoveryReport:
    temporary_files_removed: int
    orphans_removed: int
    rows_refreshed: int


def relative_path(
    ds: Dataset,
    layout: Layout,
    naming: Naming = "sop-uid",
    received: datetime | None = None,
    number: Callable[[], int] | None = None,
) -> str:
    """Where an instance lives under `storage/`, built only from validated UIDs and digits:
    the layout's folders, then the naming's file name. `received`: its arrival (now when not
    given); `number`: the next value of the file counter, for `sequence`."""
    for attribute in _UID_ATTRIBUTES:
        value = str(ds.get(attribute, ""))
        if not is_valid_uid(value):
            raise InvalidInstance(f"{attribute} {value[:80]!r} is not a valid UID")
    received = received or datetime.now().astimezone()
    folder = _folder(ds, layout, received)
    name = _file_name(ds, naming, received, number)
    return f"{folder}/{name}" if folder else name


def _folder(ds: Dataset, layout: Layout, received: datetime) -> str:
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    if layout == "flat":
        return ""
    if layout == "study":
        return study
    if layout in ("patient", "patient/study/series"):
        key = f"{ds.get('PatientID', '')}\\{ds.get('IssuerOfPatientID', '')}".encode()
        # A digest names the patient's folder: Patient IDs are free text a peer chose.
        return f"P{hashlib.sha256(key).hexdigest()[:16]}/{study}/{series}"
    if layout == "date":
        date = str(ds.get("StudyDate", ""))
        day = f"{date[:4]}/{date[4:6]}/{date[6:8]}" if len(date) == 8 and date.isdigit() else "undated"
        return f"{day}/{study}/{series}"
    if layout == "received-date":
        return f"{received:%Y/%m/%d}/{study}/{series}"
    return f"{study}/{series}"


def _file_name(ds: Dataset, naming: Naming, received: datetime, number: Callable[[], int] | None) -> str:
    if naming == "instance-number":
        value = _integer(str(ds.get("InstanceNumber", "") or "").strip())
        if value is not None and value >= 0:  # digits only; none: the SOP Instance UID
            return f"{value}.dcm"
    elif naming == "timestamp":
        return f"{received:%Y%m%d%H%M%S%f}.dcm"
    elif naming == "sequence" and number is not None:
        return f"{number():08d}.dcm"
    return f"{ds.SOPInstanceUID}.dcm"


def suffixed(relative: str, attempt: int) -> str:
    """The `attempt`-th name for a file whose name is taken in its folder: `1.dcm`, `1-2.dcm`, …"""
    if attempt <= 1:
        return relative
    stem = relative.removesuffix(".dcm")
    return f"{stem}-{attempt}.dcm"


_INDEXED_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
)
INDEXED_TAGS = frozenset(int(tag_for_keyword(keyword) or 0) for keyword in _INDEXED_KEYWORDS)
"""What `index_entry` and `relative_path` read of an instance (and the character set they are in)."""


def index_entry(ds: Dataset, path: str, size: int, digest: str, source: str, source_ae: str) -> IndexEntry:
    text = _Header(ds)
    return IndexEntry(
        patient_id=text("PatientID", 64),
        issuer=text("IssuerOfPatientID", 64),
        patient_name=text("PatientName", 324),
        birth_date=text("PatientBirthDate", 8),
        sex=text("PatientSex", 1),
        study_instance_uid=ds.StudyInstanceUID,
        study_date=text("StudyDate", 8),
        study_time=text("StudyTime", 16),
        accession_number=text("AccessionNumber", 16),
        study_id=text("StudyID", 16),
        study_description=text("StudyDescription", 64),
        referring_physician_name=text("ReferringPhysicianName", 324),
        series_instance_uid=ds.SeriesInstanceUID,
        modality=text("Modality", 16),
        series_number=_integer(text("SeriesNumber", 12)),
        series_description=text("SeriesDescription", 64),
        body_part_examined=text("BodyPartExamined", 16),
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        instance_number=_integer(text("InstanceNumber", 12)),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        size=size,
        digest=digest,
        source=source,
        source_ae=source_ae[:16],
    )


_CHARACTER_SET_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
_DELIMITERS = {
    "PN": TEXT_VR_DELIMS | {0x5C, 0x5E, 0x3D},  # values, components, groups
    "LO": TEXT_VR_DELIMS | {0x5C},
    "SH": TEXT_VR_DELIMS | {0x5C},
}


class _Header:
    """An element's value as index text, decoded from the bytes the walk kept: pydicom's
    conversion (validation, value objects) cost more than the rest of indexing a C-STORE. What
    pydicom already converted is read as it is."""

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds
        self._encodings: list[str] | None = None

    def __call__(self, keyword: str, limit: int) -> str:
        tag = _TAG_OF[keyword]
        element = self._ds.get_item(tag)
        if element is None:
            return ""
        if not isinstance(element, RawDataElement):
            value = element.value
            return "" if value is None else str(value)[:limit]
        raw = element.value or b""
        vr = element.VR or dictionary_VR(tag)
        if vr in _CHARACTER_SET_VRS:
            if self._encodings is None:
                self._encodings = convert_encodings(self._ds.get("SpecificCharacterSet") or "ISO_IR 6")
            text = decode_bytes(raw, self._encodings, _DELIMITERS.get(vr, TEXT_VR_DELIMS)).rstrip(" \x00")
        else:
            text = raw.decode("ascii", "replace").strip(" \x00")
        return text[:limit]


_TAG_OF = {keyword: int(tag_for_keyword(keyword) or 0) for keyword in _INDEXED_KEYWORDS}


def _integer(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Encoded:
    """An instance ready to write: its file in chunks, and its index entry with size and digest."""

    parts: list[bytes]
    entry: IndexEntry


@dataclass
class _Adoption:
    """A received file on its way into storage: linked at `final` once `placed`."""

    entry: IndexEntry
    marker: Path
    final: Path
    placed: bool = False
    folders: list[Path] = field(default_factory=list)
    """What a link into `final`'s folder needs durable, deepest first."""


@dataclass
class _Pending:
    """A staged instance: its file is durable in tmp; only its index entry is kept in memory."""

    entry: IndexEntry
    tmp: Path
    outcome: Outcome = "new"

    @property
    def uid(self) -> str:
        return self.entry.sop_instance_uid

    @property
    def relative(self) -> str:
        return self.entry.path


class InstanceWriter:
    """Writes instances durably into `storage_dir` and indexes them; thread-safe."""

    def __init__(
        self,
        index: InstanceIndex,
        storage_dir: Path,
        tmp_dir: Path,
        layout: Layout = "study/series",
        duplicates: Literal["keep", "overwrite"] = "keep",
        quota_bytes: int = 0,
        min_free_bytes: int = 0,
        naming: Naming = "sop-uid",
        recount_every: float = 0.0,
    ) -> None:
        """`recount_every`: on a database other processes also store into (worker processes,
        other nodes), the quota's count of bytes is read again from the index when older."""
        self._index = index
        self._recount_every = recount_every
        self._counted_at = 0.0
        self._naming = naming
        self.reclaim: Callable[[int, str, str], None] | None = None
        """With `[dicom] cleanup`: called with the bytes an instance needs, why there is no room
        (`quota`, `free_space`) and the instance's study (never deleted for it), to delete
        studies until there is; the check is then made again."""
        self.cleanup_on: Callable[[], bool] = lambda: False
        """Whether `reclaim` deletes anything now (`[dicom] cleanup`, which a SIGHUP may change)."""
        self._storage = storage_dir
        self._tmp = tmp_dir
        self._layout = layout
        self._duplicates = duplicates
        # Held from the duplicate look-up to the commit, so two writers of one SOP Instance UID
        # cannot both decide it is new; the slow part (encode, write, fsync) runs outside it.
        self._commit_lock = threading.Lock()
        self._known_dirs: set[Path] = set()
        """Folders under storage whose entries are durable: a link into one needs its fsync only."""
        self._adoptions = GroupCommit(self._adopt_batch, key=lambda adoption: adoption.entry.sop_instance_uid)
        self._local = threading.local()
        self._io = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="storage-io")
        self._quota = quota_bytes
        self._min_free = min_free_bytes
        self._used: int | None = None
        """Bytes the index says storage holds; read once, then kept up to date by our commits."""
        self._storage.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def write(self, ds: Dataset, source: str, source_ae: str = "", called_ae: str = "") -> WriteResult:
        return next(self.write_many([ds], source, source_ae, called_ae=called_ae))

    def adopt(self, file: Path, ds: Dataset, source: str, source_ae: str = "") -> WriteResult:
        """Store a complete Part 10 file already in `tmp_dir` (a received instance as it arrived)
        by linking rather than copying it; `ds` is its header, read to name and index it.

        Order: rename within tmp to a name that says where the file goes → link into storage
        (unless a file is there) → fsync of the file → with whatever else is waiting
        (`GroupCommit`): fsync of their folders, rows committed → the tmp name removed. The
        file's fsync commits the links with it on a journalling file system, so the folders'
        fsyncs find little left to do.
        After a crash, a tmp name that still shares its file with a storage path tells `recover`
        which file to check against the index.
        """
        try:
            relative = self._relative(ds)
        except InvalidInstance:
            metrics.STORAGE_WRITE_FAILURES.labels("invalid").inc()
            raise
        size = file.stat().st_size
        self._check_space(size, study=str(ds.StudyInstanceUID))
        # No digest yet: reading the file back to hash it would cost more than the rest of the
        # write; a duplicate, the only reader of digests, hashes both files when it comes.
        entry = index_entry(ds, relative, size, "", source, source_ae)
        marker = self._marker(relative)
        os.replace(file, marker)
        adoption = _Adoption(entry, marker, self._storage / relative)
        try:
            with metrics.STORAGE_WRITE_SECONDS.time():
                self._place(adoption)
            existing = self._adoptions.submit(adoption)
            if existing is None:
                faultpoint("store.after_commit")
                metrics.INSTANCES_STORED.labels(source, "new").inc()
                metrics.STORED_BYTES.inc(size)
                return WriteResult(entry.sop_instance_uid, adoption.final, size, "new")
            self._unplace(adoption)
            # Known already: identical, kept or overwritten, as the batch path decides.
            entry = replace(adoption.entry, digest=_digest(adoption.marker))
            return next(self._commit([_Pending(entry, adoption.marker)], source))
        except BaseException:
            self._unplace(adoption)  # nothing of it was committed
            raise
        finally:
            adoption.marker.unlink(missing_ok=True)

    def _relative(self, ds: Dataset) -> str:
        return relative_path(ds, self._layout, self._naming, number=self._index.next_file_number)

    def _marker(self, relative: str) -> Path:
        """The tmp name of an adopted file says where it goes: `recover` reads it after a crash."""
        return self._tmp / f"{_MARK}{relative.replace('/', _MARK)}.{os.getpid()}.{threading.get_ident()}.part"

    def _place(self, adoption: _Adoption) -> None:
        """Link the file at its storage path and make the file durable; its folders are made
        durable by the commit. Named by SOP Instance UID, a file already there is this
        instance's (known: the commit says so; unknown: a crash's, which the commit replaces).
        Named otherwise, a taken name is another instance's: the next free `-2`, `-3`, … ."""
        adoption.folders = self._make_dirs(adoption.final.parent)
        base = adoption.entry.path
        for attempt in range(1, _MAX_SUFFIX):
            if attempt > 1:
                relative = suffixed(base, attempt)
                marker = self._marker(relative)
                os.replace(adoption.marker, marker)
                adoption.marker, adoption.final = marker, self._storage / relative
                adoption.entry = replace(adoption.entry, path=relative)
            try:
                self._link(adoption.marker, adoption.final)
                adoption.placed = True
                break
            except FileExistsError:
                adoption.placed = False
                if self._naming == "sop-uid" and not self._held_by_another(adoption):
                    break
        else:
            metrics.STORAGE_WRITE_FAILURES.labels("names").inc()
            raise OutOfSpace(f"no free name for {base} in its folder", "names")
        _fsync(adoption.marker)
        faultpoint("store.after_tmp_write")

    def _held_by_another(self, adoption: _Adoption) -> bool:
        """Whether the file at a received instance's path is another indexed instance's (a
        name a `file_naming` in force before gave), not this one's or a crash's leftover."""
        relative = adoption.entry.path
        if not self._index.path_indexed(relative):
            return False
        known = self._index.lookup([adoption.entry.sop_instance_uid]).get(adoption.entry.sop_instance_uid)
        return known is None or known.path != relative

    def _link(self, source: Path, target: Path) -> None:
        """os.link, again after making the folders when another process removed one this
        writer thought was there (a deletion leaves no empty folder behind)."""
        try:
            os.link(source, target)
        except FileNotFoundError:
            self._forget_dirs(target.parent)
            self._make_dirs(target.parent)
            os.link(source, target)

    def _forget_dirs(self, folder: Path) -> None:
        while folder != self._storage and self._storage in folder.parents:
            self._known_dirs.discard(folder)
            folder = folder.parent

    def _free_name(self, relative: str, taken: set[str]) -> str:
        """The first of `relative`, `-2`, `-3`, … that no file in storage and no other
        instance of this batch holds."""
        for attempt in range(1, _MAX_SUFFIX):
            candidate = suffixed(relative, attempt)
            if candidate not in taken and not (self._storage / candidate).exists():
                return candidate
        metrics.STORAGE_WRITE_FAILURES.labels("names").inc()
        raise OutOfSpace(f"no free name for {relative} in its folder", "names")

    def _make_dirs(self, folder: Path) -> list[Path]:
        """Create `folder` and what it lacks; the folders whose entries a link into it needs
        durable, deepest first (none once it is known: an earlier write made them durable)."""
        if folder in self._known_dirs:
            return [folder]
        chain = []
        probe = folder
        while probe not in self._known_dirs and probe != self._storage:
            chain.append(probe)
            probe = probe.parent
        for created in reversed(chain):
            created.mkdir(exist_ok=True)
        return [folder, *(entry.parent for entry in chain)]

    def _adopt_batch(self, adoptions: Sequence[_Adoption]) -> list[StoredInstance | None]:
        """The group commit of received instances: one transaction for every waiting one."""

        def place(position: int) -> None:
            adoption = adoptions[position]
            if not adoption.placed:  # a file the index does not know holds the path: ours wins
                adoption.final.unlink(missing_ok=True)
                os.link(adoption.marker, adoption.final)
                _fsync_dir(adoption.final.parent)
                adoption.placed = True

        # Each folder once for the batch, deepest first: concurrent stores of new studies all add
        # to storage/ itself, and each fsync of it would be a journal commit of its own.
        folders = {folder for adoption in adoptions for folder in adoption.folders}
        for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
            _fsync_dir(folder)
        self._known_dirs.update(folder for folder in folders if folder != self._storage)
        faultpoint("store.after_rename")
        with self._commit_lock:
            found = self._index.insert_unless_known([adoption.entry for adoption in adoptions], place)
            if self._used is not None:
                self._used += sum(a.entry.size for a, known in zip(adoptions, found, strict=True) if known is None)
        return found

    def _unplace(self, adoption: _Adoption) -> None:
        """Take back a link the index does not hold (a duplicate's, or one whose commit failed)."""
        if not adoption.placed:
            return
        adoption.placed = False
        with suppress(FileNotFoundError):
            if adoption.final.samefile(adoption.marker):
                adoption.final.unlink()
                _fsync_dir(adoption.final.parent)

    def prepare(self, ds: Dataset, source: str, source_ae: str = "", called_ae: str = "") -> Encoded:
        """Validate and encode `ds`; thread-safe, so a producer thread can do it ahead of the writes."""
        encoder = getattr(self._local, "encoder", None)
        if encoder is None:
            encoder = self._local.encoder = Part10Encoder()
        try:
            relative = self._relative(ds)
            parts = encoder.encode_parts(ds)
        except InvalidInstance:
            metrics.STORAGE_WRITE_FAILURES.labels("invalid").inc()
            raise
        except Exception as exc:
            metrics.STORAGE_WRITE_FAILURES.labels("encode").inc()
            raise InvalidInstance(f"cannot encode the dataset: {exc}") from exc
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        size = sum(len(part) for part in parts)
        entry = index_entry(ds, relative, size, digest.hexdigest(), source, source_ae)
        return Encoded(parts, replace(entry, called_ae=called_ae) if called_ae else entry)

    def write_many(
        self,
        items: Iterable[Dataset | Encoded],
        source: str,
        source_ae: str = "",
        batch: int = 64,
        called_ae: str = "",
    ) -> Iterator[WriteResult]:
        """Store datasets (or instances `prepare` encoded) in batches that share one intent commit
        and one index commit. A batch holds index entries, not files: memory stays flat."""
        iterator = iter(items)
        while True:
            pending: list[_Pending] = []
            in_flight: deque[Future[_Pending]] = deque()
            try:
                # Temporary files are written two at a time: copying into the page cache and
                # fsync run in the kernel without the GIL, so a second writer uses the second core.
                for item in islice(iterator, batch):
                    encoded = item if isinstance(item, Encoded) else self.prepare(item, source, source_ae, called_ae)
                    in_flight.append(self._io.submit(self._stage, encoded))
                    if len(in_flight) >= _IO_THREADS:
                        pending.append(in_flight.popleft().result())
                while in_flight:
                    pending.append(in_flight.popleft().result())
                if not pending:
                    return
                yield from self._commit(pending, source)
            finally:
                for future in in_flight:
                    with suppress(Exception):
                        pending.append(future.result())
                for staged in pending:
                    staged.tmp.unlink(missing_ok=True)

    def has_room(self) -> bool:
        """Whether an instance could be stored now, space-wise (for /readyz): free space above
        the watermark, and the quota not reached; with cleanup on, the next store makes room."""
        if self.reclaim is not None and self.cleanup_on():
            return True
        try:
            self._check_space(1, count=False)
        except OutOfSpace:
            return False
        return True

    def _check_space(self, size: int, count: bool = True, study: str = "") -> None:
        cleaning = count and self.reclaim is not None and self.cleanup_on()
        try:
            self._room_for(size, count and not cleaning)
        except OutOfSpace as full:
            if not cleaning or self.reclaim is None:
                raise  # without cleanup, a full store is refused without counting the index again
            self.reclaim(size, full.reason, study)
            self._used = None  # what cleanup (here or in another process) freed is counted again
            self._room_for(size, True)

    def _room_for(self, size: int, count: bool) -> None:
        if self._min_free:
            free = shutil.disk_usage(self._tmp).free
            if free - size < self._min_free:
                if count:
                    metrics.STORAGE_WRITE_FAILURES.labels("disk_full").inc()
                # Short enough for an Error Comment (64 characters).
                raise OutOfSpace(
                    f"free space {show_size(free)} is at the {show_size(self._min_free)} watermark", "free_space"
                )
        if self._quota:
            with self._commit_lock:
                stale = self._recount_every and time.monotonic() - self._counted_at > self._recount_every
                if self._used is None or stale:
                    self._used = self._index.total_size()
                    self._counted_at = time.monotonic()
                used = self._used
            if used + size > self._quota:
                if count:
                    metrics.STORAGE_WRITE_FAILURES.labels("quota").inc()
                raise OutOfSpace(
                    f"storage quota reached: {show_size(used)} of {show_size(self._quota)} used; "
                    f"needs {show_size(size)}",
                    "quota",
                )

    def _stage(self, encoded: Encoded) -> _Pending:
        self._check_space(encoded.entry.size, study=encoded.entry.study_instance_uid)
        with metrics.STORAGE_WRITE_SECONDS.time():
            uid = encoded.entry.sop_instance_uid
            tmp = self._tmp / f"{uid}.{os.getpid()}.{threading.get_ident()}.part"
            write_durably(tmp, encoded.parts)
            faultpoint("store.after_tmp_write")
            return _Pending(encoded.entry, tmp)

    def _commit(self, pending: list[_Pending], source: str) -> Iterator[WriteResult]:
        with self._commit_lock:
            known = self._index.lookup(p.uid for p in pending)
            moving = []
            for item in pending:
                existing = known.get(item.uid)
                if existing is None:
                    moving.append(item)
                elif (existing.digest or _digest(self._storage / existing.path)) == item.entry.digest:
                    item.outcome = "identical"
                    item.entry = replace(item.entry, path=existing.path)
                elif self._duplicates == "keep":
                    item.outcome = "kept"
                    item.entry = replace(item.entry, path=existing.path)
                else:
                    # Replaced where it lies: layout and naming are for new files.
                    item.outcome = "overwritten"
                    item.entry = replace(item.entry, path=existing.path)
                    moving.append(item)
            # Named by SOP Instance UID, a new file replaces what a crash may have left at its
            # path. Named otherwise, a name is free or another instance's: linked, never replaced.
            linked = self._naming != "sop-uid"
            taken: set[str] = set()
            bases = {item.uid: item.relative for item in moving}
            for item in moving:
                if linked and item.outcome == "new":
                    item.entry = replace(item.entry, path=self._free_name(bases[item.uid], taken))
                    taken.add(item.relative)
            intents = self._index.add_intents((p.uid, p.relative) for p in moving) if moving else []
            faultpoint("store.after_intent")
            folders = set()
            for item in moving:
                final = self._storage / item.relative
                folders.update(self._make_dirs(final.parent))
                if not (linked and item.outcome == "new"):
                    try:
                        os.replace(item.tmp, final)
                    except FileNotFoundError:  # its folder was removed by a deletion elsewhere
                        self._forget_dirs(final.parent)
                        folders.update(self._make_dirs(final.parent))
                        os.replace(item.tmp, final)
                    continue
                while True:
                    try:
                        self._link(item.tmp, final)
                        break
                    except FileExistsError:  # a received file took the name a moment ago
                        item.entry = replace(item.entry, path=self._free_name(bases[item.uid], taken))
                        taken.add(item.relative)
                        intents += self._index.add_intents([(item.uid, item.relative)])
                        final = self._storage / item.relative
                item.tmp.unlink()
            for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
                _fsync_dir(folder)
            self._known_dirs.update(folder for folder in folders if folder != self._storage)
            faultpoint("store.after_rename")
            if moving:
                self._index.commit([p.entry for p in moving], intents)
                if self._used is not None:
                    self._used += sum(
                        p.entry.size - known[p.uid].size if p.uid in known else p.entry.size for p in moving
                    )
            faultpoint("store.after_commit")
        for item in pending:
            metrics.INSTANCES_STORED.labels(source, item.outcome).inc()
            if item.outcome in ("new", "overwritten"):
                metrics.STORED_BYTES.inc(item.entry.size)
            yield WriteResult(item.uid, self._storage / item.relative, item.entry.size, item.outcome)

    def delete_study(
        self, study_instance_uid: str, eligible: Eligible | None = None, audit: AuditRecord | None = None
    ) -> Deleted | None:
        """Remove a stored study, crash-safe: its rows go in one transaction with a delete
        intent per file, then the files and the folders they leave empty, then the intents;
        `recover` finishes what a crash interrupted. None when no such study (or one no longer
        `eligible` for cleanup); `audit` is committed with the rows. The writer
        forgets the folders and the bytes it counted, so a study stored there again gets its
        folders made durable and the quota stays true."""
        with self._commit_lock:
            forgotten = self._index.forget_study(study_instance_uid, eligible, audit)
            if forgotten is None:
                return None
            faultpoint("delete.after_commit")
            removed = 0
            folders: set[Path] = set()
            given_again = self._index.indexed_paths(forgotten.paths)  # stored again since, elsewhere
            for relative in forgotten.paths:
                path = self._storage / relative
                folders.add(path.parent)
                if relative in given_again:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
            for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
                current = folder
                while current != self._storage and self._storage in current.parents:
                    try:
                        current.rmdir()
                    except OSError:  # not empty: other studies live there
                        break
                    self._known_dirs.discard(current)
                    current = current.parent
            self._index.settle_intents(forgotten.intents)
            self._used = None  # counted again from the index at the next store
            return Deleted(study_instance_uid, removed, forgotten.bytes)

    def recover(self) -> RecoveryReport:
        """After a crash: remove temporary files and settle every intent left behind."""
        removed = orphans = refreshed = 0
        for leftover in self._tmp.iterdir():
            if not leftover.is_file():
                continue
            if _MARK in leftover.name:  # an adopted file: linked into storage, maybe not indexed
                # Less pid, thread and .part; a leading mark (even a `flat` file's name has one).
                relative = leftover.name.rsplit(".", 3)[0].removeprefix(_MARK).replace(_MARK, "/")
                final = self._storage / relative
                if final.exists() and final.samefile(leftover) and not self._index.path_indexed(relative):
                    final.unlink()
                    orphans += 1
            leftover.unlink()
            removed += 1
        for intent in self._index.intents():
            final = self._storage / intent.path
            if self._index.is_indexed(intent.sop_instance_uid, intent.path):
                # An overwrite that crashed after its rename: the row must describe the new file.
                data = final.read_bytes() if final.exists() else None
                size = len(data) if data is not None else None
                digest = hashlib.sha256(data).hexdigest() if data is not None else None
                self._index.settle_intent(intent, size, digest)
                refreshed += data is not None
            else:
                # A write that never committed, or a deletion that did: the file goes, unless
                # another instance has been indexed at its path since (a name given again).
                if final.exists() and not self._index.path_indexed(intent.path):
                    final.unlink()
                    orphans += 1
                self._index.settle_intent(intent, None, None)
        return RecoveryReport(removed, orphans, refreshed)


def _fsync(file: Path) -> int:
    """Make a file another writer made durable; its size."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _digest(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_durably(path: Path, parts: list[bytes]) -> int:
    """Write `parts` to a new file at `path` and fsync it; returns the size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        size = _write_all(fd, parts)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_all(fd: int, parts: list[bytes]) -> int:
    views = [memoryview(p) for p in parts if p]
    total = sum(len(v) for v in views)
    while views:
        written = os.writev(fd, views[:1024])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
    return total


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
