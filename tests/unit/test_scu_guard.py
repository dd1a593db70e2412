"""The guard against pynetdicom's reactor race: a stray response goes back to the waiting sender."""

from __future__ import annotations

import queue
from types import SimpleNamespace
from typing import Any

from fabricatord.dicom.scu import keep_stray_responses


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
