"""The ESMTP protocol driven without sockets: exact reply bytes, in order.

A StringTransport stands for the client, a task.Clock for time, and the
MaildirStore runs its blocking work at once instead of in a thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from powermail.config import parse_config
from powermail.smtp.mx import MxPolicy
from powermail.smtp.protocol import SmtpFactory, SmtpLimits
from powermail.storage.maildir import MaildirStore

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "data"
[domains."example.test"]
[mailboxes."alice@example.test"]
[aliases]
"postmaster@example.test" = ["alice@example.test"]
"abuse@example.test" = ["alice@example.test"]
"""


def run_now(function, *args):
    return defer.maybeDeferred(function, *args)


class Client:
    """One session over a StringTransport."""

    def __init__(self, tmp_path: Path, **limits: int) -> None:
        config = parse_config(CONFIG, tmp_path / "powermail.toml")
        self.store = MaildirStore(tmp_path / "mail", run_blocking=run_now)
        self.pending: list[defer.Deferred] = []
        settings = dict(
            max_message_size=10_000,
            max_recipients=5,
            max_command_line=512,
            max_body_line=1000,
            max_errors=10,
            max_connections=10,
            max_connections_per_client=10,
            idle_timeout=300,
            session_timeout=1800,
        )
        settings.update(limits)
        self.clock = task.Clock()
        self.factory = SmtpFactory(
            policy=MxPolicy(directory=lambda: config.directory, store=self.store),
            limits=SmtpLimits(**settings),
            hostname="mx.example.test",
            clock=self.clock,
        )
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.read()


@pytest.fixture
def client(tmp_path):
    c = Client(tmp_path)
    assert c.read() == b"220 mx.example.test ESMTP PowerMail\r\n"
    return c


def test_ehlo_reply_without_tls(client):
    assert client.send(b"EHLO c.test\r\n") == (
        b"250-mx.example.test Hello c.test [0.0.0.0]\r\n"
        b"250-PIPELINING\r\n"
        b"250-SIZE 10000\r\n"
        b"250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n"
        b"250-SMTPUTF8\r\n"
        b"250 HELP\r\n"
    )
    assert client.send(b"STARTTLS\r\n") == b"454 4.7.0 TLS not available\r\n"


def test_whole_transaction_in_one_packet(client, tmp_path):
    out = client.send(
        b"EHLO c.test\r\nMAIL FROM:<z@r.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n"
    )
    lines = out.split(b"\r\n")
    assert lines[7:10] == [
        b"250 2.1.0 Sender OK",
        b"250 2.1.5 Recipient OK",
        b"354 End data with <CR><LF>.<CR><LF>",
    ]
    assert lines[10].startswith(b"250 2.0.0 OK: message ")
    assert lines[11:] == [b"221 2.0.0 Bye", b""]
    (path,) = (tmp_path / "mail/example.test/alice/Maildir/new").iterdir()
    assert path.read_bytes().endswith(b"\r\nSubject: x\r\n\r\n.dot\r\n")
    assert path.name.endswith(f",S={path.stat().st_size},W={path.stat().st_size}")


def test_replies_wait_for_a_pending_check(client):
    """A slow RCPT check holds the next command's reply back."""
    gate = defer.Deferred()
    policy = client.factory.policy
    original = policy.check_recipient

    def slow(session, envelope, address):
        return gate.addCallback(lambda _: original(session, envelope, address))

    policy.check_recipient = slow
    client.send(b"EHLO c.test\r\n")
    out = client.send(
        b"MAIL FROM:<z@r.test>\r\nRCPT TO:<alice@example.test>\r\nNOOP\r\n"
    )
    assert out == b"250 2.1.0 Sender OK\r\n"
    gate.callback(None)
    assert client.read() == b"250 2.1.5 Recipient OK\r\n250 2.0.0 OK\r\n"


def test_unexpected_policy_error_is_a_451_without_details(client):
    def broken(session, envelope, address):
        raise RuntimeError("database password is hunter2")

    client.factory.policy.check_recipient = broken
    client.send(b"EHLO c.test\r\nMAIL FROM:<z@r.test>\r\n")
    assert client.send(b"RCPT TO:<alice@example.test>\r\n") == (
        b"451 4.3.0 Temporary local problem, try again later\r\n"
    )


def test_mail_parameters(client):
    client.send(b"EHLO c.test\r\n")
    assert client.send(b"MAIL FROM:<a@b.test> SIZE=abc\r\n") == (
        b"501 5.5.4 Bad SIZE parameter value\r\n"
    )
    assert client.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n") == (
        b"501 5.5.4 Bad BODY parameter value\r\n"
    )
    assert client.send(b"MAIL FROM:<a@b.test> RET=FULL\r\n") == (
        b"555 5.5.4 Unsupported parameter RET\r\n"
    )
    assert client.send(b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2\r\n") == (
        b"501 5.5.4 Syntax: MAIL FROM:<address> [parameters]\r\n"
    )
    assert client.send(b"MAIL FROM:<a@b@c.test>\r\n") == (
        b"501 5.1.7 Bad sender address syntax: address has more than one @\r\n"
    )
    assert client.send(b"MAIL FROM: <a@b.test> smtputf8 body=8bitmime\r\n") == (
        b"250 2.1.0 Sender OK\r\n"
    )
    assert client.send(b"RCPT TO:<alice@example.test> NOTIFY=NEVER\r\n") == (
        b"555 5.5.4 Unsupported parameter NOTIFY\r\n"
    )


def test_invalid_utf8_and_empty_helo(client):
    assert client.send(b"NOOP \xff\r\n") == b"500 5.5.2 Command is not valid UTF-8\r\n"
    assert client.send(b"EHLO\r\n") == b"501 5.5.4 Syntax: EHLO hostname\r\n"
    assert client.send(b"HELO a b\r\n") == b"501 5.5.4 Syntax: HELO hostname\r\n"


def test_line_without_end_is_not_buffered_forever(client):
    client.send(b"NOOP " + b"x" * 100_000)
    assert len(client.protocol._buffer) <= 1
    assert client.send(b"\r\nNOOP\r\n") == (
        b"500 5.5.2 Line too long (limit 512 octets)\r\n250 2.0.0 OK\r\n"
    )


def test_idle_timeout_with_clock(client):
    client.clock.advance(299)
    assert client.read() == b""
    client.send(b"NOOP\r\n")
    client.clock.advance(299)
    assert client.read() == b""
    client.clock.advance(2)
    assert (
        client.read()
        == b"421 4.4.2 mx.example.test Idle timeout, closing connection\r\n"
    )
    assert client.transport.disconnecting


def test_lost_connection_in_data_leaves_nothing(client, tmp_path):
    client.send(
        b"EHLO c.test\r\nMAIL FROM:<z@r.test>\r\nRCPT TO:<alice@example.test>\r\n"
    )
    client.send(b"DATA\r\nSubject: cut\r\n\r\nhalf")
    client.protocol.connectionLost()
    maildir = tmp_path / "mail/example.test/alice/Maildir"
    assert not maildir.exists()
    assert client.factory.sessions == set()


def test_control_characters_in_a_command_are_refused(client):
    """A bare LF inside a command could reach a header or split a reply."""
    client.send(b"EHLO c.test\r\n")
    assert client.send(b"MAIL FROM:<x@[IPv6:fe80::1]\nX-Injected: evil>\r\n") == (
        b"500 5.5.2 Command contains a control character\r\n"
    )
    assert client.send(b"RCPT TO:<a@b@c\r250 fake>\r\n") == (
        b"500 5.5.2 Command contains a control character\r\n"
    )
    assert client.send(b"NO\x00OP\r\n") == (
        b"500 5.5.2 Command contains a control character\r\n"
    )


def test_ipv6_literal_with_a_scope_is_refused(client):
    client.send(b"EHLO c.test\r\n")
    assert client.send(b"MAIL FROM:<x@[IPv6:fe80::1%eth0]>\r\n") == (
        b"501 5.1.7 Bad sender address syntax: invalid address literal\r\n"
    )


def test_only_ascii_digits_make_a_size(client):
    client.send(b"EHLO c.test\r\n")
    assert client.send("MAIL FROM:<a@b.test> SIZE=²\r\n".encode()) == (
        b"501 5.5.4 Bad SIZE parameter value\r\n"
    )
    assert client.send("MAIL FROM:<a@b.test> SIZE=١٢ SMTPUTF8\r\n".encode()) == (
        b"501 5.5.4 Bad SIZE parameter value\r\n"
    )


def test_only_ascii_verbs_are_commands(client):
    """Unicode case folding must not turn ſTARTTLS into STARTTLS."""
    assert (
        client.send("ſTARTTLS\r\n".encode()) == b"500 5.5.2 Command not recognised\r\n"
    )
    assert client.send("QUıT\r\n".encode()) == b"500 5.5.2 Command not recognised\r\n"


def test_input_is_not_read_while_a_reply_is_pending(client):
    gate = defer.Deferred()
    client.factory.policy.check_sender = lambda session, envelope: gate
    client.send(b"EHLO c.test\r\n")
    assert client.send(b"MAIL FROM:<a@b.test>\r\nNOOP\r\n") == b""
    # A little read-ahead is kept; past the limit, reading stops.
    assert client.transport.producerState == "producing"
    client.send(b"NOOP\r\n" * 12000)
    assert client.transport.producerState == "paused"
    gate.callback(None)
    assert client.read() == b"250 2.1.0 Sender OK\r\n" + b"250 2.0.0 OK\r\n" * 12001
    assert client.transport.producerState == "producing"


def test_a_client_that_does_not_read_stops_being_read(client):
    """The transport's full write buffer pauses the session's input."""
    client.protocol.pauseProducing()
    assert client.transport.producerState == "paused"
    assert client.send(b"NOOP\r\nNOOP\r\n") == b""
    client.protocol.resumeProducing()
    assert client.read() == b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"


def test_a_closing_connection_is_cut_after_the_grace_period(client):
    """A client that stalls after a timeout cannot keep its slot."""
    client.clock.advance(300)
    assert client.read().startswith(b"421 4.4.2")
    assert client.transport.disconnecting
    client.clock.advance(9)
    # StringTransport marks an abort (not a graceful close) as "disconnected".
    assert not client.transport.disconnected
    client.clock.advance(1)
    assert client.transport.disconnected
    # The session timer was cancelled with the close: nothing else fires.
    assert client.clock.getDelayedCalls() == []


def test_data_without_mail(client):
    client.send(b"EHLO c.test\r\n")
    assert client.send(b"DATA\r\n") == b"503 5.5.1 Need MAIL before DATA\r\n"


def test_mail_loop_is_refused_by_its_received_lines(client):
    """More than 50 Received lines: 554 5.4.6 (RFC 5321 section 6.3)."""
    client.send(
        b"EHLO c.test\r\nMAIL FROM:<z@r.test>\r\nRCPT TO:<alice@example.test>\r\n"
    )
    client.read()
    hops = b"".join(b"Received: from hop%d.test\r\n" % i for i in range(51))
    out = client.send(b"DATA\r\n" + hops + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
    assert out.endswith(b"554 5.4.6 Too many hops (51 Received lines): mail loop\r\n")
    hops = b"".join(b"received: from hop%d.test\r\n" % i for i in range(50))
    client.send(b"MAIL FROM:<z@r.test>\r\nRCPT TO:<alice@example.test>\r\n")
    out = client.send(
        b"DATA\r\n" + hops + b"\r\nReceived: in the body\r\n" * 5 + b".\r\n"
    )
    assert b"250 2.0.0 OK: message" in out
