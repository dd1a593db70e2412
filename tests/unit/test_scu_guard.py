"""The guard against pynetdicom's reactor race: a stray response goes back to the waiting sender."""

from __future__ import annotations

import queue
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import evt

from fabricatord.dicom.scu import Peer, ScuError, Timeouts, echo, keep_stray_responses


def _association() -> tuple[Any, list[Any]]:
    served: list[Any] = []
    assoc = SimpleNamespace(
        _serve_request=lambda message, context_id: served.append((message, context_id)),
        _sent_release=False,
        dimse=SimpleNamespace(msg_queue=queue.Queue()),
    )
    keep_stray_responses(SimpleNamespace(assoc=assoc))
    return assoc, served


def test_a_response_taken_by_the_reactor_is_queued_again() -> None:
    assoc, served = _association()
    response = SimpleNamespace(is_valid_request=False)
    assoc._serve_request(response, 3)
    assert served == [] and assoc.dimse.msg_queue.get_nowait() == (3, response)


def test_requests_are_served_as_before() -> None:
    assoc, served = _association()
    request = SimpleNamespace(is_valid_request=True)
    assoc._serve_request(request, 1)
    assert served == [(request, 1)] and assoc.dimse.msg_queue.empty()


# Contract tests: each patch of pynetdicom in fabricatord.dicom.scu relies on something of its
# internals; these fail when a pynetdicom release changes it, before the patch silently stops
# working.


def test_pynetdicom_still_has_what_keep_stray_responses_and_nodelay_patch() -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tests.conftest import free_port

    acceptor = AE(ae_title="ACCEPTOR")
    acceptor.add_supported_context(Verification)
    port = free_port()
    server = acceptor.start_server(("127.0.0.1", port), block=False)
    try:
        requestor = AE(ae_title="REQUESTOR")
        requestor.add_requested_context(Verification)
        seen: list[Any] = []
        assoc = requestor.associate(
            "127.0.0.1", port, ae_title="ACCEPTOR", evt_handlers=[(evt.EVT_CONN_OPEN, seen.append)]
        )
        try:
            assert assoc.is_established and seen
            assert callable(assoc._serve_request)
            assert assoc._sent_release is False
            assert isinstance(assoc.dimse.msg_queue, queue.Queue)
            assert seen[0].assoc.dul.socket.socket.fileno() >= 0  # nodelay sets TCP_NODELAY on it
        finally:
            assoc.release()
    finally:
        server.shutdown()


def test_pynetdicom_still_logs_why_a_connect_failed_where_our_filter_reads_it() -> None:
    from tests.conftest import free_port

    peer = Peer("NOBODY", "127.0.0.1", free_port())  # nobody listens
    with pytest.raises(ScuError, match="cannot connect: connection refused"):
        echo(peer, "FABRICATORD", Timeouts(connect=2, acse=2, dimse=2, network=2))
