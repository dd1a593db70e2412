"""Making a synthetic study: counters and patients from the database, pixels from synth, files
through the atomic writer (or into a folder of the user's)."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from fabricatord.config import Settings
from fabricatord.db import Database, PatientRecord, PatientRegistry, Sequences
from fabricatord.dicom.part10 import Part10Encoder
from fabricatord.dicom.storage import InstanceWriter, relative_path
from fabricatord.obs import metrics
from fabricatord.synth.builder import OrderContext, StudyRequest, build_instances, plan_study
from fabricatord.synth.patients import Demographics, make_patient
from fabricatord.synth.patterns import Pattern
from fabricatord.synth.templates import TEMPLATES

T = TypeVar("T")
PATIENT_COUNTER = "patient_id"
ACCESSION_COUNTER = "accession"
STUDY_COUNTER = "study"
"""Counts generated studies: with a seed, study n draws from Random(f"{seed}:study:{n}")."""


@dataclass(frozen=True)
class GenerateOptions:
    modality: str
    series: int = 0
    images: int = 0
    rows: int = 0
    columns: int = 0
    study_description: str = ""
    patient_id: str = ""
    accession_number: str = ""
    transfer_syntax: str = ""
    out_dir: Path | None = None
    issuer: str = ""
    """The issuer of `patient_id`; empty: `[synth] issuer_of_patient_id`."""
    study_instance_uid: str = ""
    """An ordered study's UID: the study is then drawn from it, so making it again repeats it."""
    study_id: str = ""
    referring_physician: str = ""
    station_name: str = ""
    order: OrderContext | None = None


@dataclass(frozen=True)
class MadeInstance:
    """What an MPPS N-SET lists of each instance it made."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    series_description: str


@dataclass
class GeneratedStudy:
    study_instance_uid: str
    accession_number: str
    patient: Demographics
    modality: str
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    patient_created: bool = False
    made: list[MadeInstance] = field(default_factory=list)


# The registry's record and synth's demographics have the same fields: synth stays free of the
# database, and the two convert by name.
def demographics(record: PatientRecord) -> Demographics:
    return Demographics(**asdict(record))


def _record(patient: Demographics) -> PatientRecord:
    return PatientRecord(**asdict(patient))


class StudyGenerator:
    def __init__(self, settings: Settings, database: Database, writer: InstanceWriter | None = None) -> None:
        self._settings = settings
        self._sequences = Sequences(database)
        self._patients = PatientRegistry(database)
        self._writer = writer
        self._patient_pattern = Pattern.parse(settings.synth.patient_id_pattern)
        self._accession_pattern = Pattern.parse(settings.synth.accession_pattern)

    def _rng(self, purpose: str) -> random.Random:
        """A random source per study or patient: reproducible under a seed, fresh otherwise."""
        seed = self._settings.synth.seed
        if seed is None:
            return random.Random()
        counter = self._sequences.take(purpose, 1, 1)[0]
        return random.Random(f"{seed}:{purpose}:{counter}")

    def new_patient(self, patient_id: str = "", sex: str | None = None, issuer: str = "") -> tuple[Demographics, bool]:
        """The registered patient with `patient_id`, or a new synthetic one; True when new."""
        synth = self._settings.synth
        if patient_id:
            found = self._patients.get(patient_id, issuer or synth.issuer_of_patient_id)
            if found is not None:
                return demographics(found), False
        rng = self._rng("patient")
        if not patient_id:
            counter = None
            if self._patient_pattern.counter_width is not None:
                counter = self._sequences.take(PATIENT_COUNTER, synth.patient_id_start, synth.patient_id_step)[0]
            patient_id = self._patient_pattern.render(counter, date.today(), rng)
        made = make_patient(
            patient_id,
            synth.issuer_of_patient_id,
            rng,
            date.today(),
            synth.locale,
            synth.min_age,
            synth.max_age,
            sex,
        )
        stored = self._patients.add(_record(made))
        created = stored == _record(made)
        if created:
            metrics.PATIENTS_CREATED.inc()
        return demographics(stored), created

    def next_accession(self, rng: random.Random) -> str:
        synth = self._settings.synth
        counter = None
        if self._accession_pattern.counter_width is not None:
            counter = self._sequences.take(ACCESSION_COUNTER, synth.accession_start, synth.accession_step)[0]
        return self._accession_pattern.render(counter, date.today(), rng)

    def generate(self, options: GenerateOptions, progress: Callable[[int], None] | None = None) -> GeneratedStudy:
        started = time.perf_counter()
        modality = options.modality.upper()
        if modality not in TEMPLATES:
            raise ValueError(f"unknown modality {options.modality!r} (known: {', '.join(TEMPLATES)})")
        override = self._settings.modality(modality)
        patient, created = self.new_patient(options.patient_id, TEMPLATES[modality].patient_sex, options.issuer)
        rng = random.Random(options.study_instance_uid) if options.study_instance_uid else self._rng(STUDY_COUNTER)
        accession = options.accession_number or self.next_accession(rng)
        request = StudyRequest(
            modality=modality,
            patient=patient,
            accession_number=accession,
            series=options.series or override.series,
            images=options.images or override.images,
            rows=options.rows or override.rows,
            columns=options.columns or override.columns,
            study_description=options.study_description or override.study_description,
            transfer_syntax=options.transfer_syntax or override.transfer_syntax or self._settings.synth.transfer_syntax,
            institution_name=self._settings.synth.institution_name,
            study_instance_uid=options.study_instance_uid,
            study_id=options.study_id or "1",
            referring_physician_name=options.referring_physician,
            station_name=options.station_name,
            order=options.order,
        )
        plan = plan_study(request, rng, self._settings.node.uid_root, datetime.now())
        result = GeneratedStudy(plan.study_instance_uid, accession, patient, modality, patient_created=created)
        instances = _noted(_counted(build_instances(plan), modality), result.made)
        # Rendering and encoding run a step ahead on their own thread while this one writes and
        # fsyncs: the disk work releases the GIL, so the two overlap. Two slices in flight keep
        # memory flat.
        with metrics.STUDY_GENERATION_SECONDS.labels(modality).time():
            if options.out_dir is not None:
                writes = self._write_folder(prefetch(instances, depth=2), options.out_dir)
            elif self._writer is not None:
                writer = self._writer
                encoded = prefetch((writer.prepare(ds, "generated") for ds in instances), depth=2)
                writes = ((w.path, w.size) for w in writer.write_many(encoded, "generated"))
            else:
                raise ValueError("no storage and no output folder to write to")
            for path, size in writes:
                result.files.append(path)
                result.bytes += size
                if progress is not None:
                    progress(1)
        result.seconds = time.perf_counter() - started
        return result

    def _write_folder(self, instances: Iterator[Dataset], out_dir: Path) -> Iterator[tuple[Path, int]]:
        """Plain files for the user to take elsewhere: not indexed, named like storage."""
        encoder = Part10Encoder()
        for ds in instances:
            target = out_dir / relative_path(ds, "study/series")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = encoder.encode(ds)
            target.write_bytes(data)
            yield target, len(data)


_DONE = object()


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Iterate `items` on a worker thread, at most `depth` ahead of the consumer."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def _noted(instances: Iterator[Dataset], made: list[MadeInstance]) -> Iterator[Dataset]:
    for ds in instances:
        made.append(
            MadeInstance(
                str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SeriesDescription)
            )
        )
        yield ds


def _counted(instances: Iterator[Dataset], modality: str) -> Iterator[Dataset]:
    counter = metrics.INSTANCES_GENERATED.labels(modality)
    for ds in instances:
        yield ds
        counter.inc()
