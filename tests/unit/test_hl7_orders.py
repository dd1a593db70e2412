"""ORM^O01 as fabricatord writes it, read back by python-hl7 field by field."""

from __future__ import annotations

from datetime import datetime

import hl7
import pytest

from fabricatord.hl7.orders import OrderMessage, orm_o01

ORDER = OrderMessage(
    patient_id="PID0000042",
    issuer="FABRICATORD",
    patient_name="O'Brien^Mary&Ann^Q",
    birth_date="19700101",
    sex="F",
    accession_number="2026AB0000042",
    requested_procedure_id="RP0000042",
    sps_id="SPS0000042",
    study_instance_uid="2.25.42",
    modality="CT",
    start=datetime(2026, 11, 23, 14, 30),
    placer_order_number="PO0000042",
    filler_order_number="2026AB0000042",
    procedure_code=("CTHD", "99LOCAL", "CT Head|Neck"),
    referring_physician="House^Gregory",
    requesting_physician="Cuddy^Lisa",
    performing_physician="Chase^Robert",
)


def _parse(text: str) -> hl7.Message:
    return hl7.parse(text)


@pytest.mark.parametrize(("version", "message_type"), [("2.3", "ORM^O01"), ("2.5.1", "ORM^O01^ORM_O01")])
def test_fields_where_the_default_profile_reads_them(version: str, message_type: str) -> None:
    message = _parse(orm_o01(ORDER, "CTRL1", datetime(2026, 11, 23, 14, 0), version))
    assert str(message.segment("MSH")[9]) == message_type and str(message.segment("MSH")[12]) == version
    assert str(message.segment("MSH")[10]) == "CTRL1"
    pid = message.segment("PID")
    assert (str(pid[3][0][0]), str(pid[3][0][3])) == ("PID0000042", "FABRICATORD")
    # Escaped on the wire, whole again for the parser's unescape.
    assert message.unescape(str(pid[5][0][1])) == "Mary&Ann" and str(pid[5][0][0]) == "O'Brien"
    assert (str(pid[7]), str(pid[8])) == ("19700101", "F")
    assert str(message.segment("PV1")[8][0][1]) == "House"
    orc = message.segment("ORC")
    assert (str(orc[1]), str(orc[2]), str(orc[3]), str(orc[7][0][3])) == (
        "NW",
        "PO0000042",
        "2026AB0000042",
        "20261123143000",
    )
    obr = message.segment("OBR")
    assert str(obr[4][0][0]) == "CTHD" and message.unescape(str(obr[4][0][1])) == "CT Head|Neck"
    assert [str(obr[n]) for n in (18, 19, 20, 24)] == ["2026AB0000042", "RP0000042", "SPS0000042", "CT"]
    assert str(obr[16][0][1]) == "Cuddy" and str(obr[34][0][1]) == "Chase"
    assert str(obr[27][0][3]) == "20261123143000"
    assert str(message.segment("ZDS")[1][0][0]) == "2.25.42"
    msh = message.segment("MSH")
    assert len(msh) <= 18 or str(msh[18]) == ""  # ASCII only: no character set named


def test_names_beyond_ascii_go_as_utf8_repetitions() -> None:
    order = OrderMessage(**{**vars(ORDER), "patient_name": "Yamada^Tarou=山田^太郎=やまだ^たろう"})
    text = orm_o01(order, "CTRL2", datetime(2026, 11, 23), "2.5.1")
    message = _parse(text)
    assert str(message.segment("MSH")[18]) == "UNICODE UTF-8"
    names = message.segment("PID")[5]
    assert [str(names[n][0]) for n in range(3)] == ["Yamada", "山田", "やまだ"]
    assert [str(names[n][7]) for n in range(3)] == ["A", "I", "P"]
    assert "\\X" not in text  # no hex escapes: the characters themselves
