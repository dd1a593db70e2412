"""Association negotiation: the refusals in the order docs/conformance.md gives them, and the
presentation contexts and roles pynetdicom's acceptor (which served them until now) would
answer, compared context by context."""

from __future__ import annotations

import itertools

import pytest
from pynetdicom.presentation import build_context, negotiate_as_acceptor

from fabricatord.dicom.ul.negotiation import Policy, negotiate, refusal
from fabricatord.dicom.ul.pdu import (
    AssociateRequest,
    ContextResult,
    PresentationContext,
    RoleSelection,
    UserInformation,
)

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION, STUDY_FIND = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT, EXPLICIT, BIG, JPEG = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
)
STORAGE_SYNTAXES = (IMPLICIT, EXPLICIT, BIG, JPEG)
POLICY = Policy(
    ae_title="FABRICATORD",
    contexts={
        VERIFICATION: (IMPLICIT, EXPLICIT, BIG),
        STUDY_FIND: (IMPLICIT, EXPLICIT),
        CT: STORAGE_SYNTAXES,
        MR: STORAGE_SYNTAXES,
    },
    role_classes={CT, MR},
    max_length=65536,
    implementation_class_uid="1.2.826.0.1.3680043.10.1438.1",
    implementation_version_name="FABRICATORD_010",
)


def request(**changes: object) -> AssociateRequest:
    values: dict[str, object] = {
        "called_ae": b"FABRICATORD".ljust(16),
        "calling_ae": b"MODALITY".ljust(16),
        "application_context": "1.2.840.10008.3.1.1.1",
        "contexts": [PresentationContext(1, VERIFICATION, (IMPLICIT,))],
        "user": UserInformation(max_length=16384),
    }
    values.update(changes)
    return AssociateRequest(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "known", "full", "answer", "why"),
    [
        ({"protocol_version": 2, "calling_ae": b"\x01" * 16}, None, False, (1, 2, 2), "protocol_version"),
        ({"calling_ae": b"BAD\\AE".ljust(16), "called_ae": b" " * 16}, None, False, (1, 1, 3), "calling_ae"),
        ({"called_ae": b" " * 16, "application_context": None}, None, False, (1, 1, 7), "called_ae"),
        (
            {"application_context": "1.2.3", "called_ae": b"OTHER".ljust(16)},
            None,
            False,
            (1, 1, 2),
            "application_context",
        ),
        ({"called_ae": b"OTHER".ljust(16)}, {"PACS"}, True, (1, 1, 3), "calling_ae_unknown"),
        ({"called_ae": b"OTHER".ljust(16)}, {"MODALITY"}, True, (2, 3, 2), "max_associations"),
        ({"called_ae": b"OTHER".ljust(16)}, None, False, (1, 1, 7), "called_ae"),
    ],
)
def test_the_first_reason_to_refuse_answers(
    changes: dict[str, object], known: set[str] | None, full: bool, answer: tuple[int, int, int], why: str
) -> None:
    refused = refusal(request(**changes), POLICY, known, full)
    assert refused is not None
    assert (refused.reject.result, refused.reject.source, refused.reject.reason) == answer
    assert refused.why.split(":")[0] == why


def test_a_good_request_is_not_refused_and_titles_are_padded_either_way() -> None:
    assert refusal(request(called_ae=b"  FABRICATORD   "), POLICY, {"MODALITY"}, full=False) is None


ROLES = [None, (True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize(("abstract", "offered", "role"), list(itertools.product(
    [CT, VERIFICATION, STUDY_FIND, "1.2.3.4"],
    [(JPEG, EXPLICIT), (EXPLICIT, IMPLICIT), (BIG,), ("1.2.840.10008.1.2.4.90",), ()],
    ROLES,
)))  # fmt: skip
def test_each_context_is_answered_as_pynetdicom_answered_it(
    abstract: str, offered: tuple[str, ...], role: tuple[bool, bool] | None
) -> None:
    user = UserInformation(roles=[RoleSelection(abstract, *role)] if role else [])
    ours = negotiate(request(contexts=[PresentationContext(7, abstract, offered)], user=user), POLICY)
    supported = []
    for uid, syntaxes in POLICY.contexts.items():
        context = build_context(uid, list(syntaxes))
        if uid in POLICY.role_classes:
            context.scu_role, context.scp_role = True, True
        supported.append(context)
    proposed = build_context(abstract, list(offered) or [IMPLICIT])  # pynetdicom cannot build an empty one
    proposed.context_id = 7
    if not offered:
        proposed._transfer_syntax = []
    try:
        theirs, their_roles = negotiate_as_acceptor([proposed], supported, {abstract: role} if role else None)
    except IndexError:  # pynetdicom raises on a context without transfer syntaxes; we answer it
        (answer,) = ours.accept.contexts
        assert answer.result in (
            ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
            ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
        )
        return
    (answer,) = ours.accept.contexts
    (their,) = theirs
    assert (answer.id, int(answer.result)) == (their.context_id, their.result)
    if their.result == 0:
        assert answer.transfer_syntax == their.transfer_syntax[0]
        accepted = ours.contexts[7]
        assert (accepted.we_are_scp, accepted.we_are_scu) == (their.as_scp, their.as_scu)
    assert [(r.sop_class_uid, r.scu, r.scp) for r in ours.accept.user.roles] == [
        (r.sop_class_uid, r.scu_role, r.scp_role) for r in their_roles
    ]


def test_the_accept_says_who_we_are_and_what_we_receive() -> None:
    negotiation = negotiate(request(), POLICY)
    user = negotiation.accept.user
    assert (user.max_length, user.implementation_class_uid, user.implementation_version_name) == (
        65536,
        POLICY.implementation_class_uid,
        POLICY.implementation_version_name,
    )
    assert user.async_window is None and user.identity_response is None and not user.extended
    assert negotiation.peer_max_length == 16384
    assert negotiation.accept.called_ae == b"FABRICATORD".ljust(16)
