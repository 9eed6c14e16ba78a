"""Trace headers PowerMail prepends to a message it accepts (RFC 5321 4.4).

Twisted's own Received header folds with a bare LF; these end every line in
CRLF and fold with CRLF and a tab, so the stored message stays well formed.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["new_message_id", "received_header", "return_path_header"]

_B32 = "0123456789abcdefghijklmnopqrstuv"


def new_message_id() -> str:
    """A short, unique id that sorts by time; it follows a message in logs."""
    value = (time.time_ns() // 1_000_000) << 40 | int.from_bytes(os.urandom(5), "big")
    out = []
    for _ in range(18):
        out.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(out))


def return_path_header(sender: str | None) -> bytes:
    """``Return-Path: <sender>``; ``<>`` for a bounce."""
    return f"Return-Path: <{sender or ''}>\r\n".encode()


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    msg_id: str,
    recipient: str | None,
    tls: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """A ``Received`` header; ``recipient`` only when there is exactly one.

    ``protocol`` is the ``with`` keyword of RFC 3848 and RFC 6531 (ESMTP,
    ESMTPS, UTF8SMTPS...); ``tls`` a short description of the TLS session.
    """
    literal = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    when = format_datetime(now or datetime.now(UTC))
    lines = [f"Received: from {helo} ([{literal}])"]
    by = f"\tby {hostname} (PowerMail) with {protocol} id {msg_id}"
    if tls:
        by += f" ({tls})"
    lines.append(by)
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>; {when}")
    else:
        lines[-1] += f"; {when}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
