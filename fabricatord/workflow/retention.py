"""Retention and cleanup (`[dicom] retention`, `[dicom] cleanup`): a node that runs for months
looks after its disk as a PACS does, deleting whole studies rather than refusing new ones.

Two triggers: once a day (on the leader), the studies whose last instance arrived more than
`retention` ago; and when a store finds `storage_quota` or `min_free_space` reached, the oldest
eligible studies until storage is under 90 % of the quota (or the disk has a tenth more than
the watermark free), so that the instance is accepted. A study is eligible when it is older
than `retention`, no route job or acquisition of it is pending, and none of its instances was
committed to a peer (Storage Commitment) within `commitment_retention` (`InstanceIndex.
cleanup_candidates`). The storage writer deletes each one crash-safe; every deletion is audited.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from fabricatord.config import Settings
from fabricatord.config.values import parse_duration, parse_size, show_size
from fabricatord.db import Database, InstanceIndex
from fabricatord.db.audit import AuditRecord
from fabricatord.db.index import Candidate, Eligible
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

Reason = Literal["age", "quota", "free_space"]
REASONS_OF_SPACE: tuple[Reason, ...] = ("quota", "free_space")
FIRST_LOOK = 60.0
"""The first daily look waits this long after the start: the listeners come first."""
EVERY_DAY = 86400.0
QUOTA_TARGET = 0.9
"""Cleanup for the quota stops once storage is back under this share of it."""
FREE_MARGIN = 1.1
"""… and for free space once the disk has this multiple of `min_free_space` free."""


@dataclass(frozen=True)
class Removal:
    """A study cleanup deleted (or, in a dry run, would delete), and why."""

    study_instance_uid: str
    last_arrival: datetime
    instances: int
    bytes: int
    reason: Reason


class Cleaner:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        writer: InstanceWriter,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self._settings = settings
        self._index = InstanceIndex(database)
        self._writer = writer
        self._leading = leading
        """The daily look runs on the leader only; making room runs wherever a store needs it."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the daemon's parts ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cleanup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def enabled(self) -> bool:
        """Whether cleanup may delete studies now (`[dicom] cleanup`)."""
        return self._settings.dicom.cleanup

    def reload(self, settings: Settings) -> None:
        """New `retention`, `cleanup`, quota and watermark (SIGHUP) for the next look."""
        self._settings = settings

    def _run(self) -> None:
        wait = FIRST_LOOK
        while not self._stop.wait(wait):
            wait = EVERY_DAY
            if not (self._settings.dicom.cleanup and self._leading()):
                continue
            try:
                self.clean()
            except Exception as exc:  # the database away for a moment: tomorrow, then
                log.warning("cleanup failed", error=str(exc))

    def make_room(self, needed: int, reason: str, study: str = "") -> None:
        """The storage writer's hook, when `[dicom] cleanup` is on: a store of `needed` bytes
        into `study` found the quota (`reason` `quota`) or the watermark (`free_space`)
        reached. Deletes eligible studies, oldest first, never `study` itself; if none is
        eligible, the store is refused (0xA700) as without cleanup."""
        if not self._settings.dicom.cleanup or reason not in ("quota", "free_space"):
            return
        with self._lock:  # one at a time: the next store finds the room this one made
            removals = self._for_space(reason, needed, study, dry_run=False)  # type: ignore[arg-type]
        if not removals:
            log.warning("no study can be deleted to make room", reason=reason, needed=needed)

    # -- what `fabricatord cleanup` and the daily look do ----------------------------------------

    def clean(self, dry_run: bool = False) -> list[Removal]:
        """Studies past `retention`, then, if the quota or the watermark is reached, the
        oldest eligible others until there is room again; each deleted unless `dry_run`."""
        with self._lock:
            removals = self._by_age(dry_run)
            for reason in REASONS_OF_SPACE:
                removals += self._for_space(reason, 0, "", dry_run, already=removals)
        return removals

    def _cutoff(self) -> datetime | None:
        retention = parse_duration(self._settings.dicom.retention)
        return datetime.now(UTC) - timedelta(seconds=retention) if retention > 0 else None

    def _committed_since(self) -> datetime | None:
        """`[dicom] commitment_retention`: what we committed to within it is kept."""
        keep = parse_duration(self._settings.dicom.commitment_retention)
        return datetime.now(UTC) - timedelta(seconds=keep) if keep > 0 else None

    def _by_age(self, dry_run: bool) -> list[Removal]:
        cutoff = self._cutoff()
        if cutoff is None:
            return []
        return [
            removal
            for candidate in self._index.cleanup_candidates(cutoff, committed_since=self._committed_since())
            if (removal := self._remove(candidate, "age", dry_run)) is not None
        ]

    def _for_space(
        self, reason: Reason, needed: int, study: str, dry_run: bool, already: list[Removal] | None = None
    ) -> list[Removal]:
        """For `quota`: delete the oldest eligible studies until storage is under 90 % of the
        quota and `needed` bytes fit; for `free_space`: until the disk has 110 % of the
        watermark and `needed` bytes free. Nothing when the limit is not reached, or when
        `needed` alone passes the quota (no deletion would let it in)."""
        dicom = self._settings.dicom
        freed = sum(r.bytes for r in already or []) if dry_run else 0
        gone = {r.study_instance_uid for r in already or []}
        if reason == "quota":
            quota = parse_size(dicom.storage_quota)
            level = self._index.total_size() - freed  # bytes used: goes down
            if not quota or needed > quota or level + needed <= quota:
                return []
            target, sign = min(int(quota * QUOTA_TARGET), quota - needed), -1
        else:
            min_free = parse_size(dicom.min_free_space)
            level = shutil.disk_usage(self._settings.storage_dir).free + freed  # bytes free: goes up
            if not min_free or level - needed >= min_free:
                return []
            target, sign = int(min_free * FREE_MARGIN) + needed, 1
        removals: list[Removal] = []
        committed_since = self._committed_since()
        for candidate in self._index.cleanup_candidates(self._cutoff(), study, committed_since):
            if sign * (level - target) >= 0:  # used at or under the target, or free at or over it
                break
            if candidate.study_instance_uid in gone:
                continue
            removal = self._remove(candidate, reason, dry_run)
            if removal is not None:
                removals.append(removal)
                level += sign * removal.bytes
        return removals

    def _remove(self, candidate: Candidate, reason: Reason, dry_run: bool) -> Removal | None:
        """Delete one study (audited in the same transaction); None when it is no longer
        eligible (something arrived or was queued for it since it was chosen) or gone."""
        removal = Removal(
            candidate.study_instance_uid, candidate.last_arrival, candidate.instances, candidate.bytes, reason
        )
        if dry_run:
            return removal
        detail = (
            f"study {candidate.study_instance_uid} deleted by cleanup ({reason}): last instance "
            f"{candidate.last_arrival:%Y-%m-%dT%H:%M:%S}Z, {candidate.instances} instances, "
            f"{show_size(candidate.bytes)}"
        )
        record = AuditRecord(
            datetime.now(UTC),
            "CLEANUP",
            status=reason,
            instances=candidate.instances,
            bytes=candidate.bytes,
            detail=detail[:512],
        )
        eligible = Eligible(self._cutoff(), self._committed_since())
        deleted = self._writer.delete_study(candidate.study_instance_uid, eligible, record)
        if deleted is None:
            return None
        metrics.CLEANUP_STUDIES.labels(reason).inc()
        metrics.CLEANUP_BYTES.labels(reason).inc(deleted.bytes)
        log.info(
            "study deleted by cleanup",
            study=candidate.study_instance_uid,
            reason=reason,
            instances=candidate.instances,
            bytes=deleted.bytes,
        )
        return removal
