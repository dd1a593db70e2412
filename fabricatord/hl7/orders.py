"""ORM^O01 orders as a real order placer sends them, in the layout fabricatord's default
profile reads (IHE Scheduled Workflow): PID-3 with its issuer, the accession in OBR-18, the
requested procedure ID in OBR-19, the SPS ID in OBR-20, the modality in OBR-24, the start in
ORC-7.4 and OBR-27.4 (ORM^O01 has no TQ1; OMI^O23 has), the Study Instance UID in ZDS-1.

Text is escaped for the standard encoding characters (HL7 v2 §2.7); anything beyond ASCII is
sent as UTF-8 with MSH-18 saying so (python-hl7's `escape` would turn it into `\\X..\\` hex, which
order fillers seldom read). DICOM person names become XPN/XCN components, and a name with
ideographic and phonetic groups becomes three repetitions with representation codes A, I, P.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fabricatord.hl7.codec import escape

ENCODING_CHARACTERS = "^~\\&"


@dataclass(frozen=True)
class OrderMessage:
    """What an ORM^O01 carries: one patient, one order, one requested procedure, one step."""

    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    accession_number: str
    requested_procedure_id: str
    sps_id: str
    study_instance_uid: str
    modality: str
    start: datetime
    placer_order_number: str
    filler_order_number: str
    procedure_code: tuple[str, str, str]
    """Code value, coding scheme, meaning (OBR-4 components 1–3)."""
    procedure_description: str = ""
    address: str = ""
    phone: str = ""
    referring_physician: str = ""
    requesting_physician: str = ""
    performing_physician: str = ""
    priority: str = "R"


def _person(name: str, with_id: bool = False) -> str:
    """A DICOM PN as XPN (or XCN, whose first component is an ID we do not have)."""
    if not name:
        return ""
    groups = [group for group in name.split("=") if group]
    repetitions = []
    for group, code in zip(groups, "AIP", strict=False):
        components = [escape(part) for part in group.split("^")]
        if len(groups) > 1:  # XPN-7 name type L(egal), XPN-8 representation A, I or P
            components = [*(components + [""] * 6)[:6], "L", code]
        repetitions.append(("^" if with_id else "") + "^".join(components).rstrip("^"))
    return "~".join(repetitions)


def _components(*values: str) -> str:
    return "^".join(escape(v) for v in values).rstrip("^")


def orm_o01(
    order: OrderMessage,
    control_id: str,
    sent_at: datetime,
    version: str = "2.5.1",
    sending: tuple[str, str] = ("FABRICATORD", "FABRICATORD"),
    receiving: tuple[str, str] = ("RIS", "HOSPITAL"),
) -> str:
    """The message, segments separated by CR as on the wire."""
    start = order.start.strftime("%Y%m%d%H%M%S")
    non_ascii = any(not str(value).isascii() for value in vars(order).values())
    msh = [
        "MSH",
        ENCODING_CHARACTERS,
        escape(sending[0]),
        escape(sending[1]),
        escape(receiving[0]),
        escape(receiving[1]),
        sent_at.strftime("%Y%m%d%H%M%S"),
        "",
        "ORM^O01" if version < "2.4" else "ORM^O01^ORM_O01",
        escape(control_id),
        "P",
        version,
        "",
        "",
        "",  # MSH-15/16 empty: original acknowledgment mode, the ACK after the order is kept
        "",
        "",
        "UNICODE UTF-8" if non_ascii else "",
    ]
    code_value, code_scheme, code_meaning = order.procedure_code
    procedure = _components(code_value, code_meaning or order.procedure_description, code_scheme)
    segments = [
        "|".join(msh).rstrip("|"),
        "|".join(
            [
                "PID",
                "1",
                "",
                _components(order.patient_id, "", "", order.issuer),
                "",
                _person(order.patient_name),
                "",
                order.birth_date,
                order.sex,
                "",
                "",
                escape(order.address),
                "",
                escape(order.phone),
            ]
        ).rstrip("|"),
        "|".join(["PV1", "1", "O", "", "", "", "", "", _person(order.referring_physician, with_id=True)]).rstrip("|"),
        "|".join(
            [
                "ORC",
                "NW",
                escape(order.placer_order_number),
                escape(order.filler_order_number),
                "",
                "SC",
                "",
                f"^^^{start}^^{order.priority}",
            ]
        ),
    ]
    obr = ["OBR", "1", escape(order.placer_order_number), escape(order.filler_order_number), procedure]
    obr += [""] * 11 + [_person(order.requesting_physician, with_id=True)]  # OBR-16
    obr += ["", escape(order.accession_number), escape(order.requested_procedure_id), escape(order.sps_id)]  # 17–20
    obr += ["", "", "", order.modality, "", "", f"^^^{start}^^{order.priority}"]  # 21–27
    obr += [""] * 6 + [_person(order.performing_physician, with_id=True)]  # 28–34
    segments.append("|".join(obr).rstrip("|"))
    segments.append(f"ZDS|{order.study_instance_uid}^FABRICATORD^Application^DICOM")
    return "\r".join(segments)
