"""Making a message fit for SMTP transport: no line over 998 octets.

PowerMail accepts lines up to ``mx.max_body_line`` (real mail has long
lines), but RFC 5321 section 4.5.3.1.6 allows 998 octets per line on the
wire.  Before such a message is queued for a next hop, each MIME part that
holds a long line is re-encoded in base64 (RFC 2045), which changes how it
travels and not what it says.  Messages without long lines are never
touched, byte for byte.
"""

from __future__ import annotations

import email.encoders
import io
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser

__all__ = ["MAX_LINE", "fit_for_transport", "has_long_lines"]

MAX_LINE = 998
_POLICY = email_policy.compat32.clone(linesep="\r\n", max_line_length=0)


def has_long_lines(data: bytes, limit: int = MAX_LINE) -> bool:
    """Whether a line of ``data`` (CRLF line ends) is longer than ``limit``."""
    return max(map(len, data.split(b"\r\n")), default=0) > limit


def _reencode(part: Message) -> None:
    # Text keeps its CRLF line ends inside the base64: the canonical form
    # of text that RFC 2045 section 6.8 asks to encode.
    payload = part.get_payload(decode=True) or b""
    del part["Content-Transfer-Encoding"]
    part.set_payload(payload)
    email.encoders.encode_base64(part)


def fit_for_transport(data: bytes, limit: int = MAX_LINE) -> bytes:
    """``data`` with every part that has a long line re-encoded in base64.

    A header line over the limit is left as it is (folding it could change
    its meaning); only bodies are re-encoded.
    """
    if not has_long_lines(data, limit):
        return data
    message = BytesParser(policy=_POLICY).parsebytes(data)
    changed = False
    for part in message.walk():
        if part.is_multipart():
            continue
        body = part.get_payload()
        if isinstance(body, str):
            # Undecodable octets come back as surrogates: count them as one.
            raw = body.encode("utf-8", "surrogateescape")
            if has_long_lines(
                raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), limit
            ):
                _reencode(part)
                changed = True
    if not changed:
        return data
    if "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(message)
    return out.getvalue()
