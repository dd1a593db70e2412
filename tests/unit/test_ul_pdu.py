"""The upper layer's PDU codec, checked against pynetdicom's, an independent encoder and decoder
of the same PS3.8 layouts: what one writes the other must read the same."""

from __future__ import annotations

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context

from fabricatord.dicom.ul import pdu
from fabricatord.dicom.ul.pdu import (
    Abort,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextAnswer,
    ContextResult,
    PData,
    PduError,
    Pdv,
    ReleaseRequest,
    ReleaseResponse,
    RoleSelection,
    UserInformation,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"


def pynetdicom_request() -> bytes:
    """An A-ASSOCIATE-RQ with every item a requestor may send, encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "FABRICATORD"
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    contexts = [build_context(VERIFICATION), build_context(CT, [JPEG, EXPLICIT])]
    contexts[0].context_id, contexts[1].context_id = 1, 3
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "OFFIS_DCMTK_367"
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CT, False, True
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.positive_response_requested = 2, True
    identity.primary_field, identity.secondary_field = b"alice", b"secret"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked, window.maximum_number_operations_performed = 5, 3
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid, extended.service_class_application_information = "1.2.840.10008.5.1.4.1.2.2.1", b"\x01\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid, common.service_class_uid = CT, "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    primitive.user_information = [maximum, implementation, version, role, identity, window, extended, common]
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(primitive)
    return bytes(encoded.encode())


def decoded(raw: bytes) -> pdu.Pdu:
    kind, _, length = pdu.HEADER.unpack_from(raw)
    assert length == len(raw) - 6
    return pdu.decode(kind, raw[6:])


def test_a_request_pynetdicom_writes_reads_item_by_item() -> None:
    request = decoded(pynetdicom_request())
    assert isinstance(request, AssociateRequest)
    assert (request.calling, request.called, request.protocol_version) == ("MODALITY", "FABRICATORD", 1)
    assert request.application_context == pdu.APPLICATION_CONTEXT
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, VERIFICATION, (IMPLICIT, EXPLICIT, "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")),
        (3, CT, (JPEG, EXPLICIT)),
    ]
    user = request.user
    assert (user.max_length, user.implementation_class_uid, user.implementation_version_name) == (
        16384,
        "1.2.3.4",
        "OFFIS_DCMTK_367",
    )
    assert user.roles == [RoleSelection(CT, False, True)] and user.async_window == (5, 3)
    assert user.identity == pdu.UserIdentity(2, True, b"alice", b"secret")
    assert user.extended == {"1.2.840.10008.5.1.4.1.2.2.1": b"\x01\x01"}
    assert user.common_extended == [
        pdu.CommonExtendedNegotiation(CT, "1.2.840.10008.4.2", ("1.2.840.10008.5.1.4.1.1.2.1",))
    ]


def test_our_request_is_the_bytes_pynetdicom_writes() -> None:
    raw = pynetdicom_request()
    request = decoded(raw)
    assert isinstance(request, AssociateRequest)
    again = decoded(pdu.encode(request))
    assert again == request


def test_an_accept_we_write_is_read_by_pynetdicom() -> None:
    user = UserInformation(
        max_length=65536, implementation_class_uid="1.2.826.0.1.3680043.10.1438.1", implementation_version_name="FAB"
    )
    user.roles.append(RoleSelection(CT, False, True))
    accept = AssociateAccept(
        b"FABRICATORD".ljust(16),
        b"MODALITY".ljust(16),
        [
            ContextAnswer(1, ContextResult.ACCEPTANCE, IMPLICIT),
            ContextAnswer(3, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEG),
        ],
        user,
    )
    theirs = A_ASSOCIATE_AC()
    theirs.decode(pdu.encode(accept))
    primitive = theirs.to_primitive()
    assert primitive.result == 0 and primitive.application_context_name == pdu.APPLICATION_CONTEXT
    contexts = primitive.presentation_context_definition_results_list
    assert [(c.context_id, c.result, c.transfer_syntax[0]) for c in contexts] == [(1, 0, IMPLICIT), (3, 4, JPEG)]
    items = {type(item).__name__: item for item in primitive.user_information}
    assert items["MaximumLengthNotification"].maximum_length_received == 65536
    assert items["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.826.0.1.3680043.10.1438.1"
    role = items["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, False, True)
    assert decoded(pdu.encode(accept)) == accept


@pytest.mark.parametrize(
    "message",
    [AssociateReject(1, 1, 7), Abort(2, 6), ReleaseRequest(), ReleaseResponse()],
)
def test_the_short_pdus_go_and_come_back(message: pdu.Pdu) -> None:
    raw = pdu.encode(message)
    assert len(raw) == 10 and decoded(raw) == message


def test_p_data_values_are_views_in_order() -> None:
    one = pdu.p_data_header(3, 0x03, 4) + b"\x01\x02\x03\x04"
    (value,) = pdu.pdvs(one[6:])
    assert value == Pdv(3, 3, memoryview(b"\x01\x02\x03\x04")) and value.is_command and value.is_last
    two = pdu.encode(PData([Pdv(1, 0, b"ab"), Pdv(1, 2, b"")]))
    assert pdu.HEADER.unpack_from(two) == (4, 0, 14)
    assert [(v.context_id, v.is_command, v.is_last, bytes(v.data)) for v in pdu.pdvs(two[6:])] == [
        (1, False, False, b"ab"),
        (1, False, True, b""),
    ]


@pytest.mark.parametrize(
    ("kind", "body", "said"),
    [
        (0x09, b"", "PDU type 0x09 does not exist"),
        (0x04, b"", "without a presentation data value"),
        (0x04, b"\x00\x00\x00\x01\x01", "PDV header cut short"),
        (0x04, b"\x00\x00\x00\x09\x01\x03ab", "does not fit its PDU"),
        (0x01, b"\x00\x01" + bytes(60), "shorter than its 68 fixed ones"),
        (0x01, b"\x00\x01" + bytes(66) + b"\x10\x00\x00\x09abc", "overruns the A-ASSOCIATE-RQ"),
        (0x01, b"\x00\x01" + bytes(66) + b"\x50\x00\x00\x06\x51\x00\x00\x02\x00\x00", "maximum length item of 2 bytes"),
        (0x07, b"\x00\x00\x02", "A-ABORT of 3 bytes"),
    ],
)
def test_bytes_that_do_not_decode_say_where(kind: int, body: bytes, said: str) -> None:
    with pytest.raises(PduError) as error:
        pdu.decode(kind, body)
    assert said in str(error.value)


def test_odd_but_answerable_contexts_are_kept_aside_for_negotiation() -> None:
    items = b"".join(
        bytes([kind, 0, 0, 4 + 4 + len(VERIFICATION)])
        + bytes([cid, 0, 0, 0])
        + b"\x30\x00\x00\x11"
        + VERIFICATION.encode()
        for kind, cid in ((0x20, 1), (0x20, 2), (0x20, 1), (0x21, 5))
    )
    request = pdu.decode(0x01, b"\x00\x01" + bytes(66) + items)
    assert isinstance(request, AssociateRequest)
    assert [c.id for c in request.contexts] == [1] and request.unusable_context_ids == [2, 1, 5]
    assert request.application_context is None
