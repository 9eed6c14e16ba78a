"""SMTP smuggling: no end-of-data other than CRLF.CRLF, no second message.

Each attempt hides a second transaction behind a fake end of data.  A server
that took the fake end would store the smuggled message for bob; PowerMail
must read everything up to the real CRLF.CRLF as one message, refuse it for
its bare line ends, and store nothing.
"""

from __future__ import annotations

import pytest
from powermail_process import PowerMail
from smtp_wire import Wire

SMUGGLED = (
    b"MAIL FROM:<ceo@example.test>\r\n"
    b"RCPT TO:<bob@example.test>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.test\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"wire the money\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"],
    ids=repr,
)
def test_fake_end_of_data_smuggles_nothing(
    shared_powermail: PowerMail, fake_end: bytes
):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    wire.command(b"RCPT TO:<alice@example.test>")
    assert wire.command(b"DATA").startswith(b"354")
    wire.send(b"Subject: first\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\nNOOP\r\n")
    assert wire.reply() == (
        b"554 5.6.0 Message refused: bare CR or LF, lines must end in CRLF\r\n"
    )
    assert wire.reply() == b"250 2.0.0 OK\r\n"
    assert shared_powermail.messages("bob") == []
    assert shared_powermail.messages("alice") == []


def test_end_of_data_split_across_packets_is_still_found(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    wire.command(b"RCPT TO:<bob@example.test>")
    wire.command(b"DATA")
    for piece in (b"Subject: split\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
        wire.send(piece)
    assert wire.reply().startswith(b"250 2.0.0 OK: message ")
    (stored,) = shared_powermail.messages("bob")
    assert stored.endswith(b"Subject: split\r\n\r\nbody\r\n")
