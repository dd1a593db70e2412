"""Whether to accept an A-ASSOCIATE-RQ, and the A-ASSOCIATE-AC that answers it (PS3.8 7.1,
PS3.7 D.3.3).

The answers are the ones docs/conformance.md states and tests/robustness checks: a request is
refused for the first of its protocol version, its AE titles' characters, its application
context, an unknown calling AE (when peers must be known), our being full, and a called AE
title that is not ours. Each proposed context gets the first of our transfer syntaxes the
requestor offers (our order of preference, not theirs); SCP/SCU role selection is answered for
the storage classes only, the roles granted being the ones asked for; extended negotiation,
asynchronous operations and user identity are not answered, which PS3.7 reads as "not
supported": one operation at a time, no identity confirmed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

from fabricatord.dicom.ul.pdu import (
    APPLICATION_CONTEXT,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextAnswer,
    ContextResult,
    RoleSelection,
    UserInformation,
)

_AE_TITLE = re.compile(rb"[ -\[\]-~]{16}")
"""The characters PS3.5 6.2 allows in an AE title: printable ASCII without backslash."""


@dataclass(frozen=True)
class Policy:
    """What we accept: our AE title, the abstract syntaxes with their transfer syntaxes in our
    order of preference, and the SOP classes whose requestor may select roles."""

    ae_title: str
    contexts: Mapping[str, tuple[str, ...]]
    role_classes: Collection[str]
    max_length: int
    """The longest P-DATA-TF we receive, announced in the AC; 0 for no limit."""
    implementation_class_uid: str
    implementation_version_name: str
    other_titles: Collection[str] = ()
    """Called AE titles we answer to besides `ae_title` (anonymizing proxies)."""


@dataclass(frozen=True)
class Refusal:
    reject: AssociateReject
    why: str
    """The metric's reason label, a colon, and what was wrong, for the log."""


@dataclass(frozen=True)
class AcceptedContext:
    """A context both sides agreed on, and which of us may send requests on it."""

    id: int
    abstract_syntax: str
    transfer_syntax: str
    we_are_scp: bool = True
    we_are_scu: bool = False


@dataclass
class Negotiation:
    accept: AssociateAccept
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    peer_max_length: int = 0
    """The longest P-DATA-TF the requestor receives; 0 for no limit."""


def refusal(
    request: AssociateRequest, policy: Policy, known_calling: Collection[str] | None, full: bool
) -> Refusal | None:
    """Why `request` is rejected, or None. `known_calling`: the calling AE titles allowed when
    peers must be known (None: any); `full`: the association limit is reached."""
    return next(_refusals(request, policy, known_calling, full), None)


def _refusals(
    request: AssociateRequest, policy: Policy, known_calling: Collection[str] | None, full: bool
) -> Iterator[Refusal]:
    """Every reason to reject, the one that answers first."""
    if request.protocol_version != 1:
        yield Refusal(AssociateReject(1, 2, 2), f"protocol_version: {request.protocol_version}")
    if not _AE_TITLE.fullmatch(request.calling_ae) or not request.calling_ae.strip():
        yield Refusal(AssociateReject(1, 1, 3), f"calling_ae: {request.calling_ae!r} is not an AE title")
    if not _AE_TITLE.fullmatch(request.called_ae) or not request.called_ae.strip():
        yield Refusal(AssociateReject(1, 1, 7), f"called_ae: {request.called_ae!r} is not an AE title")
    if request.application_context != APPLICATION_CONTEXT:
        name = "missing" if request.application_context is None else repr(request.application_context)
        yield Refusal(AssociateReject(1, 1, 2), f"application_context: {name}")
    if known_calling is not None and request.calling not in known_calling:
        yield Refusal(AssociateReject(1, 1, 3), f"calling_ae_unknown: {request.calling!r} is not a [[peers]] ae_title")
    if full:
        yield Refusal(AssociateReject(2, 3, 2), "max_associations: the association limit is reached")
    if request.called != policy.ae_title.strip() and request.called not in policy.other_titles:
        yield Refusal(AssociateReject(1, 1, 7), f"called_ae: {request.called!r} is not {policy.ae_title!r}")


def negotiate(request: AssociateRequest, policy: Policy) -> Negotiation:
    """The A-ASSOCIATE-AC for an acceptable request, and the contexts it accepts."""
    requested_roles = {role.sop_class_uid: role for role in request.user.roles}
    answers: list[ContextAnswer] = []
    accepted: dict[int, AcceptedContext] = {}
    roles: dict[str, RoleSelection] = {}
    for context in sorted(request.contexts, key=lambda c: c.id):
        # PS3.8 9.3.3.2: a rejected context's transfer syntax is not significant; the first offered
        # is echoed when it can be written back (a UID with a byte outside ASCII cannot).
        offered = context.transfer_syntaxes[0] if context.transfer_syntaxes else ""
        offered_first = offered if offered.isascii() else "1.2.840.10008.1.2"
        ours = policy.contexts.get(context.abstract_syntax)
        if ours is None:
            answers.append(ContextAnswer(context.id, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, offered_first))
            continue
        syntax = next((s for s in ours if s in context.transfer_syntaxes), None)
        if syntax is None:
            answers.append(ContextAnswer(context.id, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, offered_first))
            continue
        we_are_scp, we_are_scu = True, False
        role = requested_roles.get(context.abstract_syntax) if context.abstract_syntax in policy.role_classes else None
        if role is not None:
            # PS3.7 D.3.3.4: the requestor's SCU role is our SCP role and the other way round;
            # we take whichever it asks for, and a context with neither cannot be used.
            we_are_scp, we_are_scu = role.scu, role.scp
            if not (we_are_scp or we_are_scu):
                answers.append(ContextAnswer(context.id, ContextResult.USER_REJECTION, syntax))
                continue
            roles[context.abstract_syntax] = RoleSelection(context.abstract_syntax, role.scu, role.scp)
        answers.append(ContextAnswer(context.id, ContextResult.ACCEPTANCE, syntax))
        accepted[context.id] = AcceptedContext(context.id, context.abstract_syntax, syntax, we_are_scp, we_are_scu)
    user = UserInformation(
        max_length=policy.max_length,
        implementation_class_uid=policy.implementation_class_uid,
        implementation_version_name=policy.implementation_version_name,
        roles=[roles[uid] for uid in sorted(roles)],
    )
    accept = AssociateAccept(request.called_ae, request.calling_ae, answers, user)
    return Negotiation(accept, accepted, request.user.max_length or 0)
