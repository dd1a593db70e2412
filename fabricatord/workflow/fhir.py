"""FHIR export: when a study is complete, a job per `[[fhir.destinations]]` entry, put in the
transaction that made it complete; a worker thread builds the study's transaction Bundle from
what is stored at that moment and POSTs it, retrying with backoff like a route job.

Complete means: MPPS COMPLETED for a study we acquire (or a modality reported to us), the end
of `generate` for a generated one, and for any study no new instance for `[fhir] stable_age`
(each arrival puts the job that long after it, in the transaction that indexes it, as Orthanc's
StableAge does; an instance arriving after the export makes the study complete again later, and
the resend updates the ImagingStudy)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from fabricatord.config import Settings
from fabricatord.config.values import parse_duration
from fabricatord.db import Database, IndexEntry, InstanceIndex
from fabricatord.db.jobs import FhirJobs, FhirRecord
from fabricatord.db.worklist import Worklist
from fabricatord.fhir import client, resources
from fabricatord.obs import metrics
from fabricatord.obs.faults import faultpoint
from fabricatord.obs.logging import get_logger
from fabricatord.workflow.routing import reschedule, send_claimed

log = get_logger(__name__)


class Exports:
    """Which studies became complete, as FHIR jobs in the caller's transaction."""

    def __init__(self, settings: Settings) -> None:
        self.reload(settings)

    def reload(self, settings: Settings) -> None:
        """New `[fhir]` (SIGHUP): studies complete from now on go to its destinations."""
        self._destinations = [d.name for d in settings.fhir.destinations]
        self._stable_age = timedelta(seconds=parse_duration(settings.fhir.stable_age))
        self._proxies = frozenset(p.ae_title for p in settings.proxies)

    def arrived(self, connection: Connection, entries: list[IndexEntry]) -> None:
        """The index's hook: each study's job put a stable age after this arrival, received or
        generated alike, so that a study whose completion never comes (a crash between the last
        store and `completed`, an MPPS never sent) is still reported. A proxy's de-identified
        copies are not ours to report."""
        if not self._destinations:
            return
        studies = {e.study_instance_uid for e in entries if e.called_ae not in self._proxies}
        if studies:
            FhirJobs.schedule(connection, studies, self._destinations, datetime.now(UTC) + self._stable_age, False)

    def completed(self, connection: Connection, study_uids: Iterable[str]) -> None:
        """These studies are complete now (MPPS COMPLETED, `generate` done): due at once."""
        if self._destinations:
            FhirJobs.schedule(connection, study_uids, self._destinations, datetime.now(UTC), True)

    def complete(self, database: Database, study_uids: Iterable[str]) -> None:
        """`completed` in a transaction of its own."""
        if self._destinations:
            with database.writer.begin() as connection:
                self.completed(connection, study_uids)


def study_bundle(settings: Settings, database: Database, study_instance_uid: str) -> dict[str, Any] | None:
    """The study's transaction Bundle as stored now; None when no such study is stored."""
    tree = InstanceIndex(database).study_tree(study_instance_uid)
    if tree is None:
        return None
    fhir = settings.fhir
    systems = resources.Systems(
        fhir.patient_id_system, fhir.accession_system, fhir.placer_system, fhir.filler_system, fhir.issuer_systems
    )
    return resources.transaction(tree, Worklist(database).order_of_study(study_instance_uid), systems)


class Exporter:
    """The worker thread that sends due FHIR jobs, one study to one destination at a time."""

    POLL = 0.5
    """Seconds between looks for due jobs (those another process made cannot wake us)."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self._settings = settings
        self._database = database
        self._jobs = FhirJobs(database, settings.node_name, timedelta(seconds=parse_duration(settings.node.lease)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        recovered = self._jobs.recover()
        if recovered:
            log.info("FHIR jobs resumed after a restart", jobs=recovered)
        self._thread = threading.Thread(target=self._run, name="fhir", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def reload(self, settings: Settings) -> None:
        """New `[[fhir.destinations]]` (SIGHUP): the next send uses them."""
        self._settings = settings

    def _run(self) -> None:
        send_claimed(self._stop, self._jobs.claim, self._send, "f", "FHIR export", lambda: self._stop.wait(self.POLL))

    def _send(self, jobs: list[FhirRecord]) -> None:
        """One study to one destination: every claimed job of the pair settles alike."""
        name, study_uid = jobs[0].destination, jobs[0].study_instance_uid
        destination = next((d for d in self._settings.fhir.destinations if d.name == name), None)
        started = time.perf_counter()
        done: list[int] = []
        retry: dict[int, tuple[datetime, str]] = {}
        failed: dict[int, str] = {}
        outcome: client.Outcome | None = None
        error = ""
        try:
            if destination is None:
                raise client.FhirError(f"no [[fhir.destinations]] entry is named {name!r}", permanent=True)
            bundle = study_bundle(self._settings, self._database, study_uid)
            if bundle is None:
                raise client.FhirError("the study is no longer stored", permanent=True)
            outcome = client.post_transaction(
                destination.url, bundle, destination.bearer_token, parse_duration(destination.timeout)
            )
            faultpoint("fhir.after_send")
            done = [job.id for job in jobs]
        except Exception as exc:  # whatever it was, the claimed jobs are settled, never left "sending"
            error = str(exc) or type(exc).__name__
            # A refusal the server would repeat, or a Bundle the validator refused (ValueError),
            # fails at once; anything else (the database, a bug) is tried again later.
            permanent = exc.permanent if isinstance(exc, client.FhirError) else isinstance(exc, ValueError)
            if not isinstance(exc, (client.FhirError, ValueError)):
                log.exception("FHIR export failed unexpectedly", destination=name, study_instance_uid=study_uid)
            for job in jobs:
                reschedule(job, error, self._settings.fhir.attempts, permanent, retry, failed)
        self._jobs.settle(done, retry, failed)
        metrics.FHIR_SEND_SECONDS.labels(name).observe(time.perf_counter() - started)
        result = "done" if done else "failed" if failed else "retry"
        metrics.FHIR_EXPORTS.labels(name, result).inc()
        (log.warning if error else log.info)(
            "study sent to FHIR" if done else "FHIR export failed",
            destination=name,
            study_instance_uid=study_uid,
            outcome=result,
            entries=outcome.statuses if outcome else None,
            error=error or None,
        )
