"""The `fabricatord` command: each sub-command is a thin shell over the layers below."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from fabricatord import __version__
from fabricatord.config import ConfigError, Settings, locate
from fabricatord.config import load as load_config
from fabricatord.config.tls import client_context, enabled
from fabricatord.config.values import show_size

EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
ROLE_NAMES = ("admin", "test_write", "test_read", "prod_write", "prod_read")
"""As `fabricatord.workflow.access.ROLES`: the parser is built without importing argon2."""


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _settings(args: argparse.Namespace) -> Settings:
    from fabricatord.hl7.mapping import profile_problems
    from fabricatord.synth.checks import settings_problems

    located = locate(args.config, os.environ, Path.cwd())
    if not args.config:
        print(f"fabricatord: {located.describe()}", file=sys.stderr, flush=True)
    settings = load_config(located.path, checks=[settings_problems, profile_problems])
    if enabled(settings.tls):  # `send`, `find`, `move`… reach `tls = true` peers with it
        from fabricatord.dicom import scu

        scu.use_tls(client_context(settings.tls))
    return settings


def _logging(settings: Settings) -> None:
    from fabricatord.obs.logging import configure

    configure(settings.log.level, settings.log.format, settings.log.phi, settings.node_name)


def _database(settings: Settings) -> Any:
    from fabricatord.db import open_database

    return open_database(settings.database_url)


def _print(*parts: object) -> None:
    print(*parts, flush=True)


class _Progress:
    """Progress of long work on stderr: on a terminal a one-line bar, redrawn; elsewhere (a log,
    a pipe) a plain line every `interval` seconds, so that a long run shows it moves and a short
    one prints nothing. Work smaller than `minimum` steps draws no bar."""

    def __init__(self, total: int, label: str, minimum: int = 20, interval: float = 5.0) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.terminal = sys.stderr.isatty()
        self.minimum = minimum
        self.interval = interval
        self._last = time.monotonic()
        self._drawn = False

    def __call__(self, step: int) -> None:
        self.update(self.done + step)

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """`done` of `total` (when it became known or changed), with a few words after the count."""
        self.done = done
        if total is not None:
            self.total = total
        finished = self.done >= self.total > 0
        if self.terminal:
            if self.total >= self.minimum and (finished or self.done % 5 == 0 or note):
                width = 30
                filled = width * min(self.done, self.total) // max(self.total, 1)
                bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
                sys.stderr.write(f"\r\033[K{self.label} {bar} {note}".rstrip())
                self._drawn = True
                if finished:
                    self.end()
                sys.stderr.flush()
        elif time.monotonic() - self._last >= self.interval and not finished:
            self._last = time.monotonic()
            print(f"{self.label}: {self.done} of {self.total or '?'} {note}".rstrip(), file=sys.stderr, flush=True)

    def end(self) -> None:
        """Leave the bar's line, so that what follows starts on a line of its own."""
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


# -- check-config ---------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    origin = settings.source or "built-in defaults"
    _print(f"{origin}: OK ({len(settings.peers)} peers, {len(settings.routes)} routes)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """What `serve` does at start, in the foreground and with the whole error if it fails."""
    from fabricatord.db import open_database
    from fabricatord.db.engine import revisions

    settings = _settings(args)
    before, head = revisions(settings.database_url)
    if before == head:
        _print(f"database schema at revision {head}: nothing to do")
        return 0
    open_database(settings.database_url)
    _print(f"database schema migrated from revision {before or 'none'} to {head}")
    return 0


# -- serve ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from fabricatord.service import run

    settings = _settings(args)
    _logging(settings)
    return run(settings)


# -- generate -------------------------------------------------------------------------------


def _peer(settings: Settings, text: str, verb: str = "", prod: bool = False) -> Any:
    """A peer named on the command line; with `verb`, one that a production peer must not be
    unless the user said `--prod`."""
    from fabricatord.workflow import remote

    try:
        peer = remote.resolve(settings, text)
        if verb:
            remote.guard(settings, peer, verb, prod)
    except remote.UnknownPeer as exc:
        raise CliError(str(exc), EX_USAGE) from None
    except remote.ProdRefused as exc:
        raise CliError(str(exc), EX_NOPERM) from None
    return peer


def _timeouts(settings: Settings) -> Any:
    from fabricatord.dicom.scu import Timeouts

    return Timeouts.of(settings.dicom)


def cmd_generate(args: argparse.Namespace) -> int:
    from fabricatord.dicom.storage import OutOfSpace
    from fabricatord.service import storage_writer, with_cleanup
    from fabricatord.synth.templates import TEMPLATES
    from fabricatord.workflow.fhir import Exports
    from fabricatord.workflow.generation import GenerateOptions, StudyGenerator

    settings = _settings(args)
    _logging(settings)
    peer = _peer(settings, args.send, "send to", args.prod) if args.send else None
    database = _database(settings)
    writer = None if args.out else storage_writer(settings, database)
    if writer is not None:
        with_cleanup(settings, database, writer)
        _recover_unless_served(settings, writer)
    generator = StudyGenerator(settings, database, writer)
    options = GenerateOptions(
        modality=args.modality,
        series=args.series,
        images=args.images,
        rows=args.rows,
        columns=args.columns,
        study_description=args.description,
        patient_id=args.patient_id,
        accession_number=args.accession,
        transfer_syntax=args.transfer_syntax,
        out_dir=Path(args.out) if args.out else None,
    )
    template = TEMPLATES[args.modality.upper()]
    override = settings.modality(args.modality)
    total = (args.series or override.series or template.series) * (args.images or override.images or template.images)
    for number in range(args.count):
        try:
            study = generator.generate(options, _Progress(total, f"{args.modality.upper()} {number + 1}/{args.count}"))
        except OutOfSpace as exc:
            raise CliError(f"not stored: {exc}", EX_CANTCREAT) from exc
        if writer is not None:  # a generated study is complete: its FHIR jobs are due
            Exports(settings).complete(database, [study.study_instance_uid])
        name = study.patient.name.replace("^", " ").strip()
        _print(f"Study Instance UID: {study.study_instance_uid}")
        _print(f"Accession Number:   {study.accession_number}")
        patient = study.patient
        state = "new" if study.patient_created else "registered"
        _print(f"Patient:            {name} ({patient.patient_id}, {patient.sex}, born {patient.birth_date}) [{state}]")
        rate = len(study.files) / study.seconds if study.seconds else 0
        size = show_size(study.bytes)
        _print(f"Files:              {len(study.files)} ({size}) in {study.seconds:.2f} s, {rate:.0f}/s")
        _print(f"Stored under:       {study.files[0].parent.parent if study.files else '-'}")
        if peer is not None:
            if _send_files(settings, peer, study.files).failed:
                raise CliError(f"the study was not stored completely at {peer.ae_title}", EX_UNAVAILABLE)
            _confirm(settings, peer, study.study_instance_uid, len(study.files))
        if args.count > 1:
            _print("")
    return 0


def _recover_unless_served(settings: Settings, writer: Any) -> None:
    """Settle what a crash left in storage, unless a daemon serves this data_dir (or node) now:
    its temporary files and intents are work in progress, not leftovers."""
    from fabricatord.service import DataDirInUse, hold_data_dir

    try:
        lock = hold_data_dir(settings.node.data_dir, settings.node_name if settings.shared else "")
    except DataDirInUse:
        return
    try:
        writer.recover()
    finally:
        os.close(lock)


def _send_files(settings: Settings, peer: Any, files: Sequence[Path]) -> Any:
    """C-STORE `files` to `peer` and say how it went; returns the report."""
    from fabricatord.dicom.scu import send

    report = send(peer, settings.node.ae_title, files, _timeouts(settings), _Progress(len(files), "send"))
    _print(
        f"Sent to {peer.ae_title}@{peer.host}:{peer.port}: {report.sent} of {len(files)} "
        f"({show_size(report.bytes)}, {report.warnings} with warnings) in {report.seconds:.2f} s"
    )
    if report.resent:
        _print(f"  {report.resent} sent again on a new association after getting no response")
    for path, why in report.failed[:20]:
        _print(f"  failed: {path}: {why}")
    return report


def _confirm(settings: Settings, peer: Any, study_uid: str, expected: int) -> None:
    """Ask the peer by C-FIND whether it holds the whole study."""
    from fabricatord.dicom.scu import ScuError, count_study_instances

    try:
        found = count_study_instances(peer, settings.node.ae_title, study_uid, _timeouts(settings))
    except ScuError as exc:
        raise CliError(f"sent, but the C-FIND confirmation failed: {exc}", EX_UNAVAILABLE) from exc
    if found != expected:
        raise CliError(
            f"C-FIND at {peer.ae_title} finds {found} instances of the study, expected {expected}", EX_UNAVAILABLE
        )
    _print(f"Confirmed by C-FIND at {peer.ae_title}: {found} instances of {study_uid}")


# -- show -----------------------------------------------------------------------------------

SHOWN = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "StudyInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesInstanceUID",
    "InstanceNumber",
    "SOPClassUID",
    "SOPInstanceUID",
    "Rows",
    "Columns",
    "BitsStored",
    "PhotometricInterpretation",
    "BurnedInAnnotation",
)


def cmd_show(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    path = Path(args.file)
    if path.is_dir():  # a study folder: its first file, as `ls -R` lists them
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise CliError(f"{path}: an empty folder", EX_DATAERR)
        path = files[0]
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise CliError(f"{path}: not a readable DICOM file: {exc}", EX_DATAERR) from exc
    meta = ds.file_meta
    _print(f"File:               {path} ({show_size(path.stat().st_size)})")
    _print(f"Transfer Syntax:    {meta.TransferSyntaxUID.name} ({meta.TransferSyntaxUID})")
    for keyword in SHOWN:
        if keyword in ds:
            value = ds[keyword].value
            label = keyword
            if keyword == "SOPClassUID":
                value = f"{value.name} ({value})"
            _print(f"{label + ':':<20}{value}")
    if args.png:
        if "PixelData" not in ds:
            raise CliError(f"{path}: has no pixel data to render", EX_DATAERR)
        from fabricatord.dicom.preview import render_png

        out = Path(args.png)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(render_png(ds))
        _print(f"Rendered:           {args.png}")
    return 0


# -- patients -------------------------------------------------------------------------------


def _patient_line(p: Any) -> str:
    return f"{p.patient_id:<16} {p.sex:<1}  {p.birth_date:<8}  {p.name}"


def cmd_patients(args: argparse.Namespace) -> int:
    from fabricatord.db import PatientRegistry

    settings = _settings(args)
    database = _database(settings)
    registry = PatientRegistry(database)
    if args.action == "list":
        more = f"--offset {args.offset + args.limit} shows the next {args.limit}"
        rows = _shown(registry.page(args.limit + 1, args.offset), args.limit, "patients", "first", more)
        for p in rows:
            _print(_patient_line(p))
        if not rows:
            _print("no patients registered yet: `fabricatord patients generate` or `fabricatord generate` make some")
    elif args.action == "search":
        for p in _shown(registry.search(args.text, args.limit + 1), args.limit, "patients", "first"):
            _print(_patient_line(p))
    elif args.action == "show":
        found = registry.summary(args.patient_id)
        if not found:
            raise CliError(f"no patient with ID {args.patient_id!r}", EX_DATAERR)
        for item in found:
            p = item.patient
            for label, value in (
                ("Patient ID", p.patient_id),
                ("Issuer", p.issuer),
                ("Name", p.name),
                ("Birth date", p.birth_date),
                ("Sex", p.sex),
                ("Address", p.address),
                ("Phone", p.phone),
                ("Studies", item.studies),
                ("Instances", item.instances),
            ):
                _print(f"{label + ':':<12} {value}")
    elif args.action == "generate":
        from fabricatord.workflow.generation import StudyGenerator

        generator = StudyGenerator(settings, database)
        for _ in range(args.count):
            patient, _created = generator.new_patient(sex=args.sex)
            _print(_patient_line(patient))
    else:
        stats = registry.stats()
        _print(f"patients:  {stats.patients}")
        for sex, n in sorted(stats.by_sex.items()):
            _print(f"  sex {sex or '-'}:   {n}")
        _print(f"studies:   {stats.studies}")
        _print(f"instances: {stats.instances}")
    return 0


# -- worklist and audit ----------------------------------------------------------------------


def _code(text: str) -> tuple[str, str, str]:
    from fabricatord.workflow.worklist import parse_code

    try:
        return parse_code(text)
    except ValueError as exc:
        raise CliError(str(exc), EX_USAGE) from None


def _start(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"--start takes an ISO date and time such as 2026-11-23T14:30, not {text!r}", EX_USAGE) from None


def cmd_worklist(args: argparse.Namespace) -> int:
    from fabricatord.db.worklist import ACTIONABLE, STEP_STATES, UnknownPatient, Worklist

    settings = _settings(args)
    _logging(settings)
    database = _database(settings)
    if args.action == "add":
        from fabricatord.workflow.worklist import Scheduler

        request = _worklist_request(args)
        scheduler = Scheduler(settings, database)
        for _ in range(args.count):
            try:
                made = scheduler.add(request)
            except (ValueError, UnknownPatient) as exc:
                raise CliError(str(exc), EX_DATAERR) from None
            _print(
                f"{made.sps_id}  accession {made.accession_number}  {args.modality} at {args.station}  "
                f"{made.start:%Y-%m-%d %H:%M}  {made.patient.patient_id} {made.patient.name}  "
                f"study {made.study_instance_uid}"
            )
        return 0
    statuses = STEP_STATES if args.all else ([args.status.upper()] if args.status else ACTIONABLE)
    items = _shown(
        Worklist(database).items(statuses, args.station, args.date, args.limit + 1), args.limit, "steps", "first"
    )
    for item in items:
        start = f"{item.start[:4]}-{item.start[4:6]}-{item.start[6:8]} {item.start[8:10]}:{item.start[10:12]}"
        fetched = f"  fetched by {','.join(item.fetched_by)}" if item.fetched_by else ""
        _print(
            f"{item.sps_id:<12} {item.status:<12} {item.modality:<3} {item.station_ae:<16} {start}  "
            f"{item.accession_number:<16} {item.patient_id:<12} {item.patient_name}  {item.description}{fetched}"
        )
    if not items:
        _print("no worklist items match: `fabricatord worklist add` makes some")
    return 0


def _worklist_request(args: argparse.Namespace) -> Any:
    from fabricatord.workflow.worklist import WorklistRequest

    return WorklistRequest(
        modality=args.modality,
        station_ae=getattr(args, "station", ""),
        station_name=getattr(args, "station_name", ""),
        location=getattr(args, "location", ""),
        start=_start(args.start),
        patient_id=args.patient_id,
        accession_number=args.accession,
        procedure_description=args.description,
        procedure_code=_code(args.procedure_code),
        protocol_code=_code(getattr(args, "protocol_code", "")),
        referring_physician=args.referring,
        requesting_physician=args.requesting,
        performing_physician=args.performing,
        priority=getattr(args, "priority", ""),
    )


def cmd_hl7(args: argparse.Namespace) -> int:
    if args.action == "log":
        return _hl7_log(args)
    if args.action == "preview":
        return _hl7_preview(args)
    if args.action == "send":
        files = []
        for name in args.files:
            try:
                files.append((Path(name).name, Path(name).read_bytes()))
            except OSError as exc:
                raise CliError(f"{name}: {exc.strerror}", EX_DATAERR) from None
        return _hl7_send(args.address, files, args.timeout, _mllp_tls(args))
    from fabricatord.workflow.worklist import Scheduler

    settings = _settings(args)
    _logging(settings)
    scheduler = Scheduler(settings, _database(settings))
    messages = []
    for _ in range(args.count):
        try:
            messages.append(scheduler.order_text(_worklist_request(args), args.version))
        except ValueError as exc:
            raise CliError(str(exc), EX_DATAERR) from None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for control_id, message in messages:
            (out / f"{control_id}.hl7").write_bytes(message.encode())
        _print(f"{len(messages)} message(s) written to {out}")
    elif not args.send:
        for _, message in messages:
            _print(message.replace("\r", "\n") + "\n")
    if args.send:
        return _hl7_send(args.send, [(f"{c}.hl7", m.encode()) for c, m in messages], args.timeout, _mllp_tls(args))
    return 0


def _mllp_tls(args: argparse.Namespace) -> Any:
    """With --tls, the `[tls]` client context (the listener verified against `ca`, our
    certificate presented); else None."""
    if not args.tls:
        return None
    settings = _settings(args)
    if not enabled(settings.tls):
        raise CliError("--tls needs [tls] certificate, private_key and ca in the configuration", EX_USAGE)
    return client_context(settings.tls)


def _hl7_send(address: str, messages: Sequence[tuple[str, bytes]], timeout: float, tls: Any = None) -> int:
    """Send each (name, message) over one MLLP connection and print its acknowledgement; 0 when
    all are AA/CA."""
    import hl7

    from fabricatord.hl7.mllp import MllpClient, as_wire

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"expected HOST:PORT, not {address!r}", EX_USAGE)
    accepted = 0
    try:
        with MllpClient(host, int(port), timeout, tls) as client:
            for name, data in messages:
                reply = client.send(as_wire(data))
                ack = hl7.parse(reply.decode("utf-8", errors="replace"))
                code = str(ack.segment("MSA")[1])
                errors = [str(segment) for segment in ack if str(segment[0]) == "ERR"]
                _print(f"{name}: {code} {ack.segment('MSA')[2]!s}" + "".join(f"  {e}" for e in errors))
                accepted += code in ("AA", "CA")
    except (OSError, hl7.ParseException, KeyError) as exc:
        raise CliError(f"{address}: {exc}", EX_UNAVAILABLE) from None
    return 0 if accepted == len(messages) else 1


def _hl7_log(args: argparse.Namespace) -> int:
    from fabricatord.db.messages import MessageLog

    messages = MessageLog(_database(_settings(args)))
    if args.show is not None:
        message = messages.get(args.show)
        if message is None:
            raise CliError(f"no HL7 message {args.show}", EX_DATAERR)
        at = message.received_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        _print(f"#{message.id} {at} from {message.peer} profile {message.profile or '-'}: {message.outcome}")
        for label, text in (("error", message.error), ("did", message.detail)):
            if text:
                _print(f"{label}: {text}")
        for label, data in (("message", message.raw), ("ack", message.ack)):
            _print(f"--- {label}")
            _print(data.decode("utf-8", errors="replace").replace("\r", "\n").rstrip("\n"))
        return 0
    found = _shown(
        messages.recent(args.limit + 1, args.outcome, args.control_id, _since(args.since)), args.limit, "messages"
    )
    for m in reversed(found):
        at = m.received_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        what = m.error or m.detail
        _print(
            f"{m.id:>6}  {at}  {m.outcome:<2}  {m.message_type:<9} {m.sending_application:<12} "
            f"{m.control_id:<22} {what}".rstrip()
        )
    if not found:
        _print("no HL7 messages match")
    return 0


def _hl7_preview(args: argparse.Namespace) -> int:
    from fabricatord.hl7.codec import Hl7Error
    from fabricatord.workflow.hl7 import Inbox

    settings = _settings(args)
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"{args.file}: {exc.strerror}", EX_DATAERR) from None
    try:
        previews = Inbox(settings, _database(settings)).preview(data)
    except Hl7Error as exc:
        _print(f"{exc.acknowledgment} (ERR {exc.code}) {exc}")
        return 1
    for preview in previews:
        patient = preview.patient
        who = f"patient {patient.patient_id} ({patient.issuer or 'no issuer'}) {patient.name}" if patient else ""
        _print(f"{preview.message_type} through profile {preview.profile}: {who}".rstrip())
        for effect, plan in preview.orders:
            _print(
                f"  {effect}: order placer {plan.placer_order_number or '-'} filler {plan.filler_order_number or '-'}"
                f" accession {plan.accession_number or '-'}"
            )
            for procedure in plan.procedures:
                _print(
                    f"    requested procedure {procedure.requested_procedure_id or '-'} "
                    f"study {procedure.study_instance_uid or '(generated)'} {procedure.description}".rstrip()
                )
                for step in procedure.steps:
                    start = f"{step.start_date} {step.start_time}".strip() or "-"
                    _print(
                        f"      step {step.sps_id or '-'} {step.modality or '-'} station {step.station_ae or '-'} "
                        f"at {start} {step.description}".rstrip()
                    )
    return 0


def _since(text: str) -> datetime | None:
    """`--since 10m` as the moment it names."""
    if not text:
        return None
    from fabricatord.config.values import parse_duration

    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise CliError(f"--since: {exc}", EX_USAGE) from None


def cmd_acquire(args: argparse.Namespace) -> int:
    from fabricatord.db.jobs import Acquisitions
    from fabricatord.db.worklist import Worklist

    database = _database(_settings(args))
    steps = Worklist(database).steps_named(args.name)
    if not steps:
        raise CliError(f"no worklist step has the SPS ID or accession number {args.name!r}", EX_DATAERR)
    acquisitions = Acquisitions(database)
    released = acquisitions.release(steps, ("manual", "on_query"))
    jobs = acquisitions.for_steps(steps)
    if args.wait is None:
        for job in jobs:
            _print(f"step {job.step_pk}: {job.policy} acquisition {job.state}")
        _print(f"{released} acquisition(s) due now; the running daemon performs them")
        return 0 if released or any(job.state in ("pending", "running", "done") for job in jobs) else 1
    # Until the running daemon has done (or given up) every one: a script's next step can rely on it.
    deadline = time.monotonic() + args.wait
    while any(job.state in ("waiting", "pending", "running") for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.25)
        jobs = acquisitions.for_steps(steps)
    for job in jobs:
        _print(_acquisition_line(job))
    open_jobs = [job for job in jobs if job.state in ("waiting", "pending", "running")]
    if open_jobs:
        raise CliError(f"{len(open_jobs)} acquisition(s) not finished after {args.wait:g} s", EX_UNAVAILABLE)
    return 0 if jobs and all(job.state == "done" for job in jobs) else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from fabricatord.db.jobs import Acquisitions, FhirJobs, RouteJobs

    database = _database(_settings(args))
    acquisitions, routes, exports = Acquisitions(database), RouteJobs(database), FhirJobs(database)
    if args.action == "list":
        states = [args.state] if args.state else []
        if args.kind in ("all", "acquisitions"):
            for a in reversed(_shown(acquisitions.listing(states, args.limit + 1), args.limit, "acquisitions")):
                _print(_acquisition_line(a))
        if args.kind in ("all", "routes"):
            for r in reversed(_shown(routes.listing(states, args.study, args.limit + 1), args.limit, "route jobs")):
                _print(_route_line(r))
        if args.kind in ("all", "fhir"):
            for f in reversed(_shown(exports.listing(states, args.study, args.limit + 1), args.limit, "FHIR jobs")):
                _print(_fhir_line(f))
        return 0
    wanted: dict[str, list[int]] = {"a": [], "r": [], "f": []}
    for name in args.ids:
        kind, number = name[:1].lower(), name[1:]
        if kind not in wanted or not number.isdigit():
            raise CliError(
                f"{name!r}: a job is a1 (acquisition), r1 (route) or f1 (FHIR), as `jobs list` shows", EX_USAGE
            )
        wanted[kind].append(int(number))
    if args.action == "show":
        for a in acquisitions.by_ids(wanted["a"]):
            _print(_acquisition_line(a))
            _print(f"  study {a.study_instance_uid or '-'}  mpps {a.performed_step_uid or '-'}  {a.last_error}")
        for r in routes.by_ids(wanted["r"]):
            _print(_route_line(r))
            at = r.next_attempt_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            _print(f"  study {r.study_instance_uid}  route {r.route}  next attempt {at}")
        for f in exports.by_ids(wanted["f"]):
            _print(_fhir_line(f))
            at = f.next_attempt_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            _print(f"  next attempt {at}  {f.last_error}".rstrip())
        return 0
    if args.action == "retry":
        touched = (
            [f"a{pk}" for pk in acquisitions.retry(wanted["a"])]
            + [f"r{pk}" for pk in routes.retry(wanted["r"])]
            + [f"f{pk}" for pk in exports.retry(wanted["f"])]
        )
        _print(f"{len(touched)} job(s) due again now{': ' if touched else ''}{' '.join(touched)}")
        why = "only failed, canceled (and for FHIR, done) jobs and pending ones waiting out their backoff are retried"
    else:
        touched = (
            [f"a{pk}" for pk in acquisitions.cancel_jobs(wanted["a"])]
            + [f"r{pk}" for pk in routes.cancel(wanted["r"])]
            + [f"f{pk}" for pk in exports.cancel(wanted["f"])]
        )
        _print(f"{len(touched)} job(s) canceled{': ' if touched else ''}{' '.join(touched)}")
        why = "only pending (and waiting) jobs are canceled"
    state_of = {f"a{a.id}": a.state for a in acquisitions.by_ids(wanted["a"])}
    state_of.update({f"r{r.id}": r.state for r in routes.by_ids(wanted["r"])})
    state_of.update({f"f{f.id}": f.state for f in exports.by_ids(wanted["f"])})
    untouched = [name for name in dict.fromkeys(n.lower() for n in args.ids) if name not in touched]
    for name in untouched:
        state = state_of.get(name)
        print(f"fabricatord: {name}: {f'{state}, left as it is ({why})' if state else 'no such job'}", file=sys.stderr)
    return 1 if untouched else 0


def _shown(rows: Sequence[Any], limit: int, what: str, which: str = "newest", more: str = "") -> list[Any]:
    """The first `limit` of `rows` (asked for one more than that): a listing that stops says so,
    and how to see the rest, on stderr, where it does not disturb a script reading stdout."""
    if len(rows) <= limit:
        return list(rows)
    hint = more or f"--limit {limit * 10} shows more"
    print(f"fabricatord: only the {which} {limit} {what} are shown; more match ({hint})", file=sys.stderr)
    return list(rows[:limit])


def _acquisition_line(a: Any) -> str:
    due = a.due_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if a.due_at else "-"
    what = a.last_error or (f"{a.instances} instances of {a.study_instance_uid}" if a.instances else "")
    head = f"{'a' + str(a.id):<7} acquire  step {a.step_pk:<6} {a.policy:<9} {a.state:<9}"
    return f"{head} due {due}  tries {a.attempts}  {what}".rstrip()


def _route_line(r: Any) -> str:
    head = f"{'r' + str(r.id):<7} route    {r.peer:<12} {r.state:<9} tries {r.attempts}"
    return f"{head}  {r.sop_instance_uid}  {r.last_error}".rstrip()


def _fhir_line(f: Any) -> str:
    head = f"{'f' + str(f.id):<7} fhir     {f.destination:<12} {f.state:<9} tries {f.attempts}"
    return f"{head}  {f.study_instance_uid}  {f.last_error}".rstrip()


def cmd_fhir(args: argparse.Namespace) -> int:
    """A stored study's transaction Bundle, as the FHIR destinations receive it."""
    from fabricatord.workflow.fhir import study_bundle

    settings = _settings(args)
    try:
        bundle = study_bundle(settings, _database(settings), args.study)
    except ValueError as exc:
        raise CliError(str(exc), EX_SOFTWARE) from None
    if bundle is None:
        raise CliError(f"no study {args.study!r} is stored", EX_DATAERR)
    _print(json.dumps(bundle, indent=2, ensure_ascii=False))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """What `[dicom] retention` and the quota let go, now: deleted, or with --dry-run only listed."""
    from fabricatord.service import storage_writer, with_cleanup

    settings = _settings(args)
    _logging(settings)
    database = _database(settings)
    writer = storage_writer(settings, database)
    _recover_unless_served(settings, writer)
    removals = with_cleanup(settings, database, writer).clean(dry_run=args.dry_run)
    instances, total = sum(r.instances for r in removals), sum(r.bytes for r in removals)
    if args.json:
        for r in removals:
            arrived = r.last_arrival.astimezone(UTC).isoformat().replace("+00:00", "Z")
            _print(json.dumps({**r.__dict__, "last_arrival": arrived, "deleted": not args.dry_run}))
        _print(json.dumps({"total": True, "studies": len(removals), "instances": instances, "bytes": total,
                           "deleted": not args.dry_run}))  # fmt: skip
        return 0
    rows = [
        [
            r.study_instance_uid,
            r.last_arrival.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            str(r.instances),
            str(r.bytes),
            r.reason,
        ]
        for r in removals
    ]
    if rows:
        _table(["STUDY INSTANCE UID", "LAST ARRIVAL", "INSTANCES", "BYTES", "REASON"], rows)
    verb = "would delete" if args.dry_run else "deleted"
    _print(f"{verb} {len(removals)} studies, {instances} instances, {total} bytes ({show_size(total)})")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    from fabricatord.db.nodes import Nodes

    nodes = Nodes(_database(_settings(args))).listing()
    if args.json:
        for n in nodes:
            _print(
                json.dumps(
                    {**n.__dict__, "started_at": n.started_at.isoformat(), "last_seen_at": n.last_seen_at.isoformat()}
                )
            )
        return 0
    rows = [
        [
            n.name,
            n.host,
            str(n.pid),
            n.version,
            n.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            n.last_seen_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            "leader" if n.leader else "",
        ]
        for n in nodes
    ]
    if not rows:
        _print("no node has started on this database yet")
        return 0
    _table(["NAME", "HOST", "PID", "VERSION", "STARTED", "LAST SEEN", ""], rows)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from fabricatord.db.timeline import timeline

    found = timeline(_database(_settings(args)), args.accession)
    if found is None:
        raise CliError(f"no order has the accession number {args.accession!r}", EX_DATAERR)
    _print(f"accession {found.accession_number}  study {', '.join(found.study_instance_uids) or '-'}")
    first = found.events[0].at if found.events else None
    for event in found.events:
        assert first is not None
        at = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        _print(f"{at}  +{(event.at - first).total_seconds():8.3f} s  {event.what}")
    return 0


def cmd_mpps(args: argparse.Namespace) -> int:
    from fabricatord.db.performed import PerformedSteps

    records = _shown(
        PerformedSteps(_database(_settings(args))).recent(args.limit + 1, args.status), args.limit, "steps"
    )
    for r in reversed(records):
        times = f"{r.started or '-'} → {r.ended or '-'}"
        _print(
            f"{r.status:<13} {r.calling_ae:<16} {r.modality:<4} {r.accession_number or '-':<16} "
            f"SPS {r.sps_ids.replace(chr(92), ',') or '(unscheduled)':<20} {times}  {r.sop_instance_uid}"
        )
    if not records:
        _print("no Modality Performed Procedure Steps")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fabricatord.db.audit import AuditLog

    settings = _settings(args)
    records = _shown(
        AuditLog(_database(settings)).search(
            args.operation,
            args.calling_ae,
            args.association,
            _since(args.since),
            args.failures,
            args.limit + 1,
            args.user,
        ),
        args.limit,
        "events",
    )
    for r in reversed(records):
        at = r.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        _print(
            f"{at}  {r.association:<6} {r.operation:<11} {r.username or r.calling_ae:<16} {r.peer_address:<21} "
            f"{r.status:<9} {r.instances:>6} {show_size(r.bytes):>9} {r.seconds * 1000:>9.1f} ms  {r.detail}".rstrip()
        )
    if not records:
        _print("no audit events match")
    return 0


# -- patterns -------------------------------------------------------------------------------


def cmd_patterns(args: argparse.Namespace) -> int:
    from fabricatord.synth.checks import PATTERN_LIMITS
    from fabricatord.synth.patterns import Pattern, PatternError
    from fabricatord.workflow.generation import ACCESSION_COUNTER, PATIENT_COUNTER

    settings = _settings(args)
    try:
        pattern = Pattern.parse(args.pattern)
    except PatternError as exc:
        raise CliError(f"pattern {args.pattern!r}: {exc}", EX_USAGE) from exc
    field = "accession_pattern" if args.field == "accession" else "patient_id_pattern"
    attribute, limit = PATTERN_LIMITS[field]
    synth = settings.synth
    start, step, counter = (
        (synth.accession_start, synth.accession_step, ACCESSION_COUNTER)
        if args.field == "accession"
        else (synth.patient_id_start, synth.patient_id_step, PATIENT_COUNTER)
    )
    first = start
    if pattern.counter_width is not None:
        from fabricatord.db import Sequences

        first = Sequences(_database(settings)).peek(counter, start)
    rng = random.Random(synth.seed)
    for i in range(args.count):
        _print(pattern.render(first + i * step if pattern.counter_width else None, date.today(), rng))
    fits = "fits" if pattern.max_length <= limit else "DOES NOT FIT"
    print(
        f"(up to {pattern.max_length} characters: {fits} {attribute} of {limit}; counter not consumed)",
        file=sys.stderr,
    )
    return 0


# -- echo / send ----------------------------------------------------------------------------


def cmd_echo(args: argparse.Namespace) -> int:
    from fabricatord.dicom.scu import ScuError, echo

    settings = _settings(args)
    peer = _peer(settings, args.peer)
    try:
        seconds = echo(peer, settings.node.ae_title, _timeouts(settings))
    except ScuError as exc:
        raise CliError(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: {exc}", EX_UNAVAILABLE) from exc
    _print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: success in {seconds * 1000:.1f} ms")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from fabricatord.config.values import is_valid_uid
    from fabricatord.dicom.scu import ScuError

    settings = _settings(args)
    peer = _peer(settings, args.peer, "send to", args.prod)
    files: list[Path] = []
    studies: dict[str, int] = {}
    """Stored studies named on the command line, with their instance counts, to confirm."""
    for item in args.items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        elif is_valid_uid(item):
            from fabricatord.db import InstanceIndex

            index = InstanceIndex(_database(settings))
            summary = index.study_summary(item)
            if summary is None:
                raise CliError(f"no stored study has Study Instance UID {item}", EX_DATAERR)
            _print(
                f"Study {item}: accession {summary.accession_number or '-'}, patient {summary.patient_id}, "
                f"{summary.instances} instances in {summary.series} series ({show_size(summary.size)})"
            )
            stored = index.study_instances(item)
            files.extend(settings.storage_dir / s.path for s in stored)
            studies[item] = len(stored)
        else:
            raise CliError(f"{item!r} is neither a file, a folder nor a stored Study Instance UID", EX_USAGE)
    if not files:
        raise CliError("nothing to send", EX_USAGE)
    try:
        if _send_files(settings, peer, files).failed:
            return EX_UNAVAILABLE
        for study_uid, count in studies.items():
            _confirm(settings, peer, study_uid, count)
    except ScuError as exc:
        raise CliError(str(exc), EX_UNAVAILABLE) from exc
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    """Ask a peer for Storage Commitment of every indexed instance of a study and wait for its
    report: on our association, or on the daemon's listener (this command shares its database)."""
    from fabricatord.config.values import is_valid_uid
    from fabricatord.db import InstanceIndex
    from fabricatord.dicom.commitment import reason_text
    from fabricatord.workflow.commitment import StorageCommitment

    settings = _settings(args)
    peer = _peer(settings, args.peer)
    if not is_valid_uid(args.study):
        raise CliError(f"{args.study!r} is not a Study Instance UID", EX_USAGE)
    database = _database(settings)
    stored = InstanceIndex(database).study_instances(args.study)
    if not stored:
        raise CliError(f"no stored study has Study Instance UID {args.study}", EX_DATAERR)
    if not _listening(settings):
        print(
            f"warning: nothing listens on our DICOM port {settings.dicom.port}: a report the peer sends on "
            "an association of its own cannot arrive (start `fabricatord serve` with this configuration)",
            file=sys.stderr,
        )
    service = StorageCommitment(settings, database)
    started = time.monotonic()
    instances = [(s.sop_class_uid, s.sop_instance_uid, None) for s in stored]
    transaction = service.request(peer, args.study, instances, args.timeout)
    if transaction.state == "refused":
        raise CliError(f"{peer.ae_title}@{peer.host}:{peer.port}: {transaction.last_error}", EX_UNAVAILABLE)
    uid = transaction.transaction_uid
    while transaction.state == "requested" and time.monotonic() - started < args.timeout:
        time.sleep(0.2)
        transaction = service.transactions.transaction(uid, "out") or transaction
    if transaction.state == "requested":
        _print(f"{peer.ae_title}: no report within {args.timeout:g} s (transaction {uid})")
        return EX_TEMPFAIL
    failed = transaction.failed
    _print(
        f"{peer.ae_title}: {len(transaction.committed)} of {len(transaction.items)} instances committed, "
        f"{len(failed)} failed (transaction {uid})"
    )
    for item in failed:
        reason = reason_text(int(item.failure_reason or 0))
        _print(f"  failed: {item.sop_instance_uid} ({item.sop_class_uid}): {reason}")
    return EX_UNAVAILABLE if failed else 0


def _listening(settings: Settings) -> bool:
    """Whether something accepts connections on our own DICOM port."""
    import socket

    from fabricatord.workflow import remote

    own = remote.own_node(settings)
    try:
        socket.create_connection((own.host, own.port), timeout=2).close()
    except OSError:
        return False
    return True


# -- find / move ----------------------------------------------------------------------------


def _keys(texts: Sequence[str]) -> list[Any]:
    from fabricatord.dicom.keys import BadKey, parse_key

    try:
        return [parse_key(text) for text in texts]
    except BadKey as exc:
        raise CliError(str(exc), EX_USAGE) from None


def cmd_find(args: argparse.Namespace) -> int:
    from fabricatord.dicom.keys import DEFAULT_KEYS, query_warnings
    from fabricatord.workflow import remote

    settings = _settings(args)
    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    if not names:
        raise CliError("name at least one peer: a [[peers]] name, self, or AET@host:port", EX_USAGE)
    for name in names:
        _peer(settings, name)  # a name that is no peer is a usage error, before anyone is asked
    keys = _keys(args.keys)
    for warning in query_warnings(args.level, keys):
        print(f"fabricatord: warning: {warning}", file=sys.stderr)
    progress = _Progress(len(names), "find", minimum=2)
    waiting = dict.fromkeys(names)

    def finished(answer: remote.PeerAnswer) -> None:
        waiting.pop(answer.name, None)
        progress.update(len(names) - len(waiting), note=f"waiting for {', '.join(waiting)}" if waiting else "")

    answers = remote.find(settings, names, args.level, keys, args.timeout, finished)
    progress.end()
    if args.json:
        for answer in answers:
            for match in answer.matches:
                _print(json.dumps({"peer": answer.name, **match}, ensure_ascii=False))
    else:
        columns = list(dict.fromkeys([*DEFAULT_KEYS[args.level], *(_top_label(key) for key in keys)]))
        _table(["PEER", *columns], [[a.name, *(_cell(m.get(c)) for c in columns)] for a in answers for m in a.matches])
    for answer in answers:
        if answer.error:
            print(f"fabricatord: {answer.name}: {answer.error}", file=sys.stderr)
    return EX_UNAVAILABLE if any(answer.error for answer in answers) else 0


def _top_label(key: Any) -> str:
    from pydicom.datadict import keyword_for_tag

    tag = key.path[0][0]
    return keyword_for_tag(tag) or f"{tag.group:04X}{tag.element:04X}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return json.dumps(value, ensure_ascii=False)
        return "\\".join(value)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell; an empty table says so."""
    if not rows:
        _print("no matches")
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_move(args: argparse.Namespace) -> int:
    from fabricatord.config.values import is_valid_uid
    from fabricatord.dicom import scu
    from fabricatord.dicom.keys import level_of, selects
    from fabricatord.workflow import remote

    settings = _settings(args)
    source = _peer(settings, args.source, "retrieve from", args.prod)
    try:
        destination = remote.destination(settings, args.to, args.prod)
    except remote.UnknownPeer as exc:
        raise CliError(str(exc), EX_USAGE) from None
    except remote.ProdRefused as exc:
        raise CliError(str(exc), EX_NOPERM) from None
    studies = list(dict.fromkeys(args.studies))
    for uid in studies:
        if not is_valid_uid(uid):
            raise CliError(f"{uid!r} is not a Study Instance UID", EX_USAGE)
    if args.keys:
        keys = _keys(args.keys)
        for key in keys:
            if level_of(key) != "study":
                problem = f"move -k finds studies, and {key.label} is a {level_of(key)} key"
                raise CliError(f"-k {key.text!r}: {problem}", EX_USAGE)
        if not selects(keys):
            raise CliError("move -k needs a value to match (not empty, not *): it would move every study", EX_USAGE)
        timeout = args.timeout or 30.0
        answer = remote.find(settings, [args.source], "study", keys, timeout)[0]
        if answer.error:
            raise CliError(f"{args.source}: {answer.error}", EX_UNAVAILABLE)
        found = [str(m.get("StudyInstanceUID", "")) for m in answer.matches]
        _print(f"{len(found)} stud{'y' if len(found) == 1 else 'ies'} at {source.ae_title} match")
        studies += [uid for uid in found if is_valid_uid(uid) and uid not in studies]
    if not studies:
        raise CliError("nothing to move: give Study Instance UIDs, or -k keys that match studies", EX_USAGE)
    timeouts = remote.move_timeouts(settings, args.timeout)
    failures = 0
    for number, uid in enumerate(studies, 1):
        progress = _Progress(0, f"move {number}/{len(studies)}", minimum=1)

        def moved(report: scu.MoveReport, progress: _Progress = progress) -> None:
            done = report.completed + report.failed + report.warnings
            progress.update(done, report.attempted, f"{report.failed} failed" if report.failed else "")

        try:
            report = scu.move(source, settings.node.ae_title, destination, remote.study_query(uid), timeouts, moved)
        except scu.ScuError as exc:
            progress.end()
            raise CliError(str(exc), EX_UNAVAILABLE) from None
        progress.end()
        done = report.completed + report.warnings
        problem = ""
        if report.status is None:
            problem = "no final response (timeout or abort)"
        elif report.outcome == "failure":
            problem = f"status 0x{report.status:04X}{f': {report.comment}' if report.comment else ''}"
        elif report.failed:
            problem = f"{report.failed} sub-operation(s) failed"
        elif done == 0 and report.counted:
            problem = f"{source.ae_title} had nothing of this study to move"
        if report.counted or problem:
            counts = (
                f"{report.completed} moved to {destination}, {report.warnings} with warnings, {report.failed} failed"
            )
        else:  # counts are optional in a final success; the peer says it moved what it had
            counts = f"moved to {destination} (the source reported no counts)"
        _print(f"{uid}: {counts} in {report.seconds:.2f} s{f' ({problem})' if problem else ''}")
        for failed in report.failed_instances[:20]:
            _print(f"  failed: {failed}")
        failures += bool(problem)
    return EX_UNAVAILABLE if failures else 0


# -- users ----------------------------------------------------------------------------------


def _password(args: argparse.Namespace, name: str) -> str:
    """A new password: the first line of stdin with --password-stdin, else asked twice on a terminal."""
    import getpass

    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise CliError("the two passwords differ", EX_USAGE)
    else:
        raise CliError("stdin is not a terminal: give --password-stdin and the password on its first line", EX_USAGE)
    return password


def cmd_proxy(args: argparse.Namespace) -> int:
    """`keygen`: a new key for a proxy's key_file, on stdout."""
    from fabricatord.workflow.proxy import keygen

    _print(keygen())
    return 0


def cmd_reidentify(args: argparse.Namespace) -> int:
    """What each removed or replaced attribute of a study was, by the proxy's key; with --out,
    re-identified files (pixels too where the proxy kept originals)."""
    from fabricatord.db import InstanceIndex
    from fabricatord.workflow.proxy import Proxies, ProxyKeyError

    settings = _settings(args)
    _logging(settings)
    database = _database(settings)
    try:
        proxies = Proxies(settings, database)
        restored = proxies.reidentify(args.study, who=f"cli:{os.environ.get('USER', '')}")
        if restored is None:
            raise CliError(f"no proxy de-identified a study with Study Instance UID {args.study}", EX_DATAERR)
        if args.out:
            stored = {
                i.sop_instance_uid: settings.storage_dir / i.path
                for i in InstanceIndex(database).study_instances(args.study)
            }
            written = proxies.reidentified_files(args.study, stored, Path(args.out))
    except ProxyKeyError as exc:
        raise CliError(str(exc), EX_CONFIG) from None
    if args.json:
        for r in restored:
            _print(json.dumps(r.__dict__))
    else:
        rows = [[r.sop_instance_uid, r.path, r.keyword, r.action, json.dumps(r.original)] for r in restored]
        _table(["SOP INSTANCE UID (AS SENT)", "TAG", "KEYWORD", "ACTION", "ORIGINAL"], rows)
    if args.out:
        _print(f"{len(written)} re-identified files in {args.out}")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from fabricatord.config.values import parse_duration
    from fabricatord.workflow.access import Directory, NoSuchUser, PasswordRules, UserExists

    settings = _settings(args)
    directory = Directory(_database(settings), parse_duration(settings.http.session_idle))
    try:
        if args.action == "add":
            user = directory.add(args.name, args.role, _password(args, args.name))
            _print(f"user {user.name} added with role {user.role}")
        elif args.action == "list":
            for user in directory.users():
                state = "disabled" if user.disabled else "active"
                _print(f"{user.name:<24} {user.role:<11} {state:<9} since {user.created_at:%Y-%m-%d}")
            if not directory.has_users():
                _print("no users yet: `fabricatord users add NAME --role admin` makes the first")
        elif args.action == "passwd":
            if directory.get(args.name) is None:
                raise NoSuchUser(args.name)
            directory.set_password(args.name, _password(args, args.name))
            _print(f"password of {args.name} changed")
        elif args.action == "disable":
            directory.disable(args.name)
            _print(f"user {args.name} disabled; its sessions and tokens ended")
        elif args.action == "enable":
            directory.enable(args.name)
            _print(f"user {args.name} enabled")
        else:
            _print(directory.new_token(args.name))
    except NoSuchUser:
        raise CliError(f"no user named {args.name!r}", EX_DATAERR) from None
    except UserExists as exc:
        raise CliError(str(exc), EX_DATAERR) from None
    except (PasswordRules, ValueError) as exc:
        raise CliError(str(exc), EX_USAGE) from None
    return 0


# -- parser ---------------------------------------------------------------------------------


def _order_arguments(parser: argparse.ArgumentParser) -> None:
    """What `worklist add` and `hl7 orm` both say of an order."""
    parser.add_argument("--start", default="", help="scheduled start, ISO date and time (default: now)")
    parser.add_argument("--patient-id", default="", help="a registered patient (default: a new synthetic one)")
    parser.add_argument("--accession", default="", help="Accession Number (default: from [synth] accession_pattern)")
    parser.add_argument("--description", default="", help="Requested Procedure Description")
    parser.add_argument("--procedure-code", default="", metavar="VALUE^SCHEME^MEANING")
    parser.add_argument("--referring", default="", help="Referring Physician's Name (Last^First)")
    parser.add_argument("--requesting", default="", help="Requesting Physician")
    parser.add_argument("--performing", default="", help="Scheduled Performing Physician's Name")


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from fabricatord.synth.encoding import TRANSFER_SYNTAXES
    from fabricatord.synth.templates import MODALITIES

    parser = argparse.ArgumentParser(prog="fabricatord", description="A whole imaging department in one daemon.")
    parser.add_argument("--version", action="version", version=f"fabricatord {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            metavar="PATH",
            help="TOML file (default: $FABRICATORD_CONFIG, else ./conf/fabricatord.toml, else "
            "/etc/fabricatord/fabricatord.toml, else built-in defaults)",
        )
        sub.set_defaults(handler=handler)
        return sub

    command("serve", cmd_serve, "run the daemon")
    command("check-config", cmd_check_config, "validate a configuration file; every problem is listed")
    command("migrate", cmd_migrate, "bring the database schema up to date, as serve does at start")

    gen = command(
        "generate",
        cmd_generate,
        "make a synthetic study, store and index it (or write it to --out)",
    )
    gen.add_argument("--modality", required=True, type=str.upper, choices=MODALITIES)
    gen.add_argument("--series", type=int, default=0, help="series in the study (default: the template's)")
    gen.add_argument("--images", type=int, default=0, help="images per series (default: the template's)")
    gen.add_argument("--rows", type=int, default=0)
    gen.add_argument("--columns", type=int, default=0)
    gen.add_argument("--description", default="", help="Study Description")
    gen.add_argument(
        "--patient-id",
        default="",
        help="use this registered patient, or register a new one with this ID",
    )
    gen.add_argument("--accession", default="", help="Accession Number (default: from [synth] accession_pattern)")
    gen.add_argument("--transfer-syntax", default="", choices=["", *TRANSFER_SYNTAXES])
    gen.add_argument("--out", metavar="DIR", help="write plain files here instead of storing and indexing them")
    gen.add_argument("--send", metavar="PEER", help="C-STORE the study to PEER, then confirm it there by C-FIND")
    gen.add_argument("--prod", action="store_true", help='allow --send to a peer with environment = "prod"')
    gen.add_argument("--count", type=_positive, default=1, help="how many studies")

    show = commands.add_parser("show", help="print the key attributes of a DICOM file and render it")
    show.add_argument("file", metavar="FILE|DIR", help="a file, or a folder: its first file by name")
    show.add_argument("--png", metavar="OUT", help="write the image as PNG")
    show.set_defaults(handler=cmd_show)

    patients = command("patients", cmd_patients, "the synthetic patient registry")
    actions = patients.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="registered patients")
    listing.add_argument("--limit", type=_positive, default=50)
    listing.add_argument("--offset", type=int, default=0)
    actions.add_parser("show", help="one patient with study and instance counts").add_argument("patient_id")
    search = actions.add_parser("search", help="patients whose ID or name contains TEXT (* and ? wildcards)")
    search.add_argument("text")
    search.add_argument("--limit", type=_positive, default=50)
    make = actions.add_parser("generate", help="register new synthetic patients")
    make.add_argument("--count", type=_positive, default=1)
    make.add_argument("--sex", choices=["M", "F", "O"])
    actions.add_parser("stats", help="counts of patients, studies and instances")
    for sub in actions.choices.values():
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")

    patterns = command("patterns", cmd_patterns, "the identifier pattern language")
    pattern_actions = patterns.add_subparsers(dest="action", required=True, metavar="ACTION")
    preview = pattern_actions.add_parser("preview", help="what PATTERN makes, without consuming the counter")
    preview.add_argument("pattern")
    preview.add_argument("--count", type=_positive, default=5)
    preview.add_argument(
        "--field",
        choices=["accession", "patient-id"],
        default="accession",
        help="whose counter to continue (default: accession)",
    )
    preview.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")

    worklist = command("worklist", cmd_worklist, "the Modality Worklist: scheduled procedure steps")
    worklist_actions = worklist.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = worklist_actions.add_parser("add", help="schedule an order: one requested procedure with one step")
    add.add_argument("--modality", required=True, type=str.upper, choices=MODALITIES)
    add.add_argument("--station", required=True, metavar="AE", help="Scheduled Station AE Title")
    add.add_argument("--station-name", default="", help="Scheduled Station Name")
    add.add_argument("--location", default="", help="Scheduled Procedure Step Location")
    _order_arguments(add)
    add.add_argument("--protocol-code", default="", metavar="VALUE^SCHEME^MEANING", help="Scheduled Protocol Code")
    add.add_argument("--priority", default="", choices=["", "STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"])
    add.add_argument("--count", type=_positive, default=1, help="how many orders")
    listing = worklist_actions.add_parser("list", help="scheduled steps by start time (actionable ones by default)")
    listing.add_argument("--status", default="", help="only steps in this state")
    listing.add_argument("--all", action="store_true", help="steps in every state")
    listing.add_argument("--station", default="", metavar="AE")
    listing.add_argument("--date", default="", metavar="YYYYMMDD")
    listing.add_argument("--limit", type=_positive, default=100)
    for sub in worklist_actions.choices.values():
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")

    hl7_cmd = command(
        "hl7", cmd_hl7, "HL7 v2: synthetic orders, an MLLP client that prints each ACK, the message log, previews"
    )
    hl7_actions = hl7_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    orm = hl7_actions.add_parser("orm", help="a realistic ORM^O01 for a synthetic patient of the registry")
    orm.add_argument("--modality", default="CT", type=str.upper, choices=MODALITIES)
    _order_arguments(orm)
    orm.add_argument("--version", default="2.5.1", choices=["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"])
    orm.add_argument("--count", type=_positive, default=1)
    orm.add_argument("--out", metavar="DIR", help="write each message to DIR/CONTROL_ID.hl7")
    orm.add_argument("--send", metavar="HOST:PORT", help="send them over MLLP and print the ACKs")
    orm.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    send_hl7 = hl7_actions.add_parser("send", help="send HL7 files over one MLLP connection, printing each ACK")
    send_hl7.add_argument("address", metavar="HOST:PORT")
    send_hl7.add_argument("files", nargs="+", metavar="FILE")
    send_hl7.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    hl7_log = hl7_actions.add_parser("log", help="the HL7 messages received, with their outcome (newest last)")
    hl7_log.add_argument("--outcome", default="", choices=["", "AA", "AE", "AR"], help="only this outcome")
    hl7_log.add_argument("--control-id", default="", help="only messages with this MSH-10")
    hl7_log.add_argument("--since", default="", metavar="DURATION", help="only the last DURATION (`10m`, `2h`)")
    hl7_log.add_argument("--limit", type=_positive, default=50)
    hl7_log.add_argument("--show", type=int, metavar="ID", help="one message whole: the raw text and its ACK")
    preview = hl7_actions.add_parser("preview", help="the worklist items a message would make; nothing is kept")
    preview.add_argument("file", metavar="FILE")
    for sub in (orm, send_hl7):
        sub.add_argument("--tls", action="store_true", help="MLLP over TLS, with the [tls] certificate and ca")
    for sub in hl7_actions.choices.values():
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")

    acquire = command("acquire", cmd_acquire, "have the simulated modality perform a step now (manual, on_query)")
    acquire.add_argument("name", metavar="ACCESSION|SPS_ID")
    acquire.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=600.0,
        metavar="SECONDS",
        help="until the daemon has stored the study (or given up), at most SECONDS (default 600)",
    )
    jobs = command("jobs", cmd_jobs, "acquisition (a1), route (r1) and FHIR (f1) jobs: list, show, retry, cancel")
    job_actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing_jobs = job_actions.add_parser("list", help="newest last")
    listing_jobs.add_argument("kind", nargs="?", default="all", choices=["all", "acquisitions", "routes", "fhir"])
    listing_jobs.add_argument("--state", default="", help="waiting, pending, running, sending, done, failed, canceled")
    listing_jobs.add_argument("--study", default="", metavar="STUDY_UID", help="route and FHIR jobs of one study")
    listing_jobs.add_argument("--limit", type=_positive, default=50)
    for action, text in (
        ("show", "one job or more, whole"),
        ("retry", "failed or canceled jobs due again now"),
        ("cancel", "pending (or waiting) jobs stop here"),
    ):
        job_actions.add_parser(action, help=text).add_argument("ids", nargs="+", metavar="ID")
    for sub in job_actions.choices.values():
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")

    fhir = command("fhir", cmd_fhir, "a stored study as the FHIR transaction Bundle its destinations receive")
    fhir.add_argument("study", metavar="STUDY_UID")
    cleanup = command("cleanup", cmd_cleanup, "delete studies past [dicom] retention, and the oldest over the quota")
    cleanup.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    cleanup.add_argument("--json", action="store_true", help="one JSON object per study")
    nodes = command("nodes", cmd_nodes, "the daemons on this database: name, host, PID, version, last seen, leader")
    nodes.add_argument("--json", action="store_true", help="one JSON object per node")
    trace = command("trace", cmd_trace, "one order's timeline: HL7, worklist, acquisition, MPPS, storage, routes")
    trace.add_argument("accession", metavar="ACCESSION")

    mpps = command("mpps", cmd_mpps, "Modality Performed Procedure Steps that modalities reported, newest last")
    mpps.add_argument("--status", default="", choices=["", "IN PROGRESS", "COMPLETED", "DISCONTINUED"])
    mpps.add_argument("--limit", type=_positive, default=50)

    audit = command("audit", cmd_audit, "the transaction log: associations and DIMSE operations, newest last")
    operations = "ASSOCIATION, C-ECHO, C-STORE, C-FIND, MWL, C-MOVE, C-GET, HTTP, LOGIN"
    audit.add_argument("--operation", default="", help=operations)
    audit.add_argument("--calling-ae", default="")
    audit.add_argument("--user", default="", help="what one console or API user did")
    audit.add_argument("--association", default="", help="one association's ID (first column)")
    audit.add_argument("--since", default="", metavar="DURATION", help="only the last DURATION (`10m`, `2h`)")
    audit.add_argument("--failures", action="store_true", help="only what did not succeed")
    audit.add_argument("--limit", type=_positive, default=100)

    echo_cmd = command("echo", cmd_echo, "C-ECHO a peer ([[peers]] name or AET@host:port)")
    echo_cmd.add_argument("peer")
    send_cmd = command("send", cmd_send, "C-STORE files, folders or a stored study to a peer over one association")
    send_cmd.add_argument("peer")
    send_cmd.add_argument("items", nargs="+", metavar="FILE|DIR|STUDY_UID")
    send_cmd.add_argument("--prod", action="store_true", help='allow a peer with environment = "prod"')

    commit_cmd = command(
        "commit", cmd_commit, "ask a peer for Storage Commitment of a stored study and wait for its report"
    )
    commit_cmd.add_argument("peer", help="[[peers]] name, self, or AET@host:port")
    commit_cmd.add_argument("study", metavar="STUDY_UID")
    commit_cmd.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="longest wait for the report (default 60)"
    )

    key_help = "a query key as DCMTK's -k: Keyword, Keyword=value or (gggg,eeee)=value; repeat it"
    find_cmd = command("find", cmd_find, "C-FIND studies, series or images at one or more peers, side by side")
    find_cmd.add_argument("peers", metavar="PEER[,PEER...]", help="[[peers]] names, self (our node), or AET@host:port")
    find_cmd.add_argument("--level", default="study", choices=["study", "series", "image"])
    find_cmd.add_argument("-k", "--key", dest="keys", action="append", default=[], metavar="KEY[=VALUE]", help=key_help)
    find_cmd.add_argument("--json", action="store_true", help="JSON Lines: one object per match, with its peer")
    find_cmd.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="for each peer (default 30)")
    move_cmd = command("move", cmd_move, "ask a peer to C-MOVE studies to another (or to us)")
    move_cmd.add_argument("--from", dest="source", required=True, metavar="PEER", help="the peer that holds them")
    move_cmd.add_argument(
        "--to", required=True, metavar="DEST", help="a [[peers]] name, self, or an AE title the source knows"
    )
    move_cmd.add_argument("studies", nargs="*", metavar="STUDY_UID")
    move_cmd.add_argument(
        "-k", "--key", dest="keys", action="append", default=[], metavar="KEY=VALUE", help="find the studies first"
    )
    move_cmd.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="longest wait for a word from the source (default: none)"
    )
    move_cmd.add_argument("--prod", action="store_true", help='allow a source or destination with environment = "prod"')
    proxy = command("proxy", cmd_proxy, "anonymizing proxies: keygen prints a new key for a key_file")
    proxy.add_argument("action", choices=["keygen"])
    reidentify = command("reidentify", cmd_reidentify, "a de-identified study's original values, by the proxy's key")
    reidentify.add_argument("study", metavar="STUDY_UID", help="the Study Instance UID as the backend holds it")
    reidentify.add_argument("--out", metavar="DIR", help="also write re-identified files here")
    reidentify.add_argument("--json", action="store_true", help="one JSON object per attribute")
    users = command("users", cmd_users, "who may use the console and the API: add, list, passwd, disable, token")
    user_actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_user = user_actions.add_parser("add", help="a new user with one role")
    add_user.add_argument("name")
    add_user.add_argument("--role", required=True, choices=list(ROLE_NAMES))
    add_user.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    user_actions.add_parser("list", help="every user, with its role and state")
    passwd = user_actions.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    for action, text in (
        ("disable", "the user signs in no more; its sessions and tokens end now"),
        ("enable", "a disabled user may sign in again"),
        ("token", "a new API token for Authorization: Bearer, printed once"),
    ):
        user_actions.add_parser(action, help=text).add_argument("name")
    for sub in user_actions.choices.values():
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except CliError as exc:
        print(f"fabricatord: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
