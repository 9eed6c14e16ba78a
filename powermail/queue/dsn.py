"""Delivery status notifications: the bounce and delay reports of RFC 3464.

A report is a ``multipart/report`` (RFC 6522) of three parts: a note in plain
English, the machine-readable ``message/delivery-status``, and the header
section of the message it is about.  When the report may travel with
SMTPUTF8 the two last parts use the types of RFC 6533 instead
(``message/global-delivery-status`` and ``message/global-headers``), which
carry UTF-8 as it is.

Only the headers of the original come back, never its body: a bounce is no
way to send someone's data to a third party.  The report is sent with the
null reverse path ``<>``; that is the sending side's business, not this
module's.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.policy import compat32
from email.utils import format_datetime, make_msgid
from io import BytesIO

__all__ = ["FailedRecipient", "build_dsn"]

_ACTIONS = ("failed", "delayed")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_BLANKS = re.compile(r"\s+")

# Header lines of the report may be 998 octets (RFC 5322 2.1.1).  Every
# field PowerMail writes is shorter, so the email package never refolds one:
# its folder would otherwise wrap a long address as an RFC 2047 encoded word,
# which means nothing inside a delivery-status part.
_GENERATION_POLICY = email_policy.SMTP.clone(max_line_length=998)
_MAX_FIELD = 900

# Plain words for the status codes a sender most often meets (RFC 3463).
_STATUS_WORDS = {
    "1.1": "the mailbox does not exist",
    "1.2": "the recipient's domain does not exist",
    "1.3": "the address is not valid",
    "1.10": "the recipient's domain accepts no mail",
    "2.1": "the mailbox is disabled",
    "2.2": "the mailbox is full",
    "2.3": "the message is larger than the mailbox accepts",
    "3.4": "the message is larger than the receiving system accepts",
    "4.1": "the receiving mail server did not answer",
    "4.2": "the connection to the receiving mail server broke",
    "4.3": "looking up the receiving mail server failed",
    "4.4": "no mail server could be found for the recipient's domain",
    "4.7": "the message was too old to keep trying",
    "7.1": "the receiving system refused the message by policy",
}


@dataclass(frozen=True)
class FailedRecipient:
    """What happened to one recipient that the report is about.

    ``diagnostic`` is the remote server's reply as it came
    (``"550 5.1.1 no such user"``), or another short reason when there was
    no reply; ``remote_mta`` the host name or IP address it came from.
    ``will_retry_until`` is meant for ``delayed`` recipients.  Datetimes
    should be timezone-aware.
    """

    recipient: str
    action: str
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    msg_id: str,
    arrival: datetime,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    now: datetime | None = None,
    smtputf8: bool = False,
) -> bytes:
    """The report on ``recipients`` of message ``msg_id``, as CRLF-ended bytes.

    ``reporting_mta`` is this server's host name, ``sender`` the envelope
    sender the report goes to, ``original`` the message as queued (only its
    header section is used).  ``smtputf8`` says the report may be sent with
    SMTPUTF8, so it uses the RFC 6533 types; a sender address that is not
    ASCII implies it, since such a report cannot travel any other way.

    Original headers with 8-bit bytes in a report without SMTPUTF8 come back
    as ``text/rfc822-headers`` in quoted-printable (its registration in
    RFC 6522 allows that for headers that need it), which keeps the report
    7-bit and decodes to the exact bytes.

    Raises ValueError for a null sender (RFC 5321 section 4.5.5: no report
    ever goes to ``<>``), no recipients, or an unknown action or malformed
    status.
    """
    if not sender:
        raise ValueError("no report is sent to the null sender")
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    for rcpt in recipients:
        if rcpt.action not in _ACTIONS:
            raise ValueError(f"action must be failed or delayed, not {rcpt.action!r}")
        if not _STATUS.fullmatch(rcpt.status):
            raise ValueError(f"malformed status code {rcpt.status!r}")

    utf8 = smtputf8 or not sender.isascii()
    now = now or datetime.now(UTC)
    headers = _header_section(original)

    report = EmailMessage(policy=_part_policy(utf8))
    report["From"] = f'"Mail Delivery System" <MAILER-DAEMON@{reporting_mta}>'
    report["To"] = f"<{sender}>"
    report["Subject"] = _subject(recipients)
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(idstring="dsn", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    report["Content-Type"] = f"multipart/report; report-type={report_type}"

    parts = [
        _explanation_part(reporting_mta, msg_id, arrival, recipients, utf8),
        _status_part(reporting_mta, msg_id, arrival, recipients, utf8),
        _headers_part(headers, utf8),
    ]
    for part in parts:
        report.attach(part)
    if any(part["Content-Transfer-Encoding"] == "8bit" for part in parts):
        report["Content-Transfer-Encoding"] = "8bit"

    out = BytesIO()
    _ReportGenerator(out, policy=_GENERATION_POLICY.clone(utf8=utf8)).flatten(report)
    return out.getvalue()


class _ReportGenerator(BytesGenerator):
    """A generator that writes the prepared RFC 6533 parts as they are.

    The email package knows no writer for ``message/global-delivery-status``
    or ``message/global-headers`` and would write them as ASCII; their
    payloads are UTF-8 text with CRLF line ends, written out unchanged.
    """

    def _write_prepared(self, msg: Message) -> None:
        self._fp.write(msg.get_payload().encode("utf-8"))

    # The generator looks these up by content type.
    _handle_message_global_delivery_status = _write_prepared
    _handle_message_global_headers = _write_prepared


def _part_policy(utf8: bool) -> email_policy.EmailPolicy:
    return email_policy.SMTPUTF8 if utf8 else email_policy.SMTP


def _subject(recipients: Sequence[FailedRecipient]) -> str:
    actions = {rcpt.action for rcpt in recipients}
    if actions == {"failed"}:
        return "Undelivered Mail Returned to Sender"
    if actions == {"delayed"}:
        return "Delayed Mail (still being retried)"
    return "Undelivered Mail Returned to Sender (others still being retried)"


def _header_section(original: bytes) -> bytes:
    """Everything before the first empty line of ``original``, CRLF-ended."""
    lines = []
    for line in original.splitlines():
        if not line:
            break
        lines.append(line + b"\r\n")
    return b"".join(lines)


# -- part 1: the note a person reads -----------------------------------------


def _explanation_part(
    reporting_mta: str,
    msg_id: str,
    arrival: datetime,
    recipients: Sequence[FailedRecipient],
    utf8: bool,
) -> MIMEPart:
    failed = [rcpt for rcpt in recipients if rcpt.action == "failed"]
    delayed = [rcpt for rcpt in recipients if rcpt.action == "delayed"]
    when = format_datetime(arrival)
    paragraphs = [_wrap(f"This is the mail system at {reporting_mta}.")]
    if failed:
        paragraphs.append(
            _wrap(
                f"Your message of {when} could not be delivered to the "
                "recipients below. The mail system has given up on them and "
                "will not try again."
            )
        )
        paragraphs.extend(_recipient_note(rcpt) for rcpt in failed)
    if delayed:
        paragraphs.append(
            _wrap(
                f"Your message of {when} has not yet been delivered to the "
                "recipients below. The mail system keeps trying; you do not "
                "need to send the message again."
            )
        )
        paragraphs.extend(_recipient_note(rcpt) for rcpt in delayed)
    paragraphs.append(
        _wrap(
            "The attached report gives the details for the mail system "
            f"administrator (queue id {msg_id}), followed by the headers of "
            "your message."
        )
    )
    text = "\n\n".join(paragraphs) + "\n"

    part = MIMEPart(policy=_part_policy(utf8))
    if text.isascii():
        part.set_content(text, charset="us-ascii", cte="7bit")
    else:
        cte = "8bit" if utf8 else "quoted-printable"
        part.set_content(text, charset="utf-8", cte=cte)
    part["Content-Description"] = "Notification"
    return part


def _recipient_note(rcpt: FailedRecipient) -> str:
    """One recipient in plain words, the remote reply quoted below."""
    reason = _STATUS_WORDS.get(rcpt.status.split(".", 1)[1])
    lines = [_one_line(f"<{rcpt.recipient}>")]
    lines.append(
        _wrap(f"Status {rcpt.status}" + (f": {reason}." if reason else "."), "  ")
    )
    if rcpt.diagnostic:
        who = rcpt.remote_mta or "The receiving mail server"
        lines.append(_wrap(f"{who} replied:", "  "))
        lines.append(_wrap(_one_line(rcpt.diagnostic), "      "))
    if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
        until = format_datetime(rcpt.will_retry_until)
        lines.append(_wrap(f"The mail system keeps trying until {until}.", "  "))
    return "\n".join(lines)


def _wrap(text: str, indent: str = "") -> str:
    # Short lines keep the part 7-bit clean and readable in any client.
    return "\n".join(
        textwrap.wrap(
            text,
            width=72,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
    )


# -- part 2: the machine-readable report -------------------------------------


def _status_part(
    reporting_mta: str,
    msg_id: str,
    arrival: datetime,
    recipients: Sequence[FailedRecipient],
    utf8: bool,
) -> MIMEPart:
    blocks = [
        [
            ("Reporting-MTA", f"dns; {_one_line(reporting_mta)}"),
            ("X-PowerMail-Queue-ID", _one_line(msg_id)),
            ("Arrival-Date", format_datetime(arrival)),
        ]
    ]
    blocks.extend(_recipient_fields(rcpt, utf8) for rcpt in recipients)
    part = MIMEPart(policy=_part_policy(utf8))

    if utf8:
        # Written out here; _ReportGenerator copies the octets unchanged.
        text = "\r\n\r\n".join(
            "\r\n".join(f"{name}: {value}" for name, value in block) for block in blocks
        )
        part["Content-Type"] = "message/global-delivery-status"
        part["Content-Transfer-Encoding"] = "7bit" if text.isascii() else "8bit"
        part.set_payload(text + "\r\n")
    else:
        # compat32 blocks keep each field exactly as written; the default
        # policy would parse them as unstructured headers and decode any
        # "=?...?=" a remote reply happened to contain.
        messages = []
        for block in blocks:
            message = Message(policy=compat32)
            for name, value in block:
                message[name] = value
            messages.append(message)
        part["Content-Type"] = "message/delivery-status"
        part.set_payload(messages)
    part["Content-Description"] = "Delivery report"
    return part


def _recipient_fields(rcpt: FailedRecipient, utf8: bool) -> list[tuple[str, str]]:
    if rcpt.recipient.isascii():
        final = f"rfc822; {_one_line(rcpt.recipient)}"
    else:
        final = f"utf-8; {_utf8_address(rcpt.recipient, utf8)}"
    fields = [
        ("Final-Recipient", final),
        ("Action", rcpt.action),
        ("Status", rcpt.status),
    ]
    if rcpt.remote_mta:
        fields.append(("Remote-MTA", f"dns; {_mta_name(rcpt.remote_mta)}"))
    if rcpt.diagnostic:
        text = _one_line(rcpt.diagnostic)
        kind = "smtp" if _SMTP_REPLY.match(text) else "X-PowerMail"
        if not utf8:
            text = _embed_non_ascii(text)
        fields.append(("Diagnostic-Code", f"{kind}; {text}"))
    if rcpt.last_attempt is not None:
        fields.append(("Last-Attempt-Date", format_datetime(rcpt.last_attempt)))
    if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
        fields.append(("Will-Retry-Until", format_datetime(rcpt.will_retry_until)))
    return [(name, _limit(name, value)) for name, value in fields]


def _one_line(text: str) -> str:
    """``text`` with control characters and line breaks as single spaces."""
    return _BLANKS.sub(" ", _CONTROL.sub(" ", text)).strip()


def _limit(name: str, value: str) -> str:
    room = _MAX_FIELD - len(name) - 2
    return value if len(value) <= room else value[: room - 3] + "..."


def _mta_name(host: str) -> str:
    # An address rather than a name is written as an RFC 5321 address literal.
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return _one_line(host)
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def _embed_non_ascii(text: str) -> str:
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):02X}}}" for ch in text)


def _utf8_address(address: str, utf8: bool) -> str:
    """``address`` in the ``utf-8`` address type of RFC 6533 section 3.

    A global report carries UTF-8 as it is (utf-8-addr-unitext); a 7-bit
    one spells every non-ASCII character ``\\x{HEX}`` (utf-8-addr-xtext).
    Either way ``\\``, ``+``, ``=``, spaces and controls are escaped.
    """
    out = []
    for ch in address:
        code = ord(ch)
        if ch in "\\+=" or code <= 0x20 or code == 0x7F or (code > 0x7F and not utf8):
            out.append(f"\\x{{{code:02X}}}")
        else:
            out.append(ch)
    return "".join(out)


# -- part 3: the original message's headers ----------------------------------


def _headers_part(headers: bytes, utf8: bool) -> MIMEPart:
    part = MIMEPart(policy=_part_policy(utf8))
    if utf8 and _is_utf8(headers):
        part["Content-Type"] = "message/global-headers"
        part["Content-Transfer-Encoding"] = "7bit" if headers.isascii() else "8bit"
        part.set_payload(headers.decode("utf-8"))
    elif headers.isascii():
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(headers.decode("ascii"))
    else:
        # 8-bit bytes that are not UTF-8 a global report could carry: keep
        # them exact in quoted-printable, which any transport accepts.
        encoded = binascii.b2a_qp(headers, quotetabs=False, istext=True, header=False)
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(encoded.decode("ascii"))
    part["Content-Description"] = "Undelivered message headers"
    return part


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
