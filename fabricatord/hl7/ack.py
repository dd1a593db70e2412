"""Acknowledgements (HL7 v2 §2.9): MSH swapped, MSA, and ERR in the layout of the message's version.

Built here rather than with python-hl7's `create_ack`, which needs a parsed message (a frame of
garbage must be answered too) and knows no ERR segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from fabricatord.hl7.codec import ERROR_TEXTS, Header, Hl7Error, escape, version_tuple

COMMIT_CODES = {"AA": "CA", "AE": "CE", "AR": "CR"}


def answer_code(head: Header, outcome: str) -> str | None:
    """The acknowledgment code a message with `outcome` (AA, AE or AR) is answered with, or None.

    Original mode: the ACK. Enhanced mode (MSH-15/16 valued): the commit ACK when MSH-15 asks
    for it (empty counts as AL); else the application ACK when MSH-16 asks for it; else nothing.
    One answer at most: a second frame would be read as the answer to the sender's next message,
    and an application ACK of our own initiative would need a commit ACK back.
    """
    if not (head.accept_ack or head.application_ack):
        return outcome
    if _wanted(head.accept_ack or "AL", outcome == "AA"):
        return COMMIT_CODES[outcome]
    if _wanted(head.application_ack or "NE", outcome == "AA"):
        return outcome
    return None


def _wanted(condition: str, success: bool) -> bool:
    """HL7 table 0155: AL always, NE never, ER on error, SU on success. A value outside the table
    counts as AL: an answer the sender did not need costs less than a silence it resends into."""
    if condition not in ("NE", "ER", "SU"):
        return True
    return (condition == "ER" and not success) or (condition == "SU" and success)


def acknowledgment(
    head: Header,
    code: str,
    errors: Sequence[Hl7Error],
    control_id: str,
    sent_at: datetime,
    our_application: str,
) -> str:
    """An ACK for `head`'s message; `code` is AA, AE, AR or, in enhanced mode, CA, CE, CR."""
    separator, encoding = head.field_separator, head.encoding_characters
    component, sub = encoding[0], (encoding + "&")[3]

    def text(value: str) -> str:
        return escape(value, separator, encoding)

    version = version_tuple(head.version)
    message_type = "ACK" + (component + text(head.trigger) if head.trigger else "")
    if version >= (2, 4) and head.trigger:
        message_type += component + "ACK"
    msh = [
        "MSH",
        encoding,
        text(head.receiving_application or our_application),
        text(head.receiving_facility),
        text(head.sending_application),
        text(head.sending_facility),
        sent_at.strftime("%Y%m%d%H%M%S"),
        "",
        message_type,
        text(control_id),
        text(head.processing_id),
        text(head.version),
        "",
        "",
        "",
        "",
        "",
        text(head.charset),
    ]
    msa = ["MSA", code, text(head.control_id)]
    if errors and version < (2, 5):
        msa.append(text(errors[0].text))  # MSA-3 text message, withdrawn from v2.5 on
    segments = [separator.join(msh).rstrip(separator), separator.join(msa)]
    for error in errors:
        standard = ERROR_TEXTS.get(error.code, "")
        if version < (2, 5):
            # ERR-1 ELD: segment^sequence^field^code&text&HL70357
            code_element = sub.join([str(error.code), text(error.text), "HL70357"])
            where = [text(error.segment), str(error.sequence) if error.segment else "", _number(error.field)]
            segments.append(separator.join(["ERR", component.join([*where, code_element])]))
        else:
            location = component.join(
                [text(error.segment), str(error.sequence) if error.segment else "", _number(error.field)]
                + (["1", str(error.component)] if error.component else [])
            ).rstrip(component)
            hl7_code = component.join([str(error.code), text(standard), "HL70357"])
            segments.append(separator.join(["ERR", "", location, hl7_code, "E", "", "", "", text(error.text)]))
    return "\r".join(segments)


def _number(value: int) -> str:
    return str(value) if value else ""


def batch_acknowledgment(acks: Sequence[str], batch_header: str, file_header: str, sent_at: datetime) -> str:
    """The ACKs of a batch, in order, in a batch of their own (BHS … BTS, in FHS … FTS if the
    batch came in a file)."""
    stamp = sent_at.strftime("%Y%m%d%H%M%S")
    segments = []
    if file_header:
        segments.append(_swapped_envelope(file_header, stamp))
    segments.append(_swapped_envelope(batch_header or "BHS", stamp))
    segments += acks
    segments.append(f"BTS{batch_header[3:4] or '|'}{len(acks)}")
    if file_header:
        segments.append(f"FTS{file_header[3:4] or '|'}1")
    return "\r".join(segments)


def _swapped_envelope(segment: str, stamp: str) -> str:
    """FHS or BHS answered: sender and receiver swapped, our time, the original's control ID as
    the reference (FHS-12 / BHS-12). A bare FHS or BHS gets the default separators."""
    if len(segment) < 4:
        segment += "|^~\\&"
    separator = segment[3]
    fields = segment.split(separator) + [""] * 12
    name, encoding = fields[0], fields[1]
    swapped = [name, encoding, fields[4], fields[5], fields[2], fields[3], stamp, "", "", "", "", fields[10]]
    return separator.join(swapped).rstrip(separator)
