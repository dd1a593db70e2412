"""Modality templates: for each modality the SOP class, its IOD's modules and a typical study.

Each template knows which attributes its IOD requires beyond the common modules (PS3.3 A.*),
what a user expects with no options (a two-view chest, an axial CT …), and how its pixels are
stored.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from fabricatord.synth.elements import put
from fabricatord.synth.render import lookup_table


@dataclass(frozen=True)
class View:
    """One projection image of CR, DX or MG."""

    name: str
    view_position: str
    patient_orientation: str
    laterality: str = ""
    view_code: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class SeriesPlan:
    number: int
    description: str
    images: int
    rows: int
    columns: int
    views: tuple[View, ...] = ()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


class Template:
    modality: str
    series_modality: str
    sop_class_uid: str
    study_description: str
    body_part: str
    series: int
    images: int
    rows: int
    columns: int
    bits_stored = 16
    rgb = False
    photometric = "MONOCHROME2"
    window: tuple[int, int] | None = None
    patient_sex: str | None = None
    """The sex of a new patient made for this modality; None: either."""

    def plans(self, series: int, images: int, rows: int, columns: int) -> list[SeriesPlan]:
        return [SeriesPlan(n, self.series_description(n), images, rows, columns) for n in range(1, series + 1)]

    def series_description(self, number: int) -> str:
        return f"{self.modality} series {number}"

    def lookup(self) -> NDArray[np.uint16] | None:
        """Drawn grey level → stored value; None keeps the 8-bit drawing as it is."""
        top = (1 << self.bits_stored) - 1
        return lookup_table(0, top // 4, top * 3 // 5, top, self.bits_stored)

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        """Attributes shared by every image of a series, beyond the common modules."""

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        """Attributes of image `index` (from 0) of its series."""

    def image_label(self, plan: SeriesPlan, index: int) -> str:
        """What the image's own text says after its number, such as its view."""
        return ""


class _Projection(Template, abc.ABC):
    """CR, DX and MG: a handful of projection images, one view each."""

    bits_stored = 12
    pixel_spacing = "0.2"

    @abc.abstractmethod
    def default_views(self) -> tuple[View, ...]:
        """The views of one series, cycled when more images are asked for."""

    def plans(self, series: int, images: int, rows: int, columns: int) -> list[SeriesPlan]:
        views = self.default_views()
        plans = []
        for number in range(1, series + 1):
            chosen = tuple(views[(i) % len(views)] for i in range(images))
            description = "/".join(dict.fromkeys(v.name for v in chosen))
            plans.append(SeriesPlan(number, description, images, rows, columns, chosen))
        return plans

    def image_label(self, plan: SeriesPlan, index: int) -> str:
        return plan.views[index].name

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        view = plan.views[index]
        put(ds, "ViewPosition", view.view_position)
        put(ds, "PatientOrientation", view.patient_orientation)
        if view.laterality:
            put(ds, "ImageLaterality", view.laterality)


class CRTemplate(_Projection):
    modality = series_modality = "CR"
    sop_class_uid = ComputedRadiographyImageStorage
    study_description = "XR CHEST 2 VIEWS"
    body_part = "CHEST"
    series, images, rows, columns = 1, 2, 2140, 1760
    window = (2048, 4096)

    def default_views(self) -> tuple[View, ...]:
        return (View("PA", "PA", "L\\F"), View("LATERAL", "LL", "A\\F"))

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        ds.BodyPartExamined = self.body_part
        ds.KVP = "120"
        ds.PlateType = "SYNTHETIC"
        ds.ImagerPixelSpacing = [self.pixel_spacing, self.pixel_spacing]


class DXTemplate(_Projection):
    modality = series_modality = "DX"
    sop_class_uid = DigitalXRayImageStorageForPresentation
    study_description = "XR CHEST 2 VIEWS"
    body_part = "CHEST"
    series, images, rows, columns = 1, 2, 2140, 1760
    window = (2048, 4096)
    anatomy = ("51185008", "SCT", "Chest")

    def default_views(self) -> tuple[View, ...]:
        return (
            View("PA", "PA", "L\\F", "U", ("399348003", "SCT", "postero-anterior")),
            View("LATERAL", "LL", "A\\F", "U", ("399173006", "SCT", "left lateral")),
        )

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.BodyPartExamined = self.body_part
        ds.AnatomicRegionSequence = Sequence([_code(*self.anatomy)])
        # PS3.3 C.8.11.3: DX Image module.
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        # PS3.3 C.8.11.4: DX Detector module.
        ds.DetectorType = "DIRECT"
        ds.ImagerPixelSpacing = [self.pixel_spacing, self.pixel_spacing]
        ds.AcquisitionContextSequence = Sequence()
        ds.PositionerType = "COLUMN"
        ds.KVP = "120"

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        super().image_attributes(ds, plan, index)
        view = plan.views[index]
        if view.view_code is not None:
            item = _code(*view.view_code)
            item.ViewModifierCodeSequence = Sequence()
            ds.ViewCodeSequence = Sequence([item])


class MGTemplate(DXTemplate):
    modality = series_modality = "MG"
    sop_class_uid = DigitalMammographyXRayImageStorageForPresentation
    study_description = "MG SCREENING BILATERAL"
    body_part = "BREAST"
    series, images, rows, columns = 1, 4, 2560, 2048
    pixel_spacing = "0.1"
    anatomy = ("76752008", "SCT", "Breast")
    patient_sex = "F"

    def default_views(self) -> tuple[View, ...]:
        cc = ("399162004", "SCT", "cranio-caudal")
        mlo = ("399368009", "SCT", "medio-lateral oblique")
        return (
            View("RCC", "CC", "L\\H", "R", cc),
            View("LCC", "CC", "R\\H", "L", cc),
            View("RMLO", "MLO", "A\\F", "R", mlo),
            View("LMLO", "MLO", "P\\F", "L", mlo),
        )

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        super().series_attributes(ds, plan)
        # PS3.3 C.8.11.7: Mammography Image module.
        ds.PositionerType = "MAMMOGRAPHIC"
        ds.OrganExposed = "BREAST"
        ds.BreastImplantPresent = "NO"

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        super().image_attributes(ds, plan, index)
        # DX's View Position terms have no mammography views; the View Code Sequence says it.
        del ds.ViewPosition


class _Sectional(Template):
    """CT and MR: stacks of parallel slices in one frame of reference."""

    slice_thickness = 2.5
    pixel_spacing = 0.7
    orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    plane = "AXIAL"

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        ds.BodyPartExamined = self.body_part
        ds.PatientPosition = "HFS"
        ds.PositionReferenceIndicator = ""
        ds.PixelSpacing = [f"{self.pixel_spacing:g}", f"{self.pixel_spacing:g}"]
        ds.SliceThickness = f"{self.slice_thickness:g}"
        ds.ImageOrientationPatient = [f"{v:g}" for v in self.orientation]

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        row, column = self.orientation[:3], self.orientation[3:]
        normal = np.cross(row, column)
        half_width = plan.columns * self.pixel_spacing / 2
        half_height = plan.rows * self.pixel_spacing / 2
        start = -(plan.images - 1) * self.slice_thickness / 2
        location = start + index * self.slice_thickness
        corner = -half_width * np.array(row) - half_height * np.array(column) + location * normal
        put(ds, "ImagePositionPatient", [f"{v:.2f}" for v in corner])
        put(ds, "SliceLocation", f"{location:.2f}")


class CTTemplate(_Sectional):
    modality = series_modality = "CT"
    sop_class_uid = CTImageStorage
    study_description = "CT CHEST WITHOUT CONTRAST"
    body_part = "CHEST"
    series, images, rows, columns = 1, 120, 512, 512
    bits_stored = 12
    window = (40, 400)

    def series_description(self, number: int) -> str:
        return "AXIAL 2.5MM" if number == 1 else f"AXIAL 2.5MM RECON {number}"

    def lookup(self) -> NDArray[np.uint16]:
        # Stored = HU + 1024: air -1000, soft tissue 40, contrast-bright 300, text 2000 HU.
        return lookup_table(24, 1064, 1324, 3024, self.bits_stored)

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        super().series_attributes(ds, plan)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.AcquisitionNumber = "1"
        ds.ConvolutionKernel = "STANDARD"


class MRTemplate(_Sectional):
    modality = series_modality = "MR"
    sop_class_uid = MRImageStorage
    study_description = "MR BRAIN WITHOUT CONTRAST"
    body_part = "HEAD"
    series, images, rows, columns = 3, 20, 256, 256
    pixel_spacing = 0.9
    slice_thickness = 5.0
    bits_stored = 12  # as MR scanners store them, and what the window spans: 16 bits left all of it white
    window = (2048, 4096)
    # (description, scanning sequence, TR, TE, TI) per series, cycled when more are asked for.
    protocols = (
        ("T1 AXIAL", "SE", "500", "15", None),
        ("T2 AXIAL", "SE", "4000", "100", None),
        ("FLAIR AXIAL", "IR", "9000", "120", "2500"),
    )

    def series_description(self, number: int) -> str:
        return self.protocols[(number - 1) % len(self.protocols)][0]

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        super().series_attributes(ds, plan)
        _, sequence, tr, te, ti = self.protocols[(plan.number - 1) % len(self.protocols)]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = sequence
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = tr
        ds.EchoTime = te
        if ti is not None:
            ds.InversionTime = ti
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        ds.AcquisitionNumber = "1"


class USTemplate(Template):
    modality = series_modality = "US"
    sop_class_uid = UltrasoundImageStorage
    study_description = "US ABDOMEN COMPLETE"
    body_part = "ABDOMEN"
    series, images, rows, columns = 1, 4, 480, 640
    bits_stored = 8
    rgb = True
    photometric = "RGB"

    def lookup(self) -> None:
        return None

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        ds.BodyPartExamined = self.body_part
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
        ds.PlanarConfiguration = 0

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        put(ds, "PatientOrientation", "")


class SCTemplate(Template):
    modality = "SC"
    series_modality = "OT"
    sop_class_uid = SecondaryCaptureImageStorage
    study_description = "SECONDARY CAPTURE"
    body_part = "CHEST"
    series, images, rows, columns = 1, 1, 768, 1024
    bits_stored = 8

    def lookup(self) -> None:
        return None

    def series_attributes(self, ds: Dataset, plan: SeriesPlan) -> None:
        # PS3.3 C.8.6.1: the image was made, not acquired.
        ds.ConversionType = "SYN"
        ds.BodyPartExamined = self.body_part

    def image_attributes(self, ds: Dataset, plan: SeriesPlan, index: int) -> None:
        put(ds, "PatientOrientation", "")


TEMPLATES: dict[str, Template] = {
    t.modality: t
    for t in (
        CRTemplate(),
        DXTemplate(),
        CTTemplate(),
        MRTemplate(),
        USTemplate(),
        MGTemplate(),
        SCTemplate(),
    )
}
MODALITIES = tuple(TEMPLATES)
