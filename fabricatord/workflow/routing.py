"""Routing: every instance that a `[[routes]]` rule matches is queued, in the transaction that
indexes it, for each peer the rule names; worker threads send the queue by C-STORE, one
association per study and peer, and retry with exponential backoff and jitter until the peer
answers success or the attempts run out. Delivery is at-least-once: an instance in flight when
the process died is sent again after the restart."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection

from fabricatord.config import Settings
from fabricatord.config.schema import RouteSettings
from fabricatord.config.values import parse_duration
from fabricatord.db import Database, IndexEntry, InstanceIndex
from fabricatord.db.jobs import RouteJobs, RouteRecord
from fabricatord.dicom import scu
from fabricatord.obs import metrics
from fabricatord.obs.faults import faultpoint
from fabricatord.obs.logging import get_logger, in_context

if TYPE_CHECKING:
    from fabricatord.workflow.commitment import StorageCommitment

log = get_logger(__name__)

FIRST_RETRY = timedelta(seconds=2)
LONGEST_RETRY = timedelta(minutes=5)
WORKERS = 2
"""Route workers; each holds at most one association, to one peer, for one study."""
ROUTE_WAIT = 2.0
"""How long a route keeps its Storage Commitment association open for the report on it; one
that comes later comes on a new association, which the listener takes whenever it arrives."""


PROXY_ROUTE = "proxy:"
"""The route name of a proxy's forwarding jobs: `proxy:NAME`."""


@dataclass(frozen=True)
class _Rule:
    name: str
    source: str
    modality: re.Pattern[str] | None
    calling_ae: str
    called_ae: str
    study_description: re.Pattern[str] | None
    peers: tuple[str, ...]


class Rules:
    """`[[routes]]` compiled once: which peers an indexed instance goes to."""

    def __init__(self, settings: Settings) -> None:
        self.reload(settings)

    def reload(self, settings: Settings) -> None:
        """New `[[routes]]` (SIGHUP): instances indexed from now on follow them."""
        self._our_ae = settings.node.ae_title
        self._rules = [
            _Rule(
                name=_route_name(route, index),
                source=route.match.get("source", "any"),
                modality=_pattern(route.match.get("modality"), exact=True),
                calling_ae=route.match.get("calling_ae", ""),
                called_ae=route.match.get("called_ae", ""),
                study_description=_pattern(route.match.get("study_description")),
                peers=tuple(route.to),
            )
            for index, route in enumerate(settings.routes)
        ]
        # What arrives at a proxy's AE title goes to its backend, de-identified, as a route would.
        self._rules += [
            _Rule(f"{PROXY_ROUTE}{proxy.name}", "any", None, "", proxy.ae_title, None, (proxy.to,))
            for proxy in settings.proxies
        ]

    def destinations(self, entry: IndexEntry) -> list[tuple[str, str]]:
        """(peer, route) for every rule `entry` matches, each peer once."""
        found: dict[str, str] = {}
        for rule in self._rules:
            if rule.source not in ("any", entry.source):
                continue
            if rule.modality is not None and not rule.modality.fullmatch(entry.modality):
                continue
            if rule.calling_ae and rule.calling_ae != entry.source_ae:
                continue
            if rule.called_ae and rule.called_ae != (entry.called_ae or self._our_ae):
                continue
            if rule.study_description is not None and not rule.study_description.search(entry.study_description):
                continue
            for peer in rule.peers:
                found.setdefault(peer, rule.name)
        return list(found.items())

    def enqueue(self, connection: Connection, entries: list[IndexEntry]) -> None:
        """The index's hook: route jobs in the transaction that indexes `entries`."""
        RouteJobs.enqueue(
            connection,
            [
                (entry.sop_instance_uid, entry.study_instance_uid, peer, route)
                for entry in entries
                for peer, route in self.destinations(entry)
            ],
        )


def _pattern(text: str | None, exact: bool = False) -> re.Pattern[str] | None:
    if not text:
        return None
    return re.compile(re.escape(text) if exact else text)


def _route_name(route: RouteSettings, index: int) -> str:
    """What a route's jobs carry: its name, or `route-N` for the Nth when it has none."""
    return route.name or f"route-{index}"


def _route(settings: Settings, name: str) -> RouteSettings:
    """The `[[routes]]` entry a job was queued by (for a proxy's forward, what its entry says);
    the defaults when it is no longer there."""
    if name.startswith(PROXY_ROUTE):
        proxy = next((p for p in settings.proxies if p.name == name.removeprefix(PROXY_ROUTE)), None)
        if proxy is not None:
            return RouteSettings(name=name, to=[proxy.to], allow_prod=proxy.allow_prod)
    found = (route for index, route in enumerate(settings.routes) if _route_name(route, index) == name)
    return next(found, RouteSettings())


def backoff(attempts: int) -> timedelta:
    """2 s, 4 s, 8 s … up to 5 minutes, each between half and the whole of it (jitter)."""
    delay: timedelta = min(FIRST_RETRY * 2 ** max(attempts - 1, 0), LONGEST_RETRY)
    return delay * random.uniform(0.5, 1.0)


class Router:
    """Worker threads that send due route jobs."""

    def __init__(self, settings: Settings, database: Database, commitments: StorageCommitment | None = None) -> None:
        """`commitments`: what routes with `verify = "commitment"` ask through."""
        self._settings = settings
        self._commitments = commitments
        self._jobs = RouteJobs(database, settings.node_name, timedelta(seconds=parse_duration(settings.node.lease)))
        self._index = InstanceIndex(database)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        recovered = self._jobs.recover()
        if recovered:
            log.info("route jobs resumed after a restart", jobs=recovered)
        for number in range(WORKERS):
            thread = threading.Thread(target=self._run, name=f"route-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wake(self) -> None:
        self._wake.set()

    def reload(self, settings: Settings) -> None:
        """New `[[peers]]` and `[[routes]]` (SIGHUP): the next send uses them."""
        self._settings = settings

    def _run(self) -> None:
        send_claimed(self._stop, self._jobs.claim, self._send, "r", "routing", self._idle)

    def _idle(self) -> None:
        self._wake.wait(timeout=0.25)  # jobs queued by another process cannot wake us
        self._wake.clear()

    def _send(self, jobs: list[RouteRecord]) -> None:
        peer_settings = self._settings.peer(jobs[0].peer)
        if peer_settings is None:
            self._jobs.settle([], {}, {job.id: f"no [[peers]] entry is named {jobs[0].peer!r}" for job in jobs})
            return
        peer = scu.Peer.of(peer_settings)
        stored = self._index.lookup(job.sop_instance_uid for job in jobs)
        by_path: dict[Path, RouteRecord] = {}
        failed: dict[int, str] = {}
        for job in jobs:
            instance = stored.get(job.sop_instance_uid)
            if instance is None:
                failed[job.id] = "the instance is no longer stored"
            else:
                by_path[self._settings.storage_dir / instance.path] = job
        done: list[int] = []
        retry: dict[int, tuple[datetime, str]] = {}
        route = _route(self._settings, jobs[0].route)  # one peer, one study: one route

        def later(job: RouteRecord, why: str, permanent: bool) -> None:
            reschedule(job, why, route.attempts, permanent, retry, failed)

        started = time.perf_counter()
        if by_path:
            try:
                report = scu.send(
                    peer, self._settings.node.ae_title, list(by_path), scu.Timeouts.of(self._settings.dicom)
                )
                faultpoint("route.after_send")
                metrics.SENT_BYTES.labels("route", peer.name).inc(report.bytes)
                refused = dict(report.failed)
                for path, job in by_path.items():
                    if path in refused:
                        later(job, str(refused[path]), path in report.permanent)
                    else:
                        done.append(job.id)
            except Exception as exc:  # whatever it was, the claimed jobs are settled, never left "sending"
                if not isinstance(exc, (scu.ScuError, OSError)):
                    log.exception("route send failed", peer=peer.name, error=str(exc))
                for job in by_path.values():
                    later(job, str(exc), getattr(exc, "permanent", False))
        metrics.ROUTE_SEND_SECONDS.labels(peer.name).observe(time.perf_counter() - started)
        self._jobs.settle(done, retry, failed)
        if done and route.verification == "find":
            self._verify(peer, jobs[0].study_instance_uid)
        elif done and route.verification == "commitment":
            self._commit(peer, [(job, stored[job.sop_instance_uid].sop_class_uid) for job in jobs if job.id in done])
        errors = [why for _, why in retry.values()] + list(failed.values())
        (log.warning if errors else log.info)(
            "routed",
            peer=peer.name,
            study_instance_uid=jobs[0].study_instance_uid,
            sent=len(done),
            retrying=len(retry),
            failed=len(failed),
            error=errors[0] if errors else None,
        )

    def _commit(self, peer: scu.Peer, sent: list[tuple[RouteRecord, str]]) -> None:
        """What this send delivered, asked of the peer for Storage Commitment; its report marks
        the jobs verified, or failed with the reason, whenever and wherever it arrives."""
        if self._commitments is None:
            return
        instances = [(sop_class, job.sop_instance_uid, job.id) for job, sop_class in sent]
        transaction = self._commitments.request(peer, sent[0][0].study_instance_uid, instances, ROUTE_WAIT)
        if transaction.state == "refused":
            why = f"sent; storage commitment not asked: {transaction.last_error}"
        elif transaction.state == "requested":
            why = f"sent; storage commitment asked (transaction {transaction.transaction_uid}), no report yet"
        else:
            return
        self._jobs.note([job.id for job, _ in sent], why)

    def _verify(self, peer: scu.Peer, study_instance_uid: str) -> None:
        """Once nothing of the study is left to send: the peer's own count, by C-FIND."""
        delivered = self._jobs.delivered(peer.name, study_instance_uid)
        if not delivered:
            return
        try:
            held = scu.count_study_instances(
                peer, self._settings.node.ae_title, study_instance_uid, scu.Timeouts.of(self._settings.dicom)
            )
        except (scu.ScuError, OSError) as exc:
            log.warning("route not verified", peer=peer.name, study_instance_uid=study_instance_uid, error=str(exc))
            return
        if held >= delivered:
            self._jobs.verified(peer.name, study_instance_uid)
            log.info("route verified", peer=peer.name, study_instance_uid=study_instance_uid, instances=held)
        else:
            log.warning(
                "route not verified", peer=peer.name, study_instance_uid=study_instance_uid, held=held, sent=delivered
            )


def send_claimed(
    stop: threading.Event,
    claim: Callable[[], Sequence[Claimed]],
    send: Callable[[Any], None],
    prefix: str,
    what: str,
    idle: Callable[[], object],
) -> None:
    """A sending worker thread (routes, FHIR): claim a group of jobs and send it, in a log
    context naming the jobs as `fabricatord jobs` does (`prefix` + id), until `stop`; `idle`
    when nothing is due or the database failed for a moment."""
    while not stop.is_set():
        try:
            jobs = claim()
            if jobs:
                with in_context(jobs=[f"{prefix}{job.id}" for job in jobs]):
                    send(jobs)
                continue
        except Exception as exc:  # the database went away for a moment: try again shortly
            log.error(f"{what} paused", error=str(exc))
        idle()


class Claimed(Protocol):
    """A claimed job of either sending kind (route or FHIR), as its record was read at the claim."""

    @property
    def id(self) -> int: ...
    @property
    def attempts(self) -> int: ...


def reschedule(
    job: Claimed,
    why: str,
    allowed: int,
    permanent: bool,
    retry: dict[int, tuple[datetime, str]],
    failed: dict[int, str],
) -> None:
    """A transient failure is retried with backoff until `allowed` attempts; a permanent one (the
    peer would refuse it again) goes to `failed` at once, for `jobs retry` once someone has fixed
    the cause."""
    sent = job.attempts + 1  # the record was read as it was claimed, before this attempt
    if permanent:
        failed[job.id] = f"refused for good: {why}"
    elif sent >= allowed:
        failed[job.id] = f"gave up after {sent} attempts: {why}"
    else:
        retry[job.id] = (datetime.now(UTC) + backoff(sent), why)
