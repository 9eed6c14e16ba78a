"""The MX through the real `twistd powermail`, with smtplib and raw sockets.

Each message is checked byte for byte in the recipient's Maildir: the
Return-Path and Received lines PowerMail prepends, then exactly what the
client sent (dot-unstuffed, CRLF line ends).
"""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8

import pytest
from powermail_process import PowerMail
from smtp_wire import Wire

_TRACE = re.compile(
    rb"\AReturn-Path: <(?P<sender>[^>]*)>\r\n"
    rb"Received: from (?P<helo>\S+) \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.example\.test \(PowerMail\) with (?P<proto>[A-Z0-9]+)"
    rb" id (?P<id>[0-9a-v]{18})"
    rb"(?:\r\n\tfor <(?P<rcpt>[^>]+)>)?; (?P<date>[^\r\n]+)\r\n"
)


def split_trace(stored: bytes) -> tuple[re.Match, bytes]:
    """The trace headers PowerMail added, and the message as sent."""
    match = _TRACE.match(stored)
    assert match, stored[:300]
    return match, stored[match.end() :]


def unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def rich_message(*, utf8: bool) -> bytes:
    """Multipart with a PDF, a UTF-8 subject, dot lines and a long line."""
    msg = EmailMessage(policy=SMTPUTF8 if utf8 else SMTP)
    msg["From"] = "Zoë Sender <zoe@remote.test>"
    msg["To"] = "jösé@example.test" if utf8 else "alice@example.test"
    msg["Subject"] = "Réunion à 10h — ordre du jour"
    msg["Message-ID"] = "<test-1@remote.test>"
    body = (
        "Bonjour,\n"
        ".a line that starts with a dot\n"
        "..and one with two\n"
        ".\n"
        "the line above was a lone dot inside the text\n" + "x" * 5000 + "\nend\n"
    )
    msg.set_content(body, cte="8bit" if utf8 else "quoted-printable")
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="ordre.pdf")
    raw = msg.as_bytes()
    if not utf8:
        # Keep the 5000-octet line as it is: quoted-printable would fold it.
        raw = raw.replace(b"=\r\n", b"")
    return raw


def test_rich_message_stored_byte_for_byte(shared_powermail: PowerMail):
    raw = rich_message(utf8=False)
    assert b"\r\n." in raw and max(map(len, raw.split(b"\r\n"))) > 4000
    with smtplib.SMTP("127.0.0.1", shared_powermail.port) as client:
        refused = client.sendmail("zoe@remote.test", ["alice@example.test"], raw)
    assert refused == {}
    stored = shared_powermail.messages("alice")[-1]
    trace, body = split_trace(stored)
    assert body == raw
    assert trace["sender"] == b"zoe@remote.test"
    assert trace["proto"] == b"ESMTP"
    assert trace["rcpt"] == b"alice@example.test"


def test_utf8_message_and_address_over_starttls(shared_powermail: PowerMail):
    raw = rich_message(utf8=True)
    with smtplib.SMTP("127.0.0.1", shared_powermail.port) as client:
        client.starttls(context=unverified_tls())
        refused = client.sendmail(
            "zoë@remote.test",
            ["JÖSÉ@example.test"],
            raw,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    assert refused == {}
    trace, body = split_trace(shared_powermail.messages("jösé")[-1])
    assert body == raw
    assert trace["proto"] == b"UTF8SMTPS"
    assert trace["sender"] == "zoë@remote.test".encode()
    assert trace["rcpt"] == "JÖSÉ@example.test".encode()


def test_utf8_address_without_smtputf8_is_refused(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    assert wire.command("MAIL FROM:<zoë@remote.test>".encode()) == (
        b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
    )
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    assert wire.command("RCPT TO:<jösé@example.test>".encode()) == (
        b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
    )


def test_message_to_two_mailboxes_lands_in_both(shared_powermail: PowerMail):
    raw = b"Subject: team\r\n\r\nfor both of you\r\n"
    with smtplib.SMTP("127.0.0.1", shared_powermail.port) as client:
        client.sendmail("zoe@remote.test", ["team@example.test"], raw)
    for local in ("alice", "bob"):
        trace, body = split_trace(shared_powermail.messages(local)[-1])
        assert body == raw
        assert trace["rcpt"] == b"team@example.test"


@pytest.mark.parametrize(
    "recipient",
    [
        b"<postmaster>",
        b"<POSTMASTER>",
        b"<PostMaster@EXAMPLE.test>",
        b"<abuse@example.test>",
    ],
)
def test_postmaster_is_always_accepted(shared_powermail: PowerMail, recipient: bytes):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    assert wire.command(b"MAIL FROM:<>") == b"250 2.1.0 Sender OK\r\n"
    assert wire.command(b"RCPT TO:" + recipient) == b"250 2.1.5 Recipient OK\r\n"


@pytest.mark.parametrize(
    ("recipient", "reply"),
    [
        (b"<nobody@example.test>", b"550 5.1.1 No such user here: nobody@example.test"),
        (b"<alice@evil.test>", b"550 5.7.1 Relaying denied: alice@evil.test"),
        (
            b"<alice%evil.test@example.test>",
            b"550 5.7.1 Relaying denied: alice%evil.test@example.test",
        ),
        (
            b"<evil.test!alice@example.test>",
            b"550 5.7.1 Relaying denied: evil.test!alice@example.test",
        ),
        (
            b'<"alice@evil.test"@example.test>',
            b'550 5.7.1 Relaying denied: "alice@evil.test"@example.test',
        ),
        (
            b"<@example.test:alice@evil.test>",
            b"550 5.7.1 Relaying denied: alice@evil.test",
        ),
        (b"<alice@evil.test@>", b"550 5.7.1 Relaying denied: alice@evil.test@"),
        (
            b"<alice@evil.test@example.test>",
            b"550 5.7.1 Relaying denied: alice@evil.test@example.test",
        ),
        (b"<alice@[127.0.0.1]>", b"550 5.7.1 Relaying denied: alice@[127.0.0.1]"),
        (b"<alice@[IPv6:::1]>", b"550 5.7.1 Relaying denied: alice@[IPv6:::1]"),
        (b"<alice>", b"501 5.1.3 Bad recipient address syntax: address has no domain"),
        (b"alice@example.test", b"501 5.5.4 Syntax: RCPT TO:<address>"),
    ],
)
def test_refused_recipients(
    shared_powermail: PowerMail, recipient: bytes, reply: bytes
):
    """Unknown users and every relay trick, from loopback: no exemption."""
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<alice@example.test>")
    assert wire.command(b"RCPT TO:" + recipient) == reply + b"\r\n"


def test_source_route_to_a_hosted_domain_is_ignored(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<@relay.test:zoe@remote.test>")
    assert wire.command(b"RCPT TO:<@evil.test,@other.test:bob@example.test>") == (
        b"250 2.1.5 Recipient OK\r\n"
    )


def test_pipelined_session_is_answered_in_order(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    assert wire.reply() == b"220 mx.example.test ESMTP PowerMail\r\n"
    wire.send(
        b"EHLO client.test\r\n"
        b"MAIL FROM:<zoe@remote.test> SIZE=100 BODY=8BITMIME\r\n"
        b"RCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\n"
        b"DATA\r\n"
    )
    assert wire.reply().startswith(b"250-mx.example.test Hello client.test")
    assert wire.reply() == b"250 2.1.0 Sender OK\r\n"
    assert wire.reply() == b"250 2.1.5 Recipient OK\r\n"
    assert wire.reply() == b"550 5.1.1 No such user here: nobody@example.test\r\n"
    assert wire.reply() == b"250 2.1.5 Recipient OK\r\n"
    assert wire.reply() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    wire.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    stored = wire.reply()
    assert re.fullmatch(rb"250 2\.0\.0 OK: message [0-9a-v]{18} stored\r\n", stored)
    assert wire.reply() == b"250 2.0.0 OK\r\n"
    assert wire.reply() == b"250 2.0.0 OK\r\n"
    assert wire.reply() == b"221 2.0.0 Bye\r\n"
    msg_id = stored.split()[4]
    assert split_trace(shared_powermail.messages("bob")[-1])[0]["id"] == msg_id
    assert msg_id.decode() in shared_powermail.log_text()


def test_ehlo_advertises_the_extensions(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    wire.reply()
    assert wire.command(b"EHLO client.test") == (
        b"250-mx.example.test Hello client.test [127.0.0.1]\r\n"
        b"250-PIPELINING\r\n"
        b"250-SIZE 52428800\r\n"
        b"250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-SMTPUTF8\r\n"
        b"250-STARTTLS\r\n"
        b"250 HELP\r\n"
    )


def test_simple_commands(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    wire.reply()
    assert (
        wire.command(b"MAIL FROM:<a@b.test>")
        == b"503 5.5.1 Send EHLO or HELO first\r\n"
    )
    assert wire.command(b"HELO client.test") == b"250 mx.example.test\r\n"
    assert wire.command(b"MAIL FROM:<a@b.test> SIZE=10") == (
        b"555 5.5.4 Parameters need EHLO, not HELO\r\n"
    )
    assert wire.command(b"NOOP") == b"250 2.0.0 OK\r\n"
    assert wire.command(b"VRFY alice") == (
        b"252 2.5.0 Cannot VRFY user, but will accept message for it\r\n"
    )
    assert wire.command(b"VRFY") == b"501 5.5.4 Syntax: VRFY address\r\n"
    assert wire.command(b"HELP") == (
        b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
        b" STARTTLS\r\n"
    )
    assert (
        wire.command(b"RCPT TO:<alice@example.test>")
        == b"503 5.5.1 Need MAIL before RCPT\r\n"
    )
    assert wire.command(b"DATA") == b"503 5.5.1 Need MAIL before DATA\r\n"
    assert wire.command(b"MAIL FROM:<a@b.test>") == b"250 2.1.0 Sender OK\r\n"
    assert (
        wire.command(b"MAIL FROM:<a@b.test>") == b"503 5.5.1 Sender already given\r\n"
    )
    assert wire.command(b"DATA") == b"503 5.5.1 Need RCPT before DATA\r\n"
    assert wire.command(b"RSET") == b"250 2.0.0 OK\r\n"
    assert wire.command(b"BDAT 10 LAST") == b"500 5.5.2 Command not recognised\r\n"
    assert wire.command(b"EXPN staff") == b"502 5.5.1 EXPN not implemented\r\n"
    assert wire.command(b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert wire.closed()


def test_all_recipients_refused_then_data(shared_powermail: PowerMail):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<a@b.test>")
    wire.command(b"RCPT TO:<nobody@example.test>")
    assert wire.command(b"DATA") == b"554 5.5.1 No valid recipients\r\n"


def test_overlong_command_line_is_refused_and_session_goes_on(
    shared_powermail: PowerMail,
):
    wire = Wire(shared_powermail.port)
    wire.reply()
    assert (
        wire.command(b"NOOP " + b"x" * 5000)
        == b"500 5.5.2 Line too long (limit 2048 octets)\r\n"
    )
    assert wire.command(b"NOOP") == b"250 2.0.0 OK\r\n"


def test_starttls_discards_pipelined_commands(shared_powermail: PowerMail):
    """A command sent in the clear behind STARTTLS never runs inside TLS."""
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert wire.reply() == b"220 2.0.0 Ready to start TLS\r\n"
    wire.start_tls()
    # The session starts over: no EHLO yet, no transaction, no MAIL reply.
    assert (
        wire.command(b"RCPT TO:<alice@example.test>")
        == b"503 5.5.1 Need MAIL before RCPT\r\n"
    )
    assert (
        wire.command(b"MAIL FROM:<a@b.test>")
        == b"503 5.5.1 Send EHLO or HELO first\r\n"
    )
    ehlo = wire.command(b"EHLO client.test")
    assert b"STARTTLS" not in ehlo
    assert wire.command(b"STARTTLS") == b"503 5.5.1 TLS already active\r\n"
    log = shared_powermail.wait_for_log("pipelined behind STARTTLS")
    assert "discarded 32 octets pipelined behind STARTTLS" in log


def test_after_250_the_message_survives_a_kill(powermail: PowerMail):
    """250 means on disk: a SIGKILL right after the reply loses nothing."""
    wire = Wire(powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    wire.command(b"RCPT TO:<alice@example.test>")
    wire.command(b"DATA")
    assert wire.command(b"Subject: durable\r\n\r\nkeep me\r\n.").startswith(
        b"250 2.0.0"
    )
    powermail.kill()
    (stored,) = powermail.messages("alice")
    assert split_trace(stored)[1] == b"Subject: durable\r\n\r\nkeep me\r\n"
    assert list((powermail.maildir("alice") / "tmp").iterdir()) == []


def test_size_limits(limited):
    server = limited("max_message_size = 2000")
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    assert wire.command(b"MAIL FROM:<a@b.test> SIZE=2001") == (
        b"552 5.3.4 Message size exceeds the limit of 2000 octets\r\n"
    )
    assert wire.command(b"MAIL FROM:<a@b.test> SIZE=1000") == b"250 2.1.0 Sender OK\r\n"
    wire.command(b"RCPT TO:<alice@example.test>")
    wire.command(b"DATA")
    # An undeclared oversized message is read to its end, then refused.
    big = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100
    assert (
        wire.command(big + b".")
        == b"552 5.3.4 Message exceeds the limit of 2000 octets\r\n"
    )
    assert wire.command(b"NOOP") == b"250 2.0.0 OK\r\n"
    assert server.messages("alice") == []


def test_recipient_limit(limited):
    server = limited("max_recipients = 2")
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<a@b.test>")
    assert (
        wire.command(b"RCPT TO:<alice@example.test>") == b"250 2.1.5 Recipient OK\r\n"
    )
    assert wire.command(b"RCPT TO:<bob@example.test>") == b"250 2.1.5 Recipient OK\r\n"
    assert wire.command(b"RCPT TO:<postmaster>") == b"452 4.5.3 Too many recipients\r\n"


def test_body_line_limit_never_ends_the_message(limited):
    """Twisted's own server leaves DATA on a long line; PowerMail reads on."""
    server = limited("max_body_line = 1000")
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<a@b.test>")
    wire.command(b"RCPT TO:<alice@example.test>")
    wire.command(b"DATA")
    wire.send(
        b"Subject: long\r\n\r\n"
        + b"z" * 3000
        + b"\r\nRSET\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<bob@example.test>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n"
        b"NOOP\r\n"
    )
    assert (
        wire.reply()
        == b"554 5.6.0 Message refused: a line is longer than 1000 octets\r\n"
    )
    assert wire.reply() == b"250 2.0.0 OK\r\n"
    assert server.messages("alice") == [] and server.messages("bob") == []


def test_too_many_errors_closes_the_session(limited):
    server = limited("max_errors = 3")
    wire = Wire(server.port)
    wire.reply()
    assert wire.command(b"FOO") == b"500 5.5.2 Command not recognised\r\n"
    assert wire.command(b"BAR") == b"500 5.5.2 Command not recognised\r\n"
    wire.send(b"BAZ\r\n")
    assert wire.reply() == b"500 5.5.2 Command not recognised\r\n"
    assert (
        wire.reply()
        == b"421 4.7.0 mx.example.test Too many errors, closing connection\r\n"
    )
    assert wire.closed()


def test_connections_per_client_are_limited(limited):
    server = limited("max_connections_per_client = 2")
    first, second = Wire(server.port), Wire(server.port)
    first.reply(), second.reply()
    third = Wire(server.port)
    assert third.reply() == (
        b"421 4.7.0 mx.example.test Too many connections from your address, try later\r\n"
    )
    assert third.closed()
    first.command(b"QUIT")
    first.closed()
    time.sleep(0.3)
    fourth = Wire(server.port)
    assert fourth.reply() == b"220 mx.example.test ESMTP PowerMail\r\n"


def test_idle_timeout(limited):
    server = limited("idle_timeout = 1")
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    assert (
        wire.reply()
        == b"421 4.4.2 mx.example.test Idle timeout, closing connection\r\n"
    )
    assert wire.closed()


def test_session_timeout_in_the_middle_of_data(limited):
    server = limited("session_timeout = 2")
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<a@b.test>")
    wire.command(b"RCPT TO:<alice@example.test>")
    wire.command(b"DATA")
    wire.send(b"Subject: slow\r\n\r\n")
    assert (
        wire.reply()
        == b"421 4.4.2 mx.example.test Session too long, closing connection\r\n"
    )
    assert wire.closed()
    assert server.messages("alice") == []
    tmp = server.maildir("alice") / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_quit_after_starttls_closes_at_once(shared_powermail):
    """The TLS session ends with the 221, not a reset after a grace period."""
    smtp = smtplib.SMTP("127.0.0.1", shared_powermail.port, timeout=10)
    smtp.starttls(context=unverified_tls())
    smtp.ehlo()
    started = time.monotonic()
    code, _ = smtp.docmd("QUIT")
    assert code == 221
    assert smtp.sock.recv(4096) == b""
    assert time.monotonic() - started < 2
    smtp.close()
