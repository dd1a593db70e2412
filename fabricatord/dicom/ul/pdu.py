"""PDUs and their items (PS3.8 9.3), from bytes and to bytes.

Decoding is strict where a wrong byte changes the meaning (an item that overruns its PDU, a
PDV shorter than its header) and lenient where peers differ harmlessly (UIDs padded with NUL
or space, user information sub-items we do not know). What is odd but answerable (an even or
repeated context ID, an AE title with control characters, a wrong application context) is kept
for `negotiation` to judge: decoding never decides the answer to a request.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct(">BBL")
"""Every PDU starts with its type, a reserved byte and the length of what follows."""
_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">LBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM application context name (PS3.7 A.2.1), the only one there is."""


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class AbortSource(IntEnum):
    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """PS3.8 9.3.8: why the service provider aborts."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PARAMETER = 4
    UNEXPECTED_PARAMETER = 5
    INVALID_PARAMETER = 6


class ContextResult(IntEnum):
    """PS3.8 9.3.3.2: the answer to one proposed presentation context."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class PduError(ValueError):
    """Bytes that do not decode as the PDU they claim to be; answered with an A-ABORT."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PresentationContext:
    """One proposed context: its ID, abstract syntax and the transfer syntaxes offered."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class ContextAnswer:
    """One context of an A-ASSOCIATE-AC: the result and, when accepted, the transfer syntax."""

    id: int
    result: ContextResult
    transfer_syntax: str = ""


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU role selection (PS3.7 D.3.3.4) for one SOP class."""

    sop_class_uid: str
    scu: bool
    scp: bool


@dataclass(frozen=True)
class CommonExtendedNegotiation:
    """SOP Class Common Extended Negotiation (PS3.7 D.3.3.6): only ever proposed, never answered."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserIdentity:
    """User Identity Negotiation (PS3.7 D.3.3.7) as requested: a user name, a password, a
    Kerberos ticket, a SAML assertion or a JSON Web Token (types 1 to 5)."""

    kind: int
    positive_response_requested: bool
    primary: bytes
    secondary: bytes = b""


@dataclass
class UserInformation:
    """The user information item: what both sides say about themselves."""

    max_length: int | None = None
    """The longest P-DATA-TF the sender receives; 0 means no limit, None that it was left out."""
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    async_window: tuple[int, int] | None = None
    """(maximum operations invoked, maximum performed); None when not negotiated (1, 1)."""
    roles: list[RoleSelection] = field(default_factory=list)
    extended: dict[str, bytes] = field(default_factory=dict)
    """SOP Class Extended Negotiation: the service-class application information per SOP class."""
    common_extended: list[CommonExtendedNegotiation] = field(default_factory=list)
    identity: UserIdentity | None = None
    identity_response: bytes | None = None
    """The A-ASSOCIATE-AC's answer to a user identity that asked for one."""


@dataclass
class AssociateRequest:
    called_ae: bytes
    """The 16 bytes as sent: `negotiation` checks them, since a bad title has its own answer."""
    calling_ae: bytes
    application_context: str | None
    contexts: list[PresentationContext]
    user: UserInformation
    protocol_version: int = 1
    unusable_context_ids: list[int] = field(default_factory=list)
    """Context items left out of `contexts`: an even or repeated ID, or an AC's item (0x21) in a
    request. PS3.8 says nothing of them; they get no answer, the others are negotiated."""

    @property
    def called(self) -> str:
        return title(self.called_ae)

    @property
    def calling(self) -> str:
        return title(self.calling_ae)


@dataclass
class AssociateAccept:
    called_ae: bytes
    """Returned as the request had them (PS3.8 9.3.3: the values of the A-ASSOCIATE-RQ)."""
    calling_ae: bytes
    contexts: list[ContextAnswer]
    user: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True)
class AssociateReject:
    """A-ASSOCIATE-RJ: result 1 permanent or 2 transient; source 1 user, 2 ACSE, 3 presentation."""

    result: int
    source: int
    reason: int


@dataclass(frozen=True)
class Abort:
    source: int
    reason: int


@dataclass(frozen=True)
class ReleaseRequest:
    pass


@dataclass(frozen=True)
class ReleaseResponse:
    pass


@dataclass(frozen=True)
class Pdv:
    """One presentation data value: a fragment of a command (`control` bit 0) or a dataset,
    the last of its message when bit 1 is set."""

    context_id: int
    control: int
    data: bytes | memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control & 1)

    @property
    def is_last(self) -> bool:
        return bool(self.control & 2)


@dataclass(frozen=True)
class PData:
    values: list[Pdv]


Pdu = AssociateRequest | AssociateAccept | AssociateReject | PData | ReleaseRequest | ReleaseResponse | Abort


def title(raw: bytes) -> str:
    """An AE title as text: spaces around it are not significant (PS3.5 6.2)."""
    return raw.decode("ascii", "replace").strip(" \x00")


def decode(kind: int, body: bytes | memoryview) -> Pdu:
    """The PDU of type `kind` whose bytes after the header are `body`."""
    try:
        decoder = _DECODERS[PduType(kind)]
    except ValueError:
        raise PduError(f"PDU type 0x{kind:02X} does not exist", AbortReason.UNRECOGNIZED_PDU) from None
    return decoder(memoryview(body))


def encode(pdu: Pdu) -> bytes:
    """The PDU as it goes on the wire, header included."""
    if isinstance(pdu, PData):
        values = b"".join(_PDV.pack(len(v.data) + 2, v.context_id, v.control) + bytes(v.data) for v in pdu.values)
        return HEADER.pack(PduType.P_DATA_TF, 0, len(values)) + values
    kind, body = _encode_body(pdu)
    return HEADER.pack(kind, 0, len(body)) + body


def p_data_header(context_id: int, control: int, length: int) -> bytes:
    """The PDU and PDV headers of a P-DATA-TF carrying one value of `length` bytes: written
    before the value itself, so that a large fragment is never copied to be framed."""
    return HEADER.pack(PduType.P_DATA_TF, 0, length + 6) + _PDV.pack(length + 2, context_id, control)


def pdvs(body: bytes | memoryview) -> Iterator[Pdv]:
    """The values of a P-DATA-TF, as views into `body` (nothing is copied)."""
    view = memoryview(body)
    offset, end = 0, len(view)
    if end == 0:
        raise PduError("a P-DATA-TF without a presentation data value")
    while offset < end:
        # The reasons are the ones these PDVs got before our upper layer (docs/robustness.md's
        # peer table): unexpected PDU for one without its header bytes, none for one too long.
        if offset + 6 > end:
            raise PduError(f"a PDV header cut short at byte {offset}", AbortReason.UNEXPECTED_PDU)
        length, context_id, control = _PDV.unpack_from(view, offset)
        if length < 2:
            raise PduError(
                f"a PDV of length {length} at byte {offset}, shorter than its header", AbortReason.UNEXPECTED_PDU
            )
        if offset + 4 + length > end:
            raise PduError(f"a PDV of length {length} at byte {offset} does not fit its PDU", AbortReason.NOT_SPECIFIED)
        yield Pdv(context_id, control, view[offset + 6 : offset + 4 + length])
        offset += 4 + length


# -- decoding ---------------------------------------------------------------------------------


def _items(data: memoryview, where: str) -> Iterator[tuple[int, memoryview]]:
    offset, end = 0, len(data)
    while offset < end:
        if offset + 4 > end:
            raise PduError(f"an item header cut short in {where}")
        kind, _, length = _ITEM.unpack_from(data, offset)
        if offset + 4 + length > end:
            raise PduError(f"item 0x{kind:02X} of {length} bytes overruns {where}")
        yield kind, data[offset + 4 : offset + 4 + length]
        offset += 4 + length


def _uid(value: memoryview) -> str:
    """A UID as sent; a trailing NUL or space is padding some peers add."""
    return bytes(value).decode("ascii", "replace").rstrip("\x00 ")


def _prefixed(value: memoryview, offset: int, where: str) -> tuple[memoryview, int]:
    """A field with a 2-byte length before it, and the offset after it."""
    if offset + 2 > len(value):
        raise PduError(f"a length cut short in {where}")
    (length,) = _U16.unpack_from(value, offset)
    if offset + 2 + length > len(value):
        raise PduError(f"a field of {length} bytes overruns {where}")
    return value[offset + 2 : offset + 2 + length], offset + 2 + length


def _association(body: memoryview, what: str) -> tuple[int, bytes, bytes, memoryview]:
    if len(body) < 68:
        raise PduError(f"an {what} of {len(body)} bytes, shorter than its 68 fixed ones")
    (version,) = _U16.unpack_from(body, 0)
    return version, bytes(body[4:20]), bytes(body[20:36]), body[68:]


def _decode_request(body: memoryview) -> AssociateRequest:
    version, called, calling, items = _association(body, "A-ASSOCIATE-RQ")
    request = AssociateRequest(called, calling, None, [], UserInformation(), version)
    seen: set[int] = set()
    for kind, value in _items(items, "the A-ASSOCIATE-RQ"):
        if kind == 0x10:
            request.application_context = _uid(value)
        elif kind in (0x20, 0x21):
            if not value:
                raise PduError("an empty presentation context item")
            context_id = value[0]
            if kind == 0x21 or context_id % 2 == 0 or context_id in seen:
                request.unusable_context_ids.append(context_id)
                continue
            seen.add(context_id)
            request.contexts.append(_proposed_context(context_id, value[4:]))
        elif kind == 0x50:
            request.user = _user_information(value)
    return request


def _proposed_context(context_id: int, sub_items: memoryview) -> PresentationContext:
    abstract, transfer = "", []
    for kind, value in _items(sub_items, f"presentation context {context_id}"):
        if kind == 0x30:
            abstract = _uid(value)
        elif kind == 0x40:
            transfer.append(_uid(value))
    return PresentationContext(context_id, abstract, tuple(transfer))


def _decode_accept(body: memoryview) -> AssociateAccept:
    version, called, calling, items = _association(body, "A-ASSOCIATE-AC")
    accept = AssociateAccept(called, calling, [], UserInformation(), "", version)
    for kind, value in _items(items, "the A-ASSOCIATE-AC"):
        if kind == 0x10:
            accept.application_context = _uid(value)
        elif kind == 0x21:
            if len(value) < 4:
                raise PduError("a presentation context answer shorter than 4 bytes")
            syntax = ""
            for sub_kind, sub_value in _items(value[4:], f"presentation context {value[0]}"):
                if sub_kind == 0x40:
                    syntax = _uid(sub_value)
            try:
                result = ContextResult(value[2])
            except ValueError:
                raise PduError(f"presentation context {value[0]}: result {value[2]} does not exist") from None
            accept.contexts.append(ContextAnswer(value[0], result, syntax))
        elif kind == 0x50:
            accept.user = _user_information(value)
    return accept


def _user_information(data: memoryview) -> UserInformation:
    """Sub-items 0x51–0x59; others, including items of the PDU's own level, are ignored."""
    user = UserInformation()
    for kind, value in _items(data, "the user information item"):
        if kind == 0x51:
            if len(value) != 4:
                raise PduError(f"a maximum length item of {len(value)} bytes, not 4")
            (user.max_length,) = _U32.unpack_from(value, 0)
        elif kind == 0x52:
            user.implementation_class_uid = _uid(value)
        elif kind == 0x53:
            if len(value) != 4:
                raise PduError(f"an asynchronous operations window item of {len(value)} bytes, not 4")
            user.async_window = (_U16.unpack_from(value, 0)[0], _U16.unpack_from(value, 2)[0])
        elif kind == 0x54:
            uid, offset = _prefixed(value, 0, "a role selection item")
            if offset + 2 != len(value):
                raise PduError("a role selection item without its two role bytes")
            user.roles.append(RoleSelection(_uid(uid), bool(value[offset]), bool(value[offset + 1])))
        elif kind == 0x55:
            user.implementation_version_name = bytes(value).decode("ascii", "replace").strip(" \x00")
        elif kind == 0x56:
            uid, offset = _prefixed(value, 0, "an extended negotiation item")
            user.extended[_uid(uid)] = bytes(value[offset:])
        elif kind == 0x57:
            user.common_extended.append(_common_extended(value))
        elif kind == 0x58:
            user.identity = _identity(value)
        elif kind == 0x59:
            response, _ = _prefixed(value, 0, "a user identity answer")
            user.identity_response = bytes(response)
    return user


def _common_extended(value: memoryview) -> CommonExtendedNegotiation:
    where = "a common extended negotiation item"
    sop_class, offset = _prefixed(value, 0, where)
    service_class, offset = _prefixed(value, offset, where)
    related_block, _ = _prefixed(value, offset, where)
    related, inner = [], 0
    while inner < len(related_block):
        uid, inner = _prefixed(related_block, inner, where)
        related.append(_uid(uid))
    return CommonExtendedNegotiation(_uid(sop_class), _uid(service_class), tuple(related))


def _identity(value: memoryview) -> UserIdentity:
    if len(value) < 4:
        raise PduError("a user identity item shorter than 4 bytes")
    primary, offset = _prefixed(value, 2, "a user identity item")
    secondary = memoryview(b"")
    if offset < len(value):
        secondary, _ = _prefixed(value, offset, "a user identity item")
    return UserIdentity(value[0], bool(value[1]), bytes(primary), bytes(secondary))


def _fixed(body: memoryview, what: str) -> memoryview:
    if len(body) != 4:
        raise PduError(f"an {what} of {len(body)} bytes, not 4")
    return body


def _decode_reject(body: memoryview) -> AssociateReject:
    fixed = _fixed(body, "A-ASSOCIATE-RJ")
    return AssociateReject(fixed[1], fixed[2], fixed[3])


def _decode_abort(body: memoryview) -> Abort:
    fixed = _fixed(body, "A-ABORT")
    return Abort(fixed[2], fixed[3])


def _decode_p_data(body: memoryview) -> PData:
    return PData(list(pdvs(body)))


def _decode_release_rq(body: memoryview) -> ReleaseRequest:
    _fixed(body, "A-RELEASE-RQ")
    return ReleaseRequest()


def _decode_release_rp(body: memoryview) -> ReleaseResponse:
    _fixed(body, "A-RELEASE-RP")
    return ReleaseResponse()


_DECODERS: dict[PduType, Callable[[memoryview], Pdu]] = {
    PduType.ASSOCIATE_RQ: _decode_request,
    PduType.ASSOCIATE_AC: _decode_accept,
    PduType.ASSOCIATE_RJ: _decode_reject,
    PduType.P_DATA_TF: _decode_p_data,
    PduType.RELEASE_RQ: _decode_release_rq,
    PduType.RELEASE_RP: _decode_release_rp,
    PduType.ABORT: _decode_abort,
}


# -- encoding ---------------------------------------------------------------------------------


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(value)) + value


def _with_length(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _ascii(text: str) -> bytes:
    return text.encode("ascii")


def _encode_body(pdu: Pdu) -> tuple[int, bytes]:
    if isinstance(pdu, AssociateRequest):
        items = [_item(0x10, _ascii(pdu.application_context or APPLICATION_CONTEXT))]
        for context in pdu.contexts:
            sub = _item(0x30, _ascii(context.abstract_syntax)) + b"".join(
                _item(0x40, _ascii(syntax)) for syntax in context.transfer_syntaxes
            )
            items.append(_item(0x20, bytes([context.id, 0, 0, 0]) + sub))
        items.append(_encode_user(pdu.user))
        return PduType.ASSOCIATE_RQ, _fixed_part(pdu.protocol_version, pdu.called_ae, pdu.calling_ae) + b"".join(items)
    if isinstance(pdu, AssociateAccept):
        items = [_item(0x10, _ascii(pdu.application_context))]
        for answer in pdu.contexts:
            # PS3.8 9.3.3.2: a rejected context still carries one transfer syntax sub-item,
            # whose value is not significant.
            sub = _item(0x40, _ascii(answer.transfer_syntax))
            items.append(_item(0x21, bytes([answer.id, 0, answer.result, 0]) + sub))
        items.append(_encode_user(pdu.user))
        return PduType.ASSOCIATE_AC, _fixed_part(pdu.protocol_version, pdu.called_ae, pdu.calling_ae) + b"".join(items)
    if isinstance(pdu, AssociateReject):
        return PduType.ASSOCIATE_RJ, bytes([0, pdu.result, pdu.source, pdu.reason])
    if isinstance(pdu, Abort):
        return PduType.ABORT, bytes([0, 0, pdu.source, pdu.reason])
    if isinstance(pdu, ReleaseRequest):
        return PduType.RELEASE_RQ, bytes(4)
    if isinstance(pdu, ReleaseResponse):
        return PduType.RELEASE_RP, bytes(4)
    raise TypeError(f"{type(pdu).__name__} is encoded by encode()")


def _fixed_part(version: int, called: bytes, calling: bytes) -> bytes:
    return _U16.pack(version) + bytes(2) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)


def _encode_user(user: UserInformation) -> bytes:
    sub = []
    if user.max_length is not None:
        sub.append(_item(0x51, _U32.pack(user.max_length)))
    if user.implementation_class_uid:
        sub.append(_item(0x52, _ascii(user.implementation_class_uid)))
    if user.async_window is not None:
        sub.append(_item(0x53, _U16.pack(user.async_window[0]) + _U16.pack(user.async_window[1])))
    for role in user.roles:
        sub.append(_item(0x54, _with_length(_ascii(role.sop_class_uid)) + bytes([role.scu, role.scp])))
    if user.implementation_version_name:
        sub.append(_item(0x55, _ascii(user.implementation_version_name)))
    for sop_class, info in user.extended.items():
        sub.append(_item(0x56, _with_length(_ascii(sop_class)) + info))
    for common in user.common_extended:
        related = b"".join(_with_length(_ascii(uid)) for uid in common.related_general_sop_classes)
        value = _with_length(_ascii(common.sop_class_uid)) + _with_length(_ascii(common.service_class_uid))
        sub.append(_item(0x57, value + _with_length(related)))
    if user.identity is not None:
        identity = user.identity
        value = bytes([identity.kind, identity.positive_response_requested]) + _with_length(identity.primary)
        sub.append(_item(0x58, value + _with_length(identity.secondary)))
    if user.identity_response is not None:
        sub.append(_item(0x59, _with_length(user.identity_response)))
    return _item(0x50, b"".join(sub))
