"""Our requestor against pynetdicom's acceptor (a real peer on a socket): association, C-STORE
in fragments the peer's maximum length allows, the status it answers, refusals, release."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from fabricatord.dicom.ul.requestor import AssociationLost, AssociationRefused, Requestor, Timeouts
from tests.conftest import free_port
from tests.helpers import study

TIMEOUTS = Timeouts(connect=5, acse=5, dimse=5)


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[Dataset], AE]]:
    """pynetdicom as a storage SCP taking CT in explicit little endian only, 4 KiB PDUs."""
    received: list[Dataset] = []

    def handle(event: Any) -> int:
        ds = event.dataset
        received.append(ds)
        return 0xB000 if ds.get("PatientID") == "WARN" else 0x0000

    ae = AE(ae_title="RECEIVER")
    ae.maximum_pdu_size = 4096
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield port, received, ae
    finally:
        server.shutdown()


def _dataset(patient_id: str = "P1") -> tuple[Dataset, bytes]:
    ds = study("CT", images=1)[0]
    ds.PatientID = patient_id
    data = encode(ds, False, True)
    assert data is not None
    return ds, bytes(data)


def test_a_c_store_goes_in_fragments_and_its_status_comes_back(receiver: tuple[int, list[Dataset], AE]) -> None:
    port, received, _ = receiver
    proposed = [(CTImageStorage, [ImplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian])]
    requestor = Requestor.open("127.0.0.1", port, "RECEIVER", "FABRICATORD", proposed, TIMEOUTS)
    assert [(c.id, c.transfer_syntax) for c in requestor.contexts] == [(3, ExplicitVRLittleEndian)]
    context = requestor.contexts[0].id
    ds, data = _dataset()
    assert len(data) > 4096  # more than one fragment
    chunks = [data[:1000], data[1000:50000], data[50000:]]  # as a file is read: cut anywhere
    assert requestor.store(context, CTImageStorage, ds.SOPInstanceUID, 1, chunks) == 0x0000
    warned, warned_data = _dataset("WARN")
    assert requestor.store(context, CTImageStorage, warned.SOPInstanceUID, 2, warned_data) == 0xB000
    requestor.release()
    assert not requestor.established
    assert [r.SOPInstanceUID for r in received] == [ds.SOPInstanceUID, warned.SOPInstanceUID]
    assert received[0].PixelData == ds.PixelData


def test_a_rejected_or_unreachable_association_is_refused(receiver: tuple[int, list[Dataset], AE]) -> None:
    port, _, _ = receiver
    proposed = [(CTImageStorage, [ExplicitVRLittleEndian])]
    with pytest.raises(AssociationRefused, match="rejected"):
        Requestor.open("127.0.0.1", port, "SOMEONEELSE", "FABRICATORD", proposed, TIMEOUTS)
    with pytest.raises(AssociationRefused, match="cannot connect"):
        Requestor.open("127.0.0.1", free_port(), "RECEIVER", "FABRICATORD", proposed, TIMEOUTS)


def test_a_peer_that_aborts_during_a_c_store_ends_the_association(
    receiver: tuple[int, list[Dataset], AE],
) -> None:
    port, _, ae = receiver
    proposed = [(CTImageStorage, [ExplicitVRLittleEndian])]
    requestor = Requestor.open("127.0.0.1", port, "RECEIVER", "FABRICATORD", proposed, TIMEOUTS)
    [association] = ae.active_associations
    association.abort()  # the receiver goes before it answers
    ds, data = _dataset()
    with pytest.raises(AssociationLost):
        requestor.store(requestor.contexts[0].id, CTImageStorage, ds.SOPInstanceUID, 1, data)
    assert not requestor.established
