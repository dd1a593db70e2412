"""The study builder: a request in, the study's instances out, one at a time.

Instances are yielded as they are made so that a 2,000-slice CT holds one slice in memory. The
attributes every image of a series shares are built once; each image starts from a shallow copy
of them and adds its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from fabricatord import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, __version__
from fabricatord.synth.elements import put
from fabricatord.synth.encoding import TRANSFER_SYNTAXES, encode_pixels
from fabricatord.synth.patients import Demographics
from fabricatord.synth.render import BANNER, Canvas, SeriesPainter, TextLine
from fabricatord.synth.templates import TEMPLATES, SeriesPlan, Template
from fabricatord.synth.uids import UidFactory


@dataclass(frozen=True)
class OrderContext:
    """What a worklist item tells the modality, copied into every image as modalities do
    (IHE Scheduled Workflow RAD-8): the Request Attributes Sequence and its neighbours."""

    requested_procedure_id: str
    sps_id: str
    requested_procedure_description: str = ""
    procedure_code: tuple[str, str, str] = ("", "", "")
    """Code value, coding scheme designator, code meaning."""
    sps_description: str = ""
    protocol_code: tuple[str, str, str] = ("", "", "")
    requesting_physician: str = ""
    performing_physician: str = ""
    performed_step_uid: str = ""
    """The MPPS SOP Instance UID (Referenced Performed Procedure Step Sequence)."""
    performed_step_id: str = ""


@dataclass(frozen=True)
class StudyRequest:
    modality: str
    patient: Demographics
    accession_number: str
    series: int = 0
    """0 keeps the template's default; likewise images, rows and columns."""
    images: int = 0
    rows: int = 0
    columns: int = 0
    study_description: str = ""
    transfer_syntax: str = "explicit"
    study_instance_uid: str = ""
    """Empty: a new UID."""
    study_id: str = "1"
    referring_physician_name: str = ""
    institution_name: str = "Fabricatord General Hospital"
    station_name: str = ""
    order: OrderContext | None = None
    """The worklist item this study performs; None for a study made without an order."""


@dataclass(frozen=True)
class StudyPlan:
    request: StudyRequest
    template: Template
    study_instance_uid: str
    frame_of_reference_uid: str
    started: datetime
    series: list[SeriesPlan]
    series_uids: list[str]
    character_set: str | None
    instance_uids: list[list[str]] = field(default_factory=list)

    @property
    def instance_count(self) -> int:
        return sum(s.images for s in self.series)

    @property
    def transfer_syntax_uid(self) -> UID:
        return TRANSFER_SYNTAXES[self.request.transfer_syntax]


def plan_study(request: StudyRequest, rng: random.Random, uid_root: str, now: datetime) -> StudyPlan:
    """Fix every UID and the study's time up front: the same rng gives the same study."""
    template = TEMPLATES[request.modality.upper()]
    if request.transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {request.transfer_syntax!r}")
    uids = UidFactory(uid_root, rng)
    series = template.plans(
        request.series or template.series,
        request.images or template.images,
        request.rows or template.rows,
        request.columns or template.columns,
    )
    study_uid = request.study_instance_uid or uids.new()
    frame_uid = uids.new()
    series_uids = [uids.new() for _ in series]
    instance_uids = [[uids.new() for _ in range(plan.images)] for plan in series]
    # The study happened today, at a time of day drawn from the rng, so a seeded run repeats it.
    started = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(
        seconds=rng.randrange(7 * 3600, 18 * 3600)
    )
    texts = [request.patient.name, request.referring_physician_name, request.study_description]
    charset = None if all(t.isascii() for t in texts) else "ISO_IR 192"
    return StudyPlan(
        request,
        template,
        study_uid,
        frame_uid,
        started,
        series,
        series_uids,
        charset,
        instance_uids,
    )


def build_instances(plan: StudyPlan) -> Iterator[Dataset]:
    """Every instance of the study, in series order, each a complete dataset with file meta."""
    for series_index, series in enumerate(plan.series):
        shared = _series_dataset(plan, series_index)
        meta = _file_meta(plan)
        canvas = Canvas(series.rows, series.columns, plan.template.rgb)
        labels = [plan.template.image_label(series, index) for index in range(series.images)]
        longest = _image_lines(
            series.images, series.images, max(labels, key=len), max(plan.instance_uids[series_index], key=len)
        )
        painter = SeriesPainter(
            canvas,
            _header_lines(plan, series_index),
            longest,
            series.number,
            series.images,
            plan.template.lookup(),
        )
        for index in range(series.images):
            sop_uid = plan.instance_uids[series_index][index]
            ds = Dataset(dict(shared))
            put(ds, "SOPInstanceUID", sop_uid)
            put(ds, "InstanceNumber", str(index + 1))
            plan.template.image_attributes(ds, series, index)
            ds.file_meta = FileMetaDataset(dict(meta))
            put(ds.file_meta, "MediaStorageSOPInstanceUID", sop_uid)
            lines = _image_lines(index + 1, series.images, labels[index], sop_uid)
            encode_pixels(ds, painter.paint(index, lines), plan.transfer_syntax_uid)
            yield ds


# What an image shows, by rank: a small image keeps the lines of lowest rank (docs/conformance.md).
_BANNER, _ACCESSION, _PATIENT, _SOP_UID, _STUDY_UID, _SERIES_UID, _NUMBER, _BORN, _DATE, _STUDY, _SERIES = range(11)


def _header_lines(plan: StudyPlan, series_index: int) -> list[TextLine]:
    """The text every image of the series shares, top to bottom."""
    patient = plan.request.patient
    series = plan.series[series_index]
    # The alphabetic component group: what the shipped font can draw.
    name = patient.name.split("=")[0].replace("^", ", ", 1).replace("^", " ")
    return [
        TextLine(BANNER, _BANNER),
        TextLine(f"Patient: {name}   ID: {patient.patient_id}", _PATIENT),
        TextLine(f"Born: {_dash_date(patient.birth_date)}   Sex: {patient.sex}", _BORN),
        TextLine(f"Accession: {plan.request.accession_number}", _ACCESSION),
        TextLine(f"Date: {plan.started:%Y-%m-%d}   Modality: {plan.template.series_modality}", _DATE),
        TextLine(f"Study: {plan.request.study_description or plan.template.study_description}", _STUDY),
        TextLine(f"Series {series.number}: {series.description}", _SERIES),
        TextLine(plan.study_instance_uid, _STUDY_UID, uid=True, label="Study Instance UID:"),
        TextLine(plan.series_uids[series_index], _SERIES_UID, uid=True, label="Series Instance UID:"),
    ]


def _image_lines(number: int, images: int, label: str, sop_instance_uid: str) -> list[TextLine]:
    """An image's own text, below the series text."""
    return [
        TextLine(f"Image {number} of {images}" + (f"   {label}" if label else ""), _NUMBER),
        TextLine(sop_instance_uid, _SOP_UID, uid=True, label="SOP Instance UID:"),
    ]


def _dash_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 else value


def _file_meta(plan: StudyPlan) -> FileMetaDataset:
    """The file meta every image of the study shares; each adds its own SOP Instance UID."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(plan.template.sop_class_uid)
    meta.TransferSyntaxUID = plan.transfer_syntax_uid
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _series_dataset(plan: StudyPlan, series_index: int) -> Dataset:
    request, template, series = plan.request, plan.template, plan.series[series_index]
    patient = request.patient
    when = plan.started + timedelta(minutes=2 * series_index)
    ds = Dataset()
    if plan.character_set:
        ds.SpecificCharacterSet = plan.character_set
    # SOP Common (PS3.3 C.12.1)
    ds.SOPClassUID = template.sop_class_uid
    ds.InstanceCreationDate = f"{when:%Y%m%d}"
    ds.InstanceCreationTime = f"{when:%H%M%S}"
    # Patient (C.7.1.1) and Patient Study (C.7.2.2)
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{min(patient.age_years, 999):03d}Y"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = plan.study_instance_uid
    ds.StudyDate = f"{plan.started:%Y%m%d}"
    ds.StudyTime = f"{plan.started:%H%M%S}"
    ds.ReferringPhysicianName = request.referring_physician_name
    ds.StudyID = request.study_id
    ds.AccessionNumber = request.accession_number
    ds.StudyDescription = request.study_description or template.study_description
    # General Series (C.7.3.1)
    ds.Modality = template.series_modality
    ds.SeriesInstanceUID = plan.series_uids[series_index]
    ds.SeriesNumber = str(series.number)
    ds.SeriesDate = f"{when:%Y%m%d}"
    ds.SeriesTime = f"{when:%H%M%S}"
    ds.SeriesDescription = series.description
    # Frame of Reference (C.7.4.1), only where the IOD has one
    if template.modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "fabricatord"
    ds.ManufacturerModelName = f"Synthetic {template.modality}"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = request.institution_name
    ds.StationName = request.station_name or f"{template.modality}01"
    # General Image (C.7.6.1) and General Acquisition (C.7.10.1)
    ds.ContentDate = f"{when:%Y%m%d}"
    ds.ContentTime = f"{when:%H%M%S}"
    ds.AcquisitionDate = f"{when:%Y%m%d}"
    ds.AcquisitionTime = f"{when:%H%M%S}"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # The pixels show the patient's name: say so (PS3.3 C.7.6.1.1.5).
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 3 if template.rgb else 1
    ds.PhotometricInterpretation = template.photometric
    ds.Rows = series.rows
    ds.Columns = series.columns
    ds.BitsAllocated = 8 if template.bits_stored <= 8 else 16
    ds.BitsStored = template.bits_stored
    ds.HighBit = template.bits_stored - 1
    ds.PixelRepresentation = 0
    if template.window is not None:
        ds.WindowCenter, ds.WindowWidth = (str(v) for v in template.window)
    template.series_attributes(ds, series)
    if request.order is not None:
        _order_attributes(ds, request)
    return ds


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _order_attributes(ds: Dataset, request: StudyRequest) -> None:
    """PS3.3 C.7.3.1 (Request Attributes, Performed Procedure Step Summary) and C.7.2.1."""
    order = request.order
    assert order is not None
    if order.procedure_code[0]:
        ds.ProcedureCodeSequence = [_code_item(order.procedure_code)]
    if order.performing_physician:
        ds.PerformingPhysicianName = order.performing_physician
    if order.requesting_physician:
        ds.RequestingPhysician = order.requesting_physician
    attributes = Dataset()
    attributes.RequestedProcedureID = order.requested_procedure_id
    attributes.AccessionNumber = request.accession_number
    attributes.StudyInstanceUID = ds.StudyInstanceUID
    if order.requested_procedure_description:
        attributes.RequestedProcedureDescription = order.requested_procedure_description
    if order.procedure_code[0]:
        attributes.RequestedProcedureCodeSequence = [_code_item(order.procedure_code)]
    attributes.ScheduledProcedureStepID = order.sps_id
    if order.sps_description:
        attributes.ScheduledProcedureStepDescription = order.sps_description
    if order.protocol_code[0]:
        attributes.ScheduledProtocolCodeSequence = [_code_item(order.protocol_code)]
    ds.RequestAttributesSequence = [attributes]
    if order.performed_step_uid:
        reference = Dataset()
        reference.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
        reference.ReferencedSOPInstanceUID = order.performed_step_uid
        ds.ReferencedPerformedProcedureStepSequence = [reference]
    if order.performed_step_id:
        ds.PerformedProcedureStepID = order.performed_step_id
        ds.PerformedProcedureStepStartDate = ds.StudyDate
        ds.PerformedProcedureStepStartTime = ds.StudyTime
