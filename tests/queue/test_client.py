"""The SMTP delivery client against real peers, and its wire details in memory.

End-to-end tests run ``deliver`` on the real reactor in a subprocess
(``run_client.py``) against aiosmtpd, or against a scripted socket peer where
aiosmtpd cannot do what the case needs (PIPELINING, a refused DATA command,
a close in the middle of the message).  The in-memory tests drive the same
code over a ``StringTransport`` and move time with ``MemoryReactorClock``.
"""

from __future__ import annotations

import json
import os
import socket
import ssl as stdlib_ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from powermail.queue.client import (
    CHUNK_SIZE,
    RecipientOutcome,
    SessionOutcome,
    _stuff,
    deliver,
)
from powermail.tls import ensure_self_signed

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "run_client.py"
SENDER = "sender@origin.test"
ALICE = "alice@peer.test"
BOB = "bob@peer.test"
SIMPLE = b"Subject: test\r\n\r\nHello.\r\n"


# Helpers: peers and the client in a subprocess.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Recorder:
    """An aiosmtpd handler that keeps what it is sent and answers as told."""

    def __init__(
        self,
        *,
        refuse: dict[str, str] | None = None,
        data_reply: str = "250 2.0.0 OK stored",
        close_in_data: bool = False,
    ) -> None:
        self.refuse = refuse or {}
        self.data_reply = data_reply
        self.close_in_data = close_in_data
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.contents: list[bytes] = []
        self.tls_in_data: bool | None = None

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802
        self.mail_from = address
        self.mail_options = list(mail_options)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address in self.refuse:
            return self.refuse[address]
        self.rcpt_tos.append(address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.contents.append(envelope.original_content)
        self.tls_in_data = session.ssl is not None
        if self.close_in_data:
            server.transport.close()
        return self.data_reply


@pytest.fixture
def peer():
    """Start aiosmtpd peers on free loopback ports; stopped after the test."""
    controllers = []

    def start(handler: Recorder, **smtp_options) -> int:
        port = free_port()
        controller = Controller(
            handler,
            hostname="127.0.0.1",
            port=port,
            server_hostname="peer.test",
            **smtp_options,
        )
        controller.start()
        controllers.append(controller)
        return port

    yield start
    for controller in controllers:
        controller.stop()


class ScriptedPeer:
    """A one-connection SMTP peer on 127.0.0.1 that runs ``script(self)``."""

    def __init__(self, script, *, receive_buffer: int | None = None) -> None:
        self._script = script
        self._listener = socket.socket()
        if receive_buffer:
            # Inherited by the accepted socket: keeps the client mid-message.
            self._listener.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
            )
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self.port = self._listener.getsockname()[1]
        self.error: BaseException | None = None
        self.notes: dict[str, object] = {}
        self._buffer = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._listener.settimeout(20)
            self.conn, _ = self._listener.accept()
            self.conn.settimeout(10)
            self._script(self)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self._listener.close()
            if hasattr(self, "conn"):
                self.conn.close()

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def line(self) -> bytes:
        """The next line the client sent, without its CRLF."""
        while b"\r\n" not in self._buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError(f"client closed; unread {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def expect(self, prefix: bytes) -> bytes:
        line = self.line()
        assert line.startswith(prefix), (prefix, line)
        return line

    def more_waiting(self, seconds: float) -> bool:
        """Whether the client sends anything more within ``seconds``."""
        if self._buffer:
            return True
        self.conn.settimeout(seconds)
        try:
            chunk = self.conn.recv(65536)
        except TimeoutError:
            return False
        finally:
            self.conn.settimeout(10)
        self._buffer += chunk
        return True

    def message(self) -> bytes:
        """Everything up to the end of data, still stuffed."""
        while b"\r\n.\r\n" not in self._buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed inside DATA")
            self._buffer += chunk
        data, _, self._buffer = self._buffer.partition(b"\r\n.\r\n")
        return data + b"\r\n"

    def finish(self) -> None:
        self._thread.join(20)
        if self.error is not None:
            raise self.error


def greet(peer: ScriptedPeer, *extensions: bytes) -> None:
    """Greeting and EHLO answer offering ``extensions``."""
    peer.send(b"220 scripted.test ESMTP\r\n")
    peer.expect(b"EHLO ")
    lines = [b"scripted.test", *extensions]
    peer.send(
        b"".join(
            b"250" + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
            for i, line in enumerate(lines)
        )
    )


def run_client(
    tmp_path: Path, port: int, body: bytes = SIMPLE, **overrides
) -> tuple[SessionOutcome, str]:
    """Run ``deliver`` in a subprocess; return its outcome and its log."""
    message = tmp_path / "message.eml"
    message.write_bytes(body)
    arguments = dict(
        host="127.0.0.1",
        port=port,
        helo="client.test",
        sender=SENDER,
        recipients=[ALICE, BOB],
        message=str(message),
        size=len(body),
        smtputf8=False,
        eight_bit=False,
        tls="none",
        timeout=10,
        connect_timeout=5,
    )
    arguments.update(overrides)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(arguments)],
        capture_output=True,
        text=True,
        timeout=40,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "error" not in result, result["error"]
    # "Unhandled error" or a traceback would mean an exception escaped.
    assert "Traceback" not in done.stderr, done.stderr
    raw = result["outcome"]
    outcome = SessionOutcome(
        host=raw["host"],
        port=raw["port"],
        tls=raw["tls"],
        outcomes=tuple(RecipientOutcome(**o) for o in raw["outcomes"]),
    )
    return outcome, done.stderr


def results(outcome: SessionOutcome) -> list[tuple[str, int, str]]:
    return [(o.recipient, o.code, o.status) for o in outcome.outcomes]


def pad_to(content: bytearray, offset: int) -> None:
    """Append filler lines so that the next line starts at ``offset``."""
    while offset - len(content) > 100:
        content += b"x" * 78 + b"\r\n"
    content += b"y" * (offset - len(content) - 2) + b"\r\n"
    assert len(content) == offset


def dotted_message() -> bytes:
    """Over 200 KiB, with dot lines where 64 KiB chunks meet."""
    content = bytearray(b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n")
    # A lone dot line right at the first chunk boundary: unstuffed, it would
    # end the message there.
    pad_to(content, CHUNK_SIZE)
    content += b".\r\n"
    # A chunk that ends between CR and LF, the next beginning with LF and a dot.
    pad_to(content, 2 * CHUNK_SIZE - 4)
    content += b"zzz\r"
    assert len(content) == 2 * CHUNK_SIZE
    content += b"\n.after the split\r\n"
    pad_to(content, 3 * CHUNK_SIZE)
    content += b"..dot dot at the third boundary\r\nBODY-MARKER-42\r\n"
    pad_to(content, 210 * 1024)
    content += b".last line\r\n"
    return bytes(content)


# End to end: aiosmtpd peers.


def test_accepting_peer_gets_exact_envelope_and_bytes(tmp_path, peer):
    """Envelope as given; the message byte for byte, dots unstuffed, no extra CR."""
    handler = Recorder()
    port = peer(handler)
    body = dotted_message()
    assert len(body) > 200 * 1024 and body[CHUNK_SIZE : CHUNK_SIZE + 3] == b".\r\n"

    outcome, log = run_client(tmp_path, port, body)

    assert handler.mail_from == SENDER
    assert handler.mail_options == [f"SIZE={len(body)}"]
    assert handler.rcpt_tos == [ALICE, BOB]
    assert handler.contents == [body]
    assert results(outcome) == [(ALICE, 250, "2.0.0"), (BOB, 250, "2.0.0")]
    assert all(o.delivered and o.text == "OK stored" for o in outcome.outcomes)
    assert outcome.tls is False
    # One info line for the session, no wire traffic, no body.
    assert "debug sent " not in log
    info = [line for line in log.splitlines() if line.startswith("info delivery")]
    assert info == [
        f"info delivery to 127.0.0.1:{port} (TLS no): <{ALICE}> 250 2.0.0 OK stored;"
        f" <{BOB}> 250 2.0.0 OK stored"
    ]
    assert "BODY-MARKER-42" not in log


@pytest.mark.parametrize(
    ("body", "received"),
    [
        (
            b"Subject: x\r\n\r\nno final line end",
            b"Subject: x\r\n\r\nno final line end\r\n",
        ),
        (b"", b""),
        (b".\r\n", b".\r\n"),
    ],
    ids=["no-final-crlf", "empty", "only-a-dot-line"],
)
def test_message_end_is_always_a_proper_end_of_data(tmp_path, peer, body, received):
    """A missing final CRLF is added; an empty message is sent as empty."""
    handler = Recorder()
    port = peer(handler)

    outcome, _ = run_client(tmp_path, port, body, recipients=[ALICE])

    assert handler.contents == [received]
    assert results(outcome) == [(ALICE, 250, "2.0.0")]


def test_one_recipient_refused_at_rcpt(tmp_path, peer):
    """550 for one of two: that one fails for good, the other is delivered."""
    handler = Recorder(refuse={BOB: "550 5.1.1 No such user here"})
    port = peer(handler)

    outcome, _ = run_client(tmp_path, port)

    alice, bob = outcome.outcomes
    assert alice.delivered and (alice.code, alice.status) == (250, "2.0.0")
    assert bob == RecipientOutcome(BOB, 550, "5.1.1", "No such user here")
    assert bob.permanent and not bob.temporary
    assert handler.rcpt_tos == [ALICE] and handler.contents == [SIMPLE]


def test_451_at_rcpt_for_all_fails_temporarily_without_data(tmp_path, peer):
    """Nobody accepted: no DATA, every recipient deferred with its reply."""
    busy = "451 4.3.0 Try again later"
    handler = Recorder(refuse={ALICE: busy, BOB: busy})
    port = peer(handler)

    outcome, _ = run_client(tmp_path, port)

    assert results(outcome) == [(ALICE, 451, "4.3.0"), (BOB, 451, "4.3.0")]
    assert all(o.temporary and o.text == "Try again later" for o in outcome.outcomes)
    assert handler.contents == []


def test_451_after_data_fails_accepted_recipients_temporarily(tmp_path, peer):
    """The final reply applies to every recipient accepted at RCPT."""
    handler = Recorder(
        refuse={BOB: "550 5.1.1 No such user"},
        data_reply="451 4.3.0 Local problem",
    )
    port = peer(handler)

    outcome, _ = run_client(tmp_path, port)

    assert results(outcome) == [(ALICE, 451, "4.3.0"), (BOB, 550, "5.1.1")]
    assert outcome.outcomes[0].temporary and outcome.outcomes[1].permanent


def test_peer_closing_in_data_gives_temporary_outcomes(tmp_path, peer):
    """The connection cut before the final reply: deferred, no exception."""
    handler = Recorder(close_in_data=True)
    port = peer(handler)

    outcome, _ = run_client(tmp_path, port)

    assert results(outcome) == [(ALICE, 0, "4.4.2"), (BOB, 0, "4.4.2")]
    assert all(o.temporary for o in outcome.outcomes)
    assert "lost while waiting for the reply to the end of data" in (
        outcome.outcomes[0].text
    )


def test_connection_refused(tmp_path):
    """Nobody listening: temporary 4.4.1 with a text that says so."""
    port = free_port()

    outcome, _ = run_client(tmp_path, port)

    assert results(outcome) == [(ALICE, 0, "4.4.1"), (BOB, 0, "4.4.1")]
    assert outcome.outcomes[0].text == f"connection to 127.0.0.1:{port} refused"
    assert outcome.outcomes[0].temporary


def test_message_over_the_advertised_size_is_not_sent(tmp_path, peer):
    """SIZE 1000 and a larger message: 552 5.3.4 for all, no MAIL, no DATA."""
    handler = Recorder()
    port = peer(handler, data_size_limit=1000)
    body = b"Subject: big\r\n\r\n" + b"x" * 78 * 60 + b"\r\n"

    outcome, log = run_client(tmp_path, port, body)

    assert results(outcome) == [(ALICE, 552, "5.3.4"), (BOB, 552, "5.3.4")]
    assert outcome.outcomes[0].permanent
    assert "limit of 1000 octets" in outcome.outcomes[0].text
    assert handler.mail_from is None and handler.contents == []


def test_smtputf8_needed_but_not_offered(tmp_path, peer):
    """553 5.6.7 for all, without MAIL, when the peer has no SMTPUTF8."""
    handler = Recorder()
    port = peer(handler, enable_SMTPUTF8=False)

    outcome, _ = run_client(tmp_path, port, smtputf8=True)

    assert results(outcome) == [(ALICE, 553, "5.6.7"), (BOB, 553, "5.6.7")]
    assert outcome.outcomes[0].permanent
    assert handler.mail_from is None


def test_utf8_recipient_delivered_when_smtputf8_offered(tmp_path, peer):
    """A UTF-8 address goes out with MAIL ... SMTPUTF8, even if not asked for."""
    handler = Recorder()
    port = peer(handler)
    recipient = "josé@пример.test"

    outcome, _ = run_client(tmp_path, port, recipients=[recipient])

    assert results(outcome) == [(recipient, 250, "2.0.0")]
    assert handler.rcpt_tos == [recipient]
    assert "SMTPUTF8" in handler.mail_options


def test_eight_bit_message_needs_8bitmime(tmp_path, peer):
    """BODY=8BITMIME when offered; 554 5.6.3 without sending when not."""
    offering, refusing = Recorder(), Recorder()
    body = "Subject: café\r\n\r\nDéjà vu.\r\n".encode()

    outcome, _ = run_client(tmp_path, peer(offering), body, eight_bit=True)
    assert results(outcome) == [(ALICE, 250, "2.0.0"), (BOB, 250, "2.0.0")]
    assert "BODY=8BITMIME" in offering.mail_options
    assert offering.contents == [body]

    # aiosmtpd offers no 8BITMIME when it decodes the data itself.
    outcome, _ = run_client(
        tmp_path, peer(refusing, decode_data=True), body, eight_bit=True
    )
    assert results(outcome) == [(ALICE, 554, "5.6.3"), (BOB, 554, "5.6.3")]
    assert refusing.mail_from is None


# End to end: STARTTLS with aiosmtpd and a self-signed certificate.


@pytest.fixture
def tls_peer(tmp_path, peer):
    """An aiosmtpd peer offering STARTTLS with a self-signed mx.test certificate."""
    cert, key = ensure_self_signed(tmp_path / "tls", "mx.test")
    context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handler = Recorder()
    port = peer(handler, tls_context=context, require_starttls=False)
    return handler, port, cert


def test_opportunistic_starttls_with_self_signed_peer(tmp_path, tls_peer):
    """STARTTLS is used when offered, whatever the certificate."""
    handler, port, _ = tls_peer

    outcome, _ = run_client(tmp_path, port, tls="opportunistic")

    assert outcome.tls is True
    assert results(outcome) == [(ALICE, 250, "2.0.0"), (BOB, 250, "2.0.0")]
    assert handler.tls_in_data is True and handler.contents == [SIMPLE]


def test_required_tls_fails_on_an_unverifiable_certificate(tmp_path, tls_peer):
    """Self-signed, no trust root: deferred, nothing sent in the clear."""
    handler, port, _ = tls_peer

    outcome, _ = run_client(tmp_path, port, tls="required", tls_hostname="mx.test")

    assert results(outcome) == [(ALICE, 0, "4.7.5"), (BOB, 0, "4.7.5")]
    assert outcome.outcomes[0].temporary
    text = outcome.outcomes[0].text
    assert text.startswith(f"TLS handshake with 127.0.0.1:{port} failed: ")
    assert "certificate verify failed" in text
    assert handler.mail_from is None


def test_required_tls_with_the_certificate_as_trust_root(tmp_path, tls_peer):
    """Trusted and matching mx.test: delivered over TLS."""
    handler, port, cert = tls_peer

    outcome, _ = run_client(
        tmp_path,
        port,
        tls="required",
        tls_hostname="mx.test",
        trust_root=str(cert),
    )

    assert outcome.tls is True
    assert results(outcome) == [(ALICE, 250, "2.0.0"), (BOB, 250, "2.0.0")]
    assert handler.tls_in_data is True


def test_required_tls_refuses_a_certificate_for_another_name(tmp_path, tls_peer):
    """Trusted, but issued to mx.test, not other.test: deferred."""
    handler, port, cert = tls_peer

    outcome, _ = run_client(
        tmp_path,
        port,
        tls="required",
        tls_hostname="other.test",
        trust_root=str(cert),
    )

    assert results(outcome) == [(ALICE, 0, "4.7.5"), (BOB, 0, "4.7.5")]
    assert outcome.outcomes[0].text == (
        f"TLS handshake with 127.0.0.1:{port} failed: "
        "the certificate is not valid for other.test"
    )
    assert handler.mail_from is None


def test_opportunistic_tls_handshake_failure_defers(tmp_path):
    """STARTTLS accepted, then no TLS: deferred 4.7.5, not delivered in the clear."""

    def script(peer: ScriptedPeer) -> None:
        greet(peer, b"STARTTLS")
        peer.expect(b"STARTTLS")
        peer.send(b"220 2.0.0 go ahead\r\n")
        peer.conn.recv(65536)  # the ClientHello
        peer.send(b"this is not TLS at all\r\n")

    scripted = ScriptedPeer(script)
    outcome, _ = run_client(tmp_path, scripted.port, tls="opportunistic")
    scripted.finish()

    assert results(outcome) == [(ALICE, 0, "4.7.5"), (BOB, 0, "4.7.5")]
    assert outcome.outcomes[0].text.startswith(
        f"TLS handshake with 127.0.0.1:{scripted.port} failed: "
    )
    assert outcome.tls is False


def test_required_tls_not_offered(tmp_path, peer):
    """No STARTTLS in EHLO: 4.7.4 for all, no MAIL."""
    handler = Recorder()
    port = peer(handler)

    outcome, _ = run_client(tmp_path, port, tls="required")

    assert results(outcome) == [(ALICE, 0, "4.7.4"), (BOB, 0, "4.7.4")]
    assert outcome.outcomes[0].text == (
        f"TLS required but not offered by 127.0.0.1:{port}"
    )
    assert handler.mail_from is None


# End to end: scripted peers, for what aiosmtpd does not do.


def _transaction_after_mail(peer: ScriptedPeer, *, pipelined: bool) -> None:
    if pipelined:
        peer.send(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n")
    peer.expect(b"DATA")
    peer.send(b"354 go ahead\r\n")
    peer.notes["message"] = peer.message()
    peer.send(b"250 2.0.0 queued\r\n")
    peer.expect(b"QUIT")
    peer.send(b"221 2.0.0 bye\r\n")


def test_pipelining_sends_the_envelope_at_once(tmp_path):
    """With PIPELINING, MAIL and every RCPT arrive before any reply is sent."""

    def script(peer: ScriptedPeer) -> None:
        greet(peer, b"PIPELINING", b"SIZE 0")
        peer.notes["mail"] = peer.expect(b"MAIL FROM:")
        # No reply yet: a client that waits for one never sends these.
        peer.notes["rcpts"] = [peer.expect(b"RCPT TO:"), peer.expect(b"RCPT TO:")]
        _transaction_after_mail(peer, pipelined=True)

    scripted = ScriptedPeer(script)
    outcome, _ = run_client(tmp_path, scripted.port)
    scripted.finish()

    assert scripted.notes["mail"] == f"MAIL FROM:<{SENDER}> SIZE={len(SIMPLE)}".encode()
    assert scripted.notes["rcpts"] == [
        b"RCPT TO:<alice@peer.test>",
        b"RCPT TO:<bob@peer.test>",
    ]
    assert scripted.notes["message"] == SIMPLE
    assert results(outcome) == [(ALICE, 250, "2.0.0"), (BOB, 250, "2.0.0")]


def test_without_pipelining_one_command_at_a_time(tmp_path):
    """Without PIPELINING, nothing follows MAIL until its reply."""

    def script(peer: ScriptedPeer) -> None:
        greet(peer, b"8BITMIME")
        peer.expect(b"MAIL FROM:<sender@origin.test>")
        peer.notes["early"] = peer.more_waiting(0.3)
        peer.send(b"250 2.1.0 OK\r\n")
        for _ in range(2):
            peer.expect(b"RCPT TO:")
            peer.notes["early"] = peer.notes["early"] or peer.more_waiting(0.1)
            peer.send(b"250 2.1.5 OK\r\n")
        _transaction_after_mail(peer, pipelined=False)

    scripted = ScriptedPeer(script)
    outcome, _ = run_client(tmp_path, scripted.port)
    scripted.finish()

    assert scripted.notes["early"] is False
    assert results(outcome) == [(ALICE, 250, "2.0.0"), (BOB, 250, "2.0.0")]


def test_451_to_the_data_command(tmp_path):
    """DATA itself refused: accepted recipients deferred, the message not sent."""

    def script(peer: ScriptedPeer) -> None:
        greet(peer, b"ENHANCEDSTATUSCODES")
        peer.expect(b"MAIL")
        peer.send(b"250 2.1.0 OK\r\n")
        peer.expect(b"RCPT")
        peer.send(b"250 2.1.5 OK\r\n")
        peer.expect(b"DATA")
        peer.send(b"451 4.3.2 System not accepting messages\r\n")
        peer.notes["next"] = peer.line()
        peer.send(b"221 2.0.0 bye\r\n")

    scripted = ScriptedPeer(script)
    outcome, _ = run_client(tmp_path, scripted.port, recipients=[ALICE])
    scripted.finish()

    assert outcome.outcomes == (
        RecipientOutcome(ALICE, 451, "4.3.2", "System not accepting messages"),
    )
    assert scripted.notes["next"] == b"QUIT"


def test_peer_closing_in_the_middle_of_the_message(tmp_path):
    """Cut while the message streams: deferred 4.4.2, the client does not hang."""

    def script(peer: ScriptedPeer) -> None:
        greet(peer)
        for prefix in (b"MAIL", b"RCPT", b"RCPT"):
            peer.expect(prefix)
            peer.send(b"250 OK\r\n")
        peer.expect(b"DATA")
        peer.send(b"354 go ahead\r\n")
        got = 0
        while got < 256 * 1024:
            chunk = peer.conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed first")
            got += len(chunk)
        # Unread data makes Linux answer with a reset.
        peer.conn.close()

    scripted = ScriptedPeer(script, receive_buffer=32 * 1024)
    body = b"Subject: long\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8192
    outcome, _ = run_client(tmp_path, scripted.port, body)
    scripted.finish()

    assert results(outcome) == [(ALICE, 0, "4.4.2"), (BOB, 0, "4.4.2")]
    assert "lost while sending the message" in outcome.outcomes[0].text


# In memory: the wire, replies and time.


class Session:
    """``deliver`` on a MemoryReactorClock, its transport a StringTransport."""

    def __init__(self, tmp_path: Path, body: bytes = SIMPLE, **overrides) -> None:
        message = tmp_path / "memory.eml"
        message.write_bytes(body)
        arguments = dict(
            host="192.0.2.1",
            port=25,
            helo="client.test",
            sender=SENDER,
            recipients=[ALICE, BOB],
            message=message,
            size=len(body),
            smtputf8=False,
            eight_bit=False,
            tls="none",
            timeout=30,
        )
        arguments.update(overrides)
        self.clock = MemoryReactorClock()
        self.results: list[object] = []
        deliver(self.clock, **arguments).addBoth(self.results.append)
        host, port, factory, _, _ = self.clock.tcpClients[0]
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.protocol.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> list[bytes]:
        """The lines written since the last call."""
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return lines[:-1]

    def stream_body(self) -> None:
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    @property
    def outcome(self) -> SessionOutcome:
        assert len(self.results) == 1, self.results
        assert isinstance(self.results[0], SessionOutcome), self.results[0]
        return self.results[0]


def test_multiline_replies_and_pipelined_envelope(tmp_path):
    """Multi-line greeting and EHLO; MAIL and RCPTs written before any reply."""
    session = Session(tmp_path)
    session.receive(b"220-mx.test ESMTP\r\n220-second line\r\n")
    assert session.sent() == []
    session.receive(b"220 mx.test ready\r\n")
    assert session.sent() == [b"EHLO client.test"]
    session.receive(
        b"250-mx.test\r\n250-PIPELINING\r\n250-size 100000\r\n250 8BITMIME\r\n"
    )
    assert session.sent() == [
        b"MAIL FROM:<sender@origin.test> SIZE=25",
        b"RCPT TO:<alice@peer.test>",
        b"RCPT TO:<bob@peer.test>",
    ]
    session.receive(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 No such user\r\n")
    assert session.sent() == [b"DATA"]
    session.receive(b"354 go\r\n")
    session.stream_body()
    assert session.sent() == [b"Subject: test", b"", b"Hello.", b"."]
    session.receive(b"250-2.0.0 first\r\n250 2.0.0 second\r\n")
    assert session.sent() == [b"QUIT"]
    session.receive(b"221 bye\r\n")

    assert session.outcome.outcomes == (
        RecipientOutcome(ALICE, 250, "2.0.0", "first second"),
        RecipientOutcome(BOB, 550, "5.0.0", "No such user"),
    )


def test_greeting_554_fails_everyone_permanently(tmp_path):
    session = Session(tmp_path)
    session.receive(b"554-5.7.1 mx.test says\r\n554 5.7.1 no service for you\r\n")

    assert session.sent() == [b"QUIT"]
    session.receive(b"221 bye\r\n")
    assert results(session.outcome) == [(ALICE, 554, "5.7.1"), (BOB, 554, "5.7.1")]
    assert session.outcome.outcomes[0].text == "mx.test says no service for you"


def test_greeting_421_fails_everyone_temporarily_without_quit(tmp_path):
    session = Session(tmp_path)
    session.receive(b"421 mx.test busy\r\n")

    assert session.sent() == []
    assert results(session.outcome) == [(ALICE, 421, "4.0.0"), (BOB, 421, "4.0.0")]
    assert session.outcome.outcomes[0].temporary


def test_opportunistic_tls_goes_on_in_the_clear_when_starttls_is_refused(tmp_path):
    session = Session(tmp_path, tls="opportunistic", recipients=[ALICE])
    session.receive(b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n")
    assert session.sent() == [b"EHLO client.test", b"STARTTLS"]
    session.receive(b"454 4.7.0 TLS not available\r\n")

    assert session.sent() == [b"MAIL FROM:<sender@origin.test>"]


def test_required_tls_refused_starttls(tmp_path):
    session = Session(tmp_path, tls="required", recipients=[ALICE])
    session.receive(b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n")
    session.receive(b"454 4.7.0 TLS not available\r\n")

    assert session.sent()[-1] == b"QUIT"
    session.receive(b"221 bye\r\n")
    assert session.outcome.outcomes == (
        RecipientOutcome(
            ALICE,
            0,
            "4.7.4",
            "TLS required but 192.0.2.1:25 refused STARTTLS: "
            "454 4.7.0 TLS not available",
        ),
    )


def test_helo_fallback_has_no_extensions(tmp_path):
    """EHLO refused: HELO, then MAIL without SIZE and one command at a time."""
    session = Session(tmp_path, recipients=[ALICE])
    session.receive(b"220 old.test\r\n")
    assert session.sent() == [b"EHLO client.test"]
    session.receive(b"502 command not implemented\r\n")
    assert session.sent() == [b"HELO client.test"]
    session.receive(b"250 old.test\r\n")
    assert session.sent() == [b"MAIL FROM:<sender@origin.test>"]
    session.receive(b"250 ok\r\n")
    assert session.sent() == [b"RCPT TO:<alice@peer.test>"]


def test_helo_fallback_cannot_carry_an_eight_bit_message(tmp_path):
    session = Session(tmp_path, eight_bit=True)
    session.receive(b"220 old.test\r\n")
    session.receive(b"500 what\r\n")
    session.receive(b"250 old.test\r\n")

    assert session.sent() == [b"EHLO client.test", b"HELO client.test", b"QUIT"]
    # No answer to QUIT: the outcome comes all the same, soon.
    assert session.results == []
    session.clock.advance(5)
    assert results(session.outcome) == [(ALICE, 554, "5.6.3"), (BOB, 554, "5.6.3")]


def test_refused_mail_fails_everyone_with_its_reply(tmp_path):
    """Pipelined: the RCPT replies after a refused MAIL are read and ignored."""
    session = Session(tmp_path, sender=None)
    session.receive(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n")
    assert session.sent()[-3:] == [
        b"MAIL FROM:<>",
        b"RCPT TO:<alice@peer.test>",
        b"RCPT TO:<bob@peer.test>",
    ]
    session.receive(b"553 5.1.8 Bad sender domain\r\n503 5.5.1 no MAIL\r\n")
    assert session.results == []
    session.receive(b"503 5.5.1 no MAIL\r\n")
    assert session.sent() == [b"QUIT"]
    session.receive(b"221 bye\r\n")

    assert results(session.outcome) == [(ALICE, 553, "5.1.8"), (BOB, 553, "5.1.8")]


def test_reply_timeout_fails_only_the_unanswered(tmp_path):
    """A recipient already answered keeps its reply; the others get 4.4.2."""
    session = Session(tmp_path, timeout=60)
    session.receive(b"220 mx\r\n250 mx\r\n")
    session.receive(b"250 OK\r\n550 5.1.1 unknown\r\n")
    assert session.sent()[-1] == b"RCPT TO:<bob@peer.test>"

    session.clock.advance(59)
    assert session.results == []
    session.clock.advance(1)

    assert session.outcome.outcomes == (
        RecipientOutcome(ALICE, 550, "5.1.1", "unknown"),
        RecipientOutcome(
            BOB, 0, "4.4.2", "no reply from 192.0.2.1:25 to RCPT TO within 60 seconds"
        ),
    )
    assert session.transport.disconnecting or session.transport.disconnected


def test_greeting_timeout(tmp_path):
    session = Session(tmp_path, timeout=5)
    session.clock.advance(5)

    assert results(session.outcome) == [(ALICE, 0, "4.4.2"), (BOB, 0, "4.4.2")]
    assert "to the greeting within 5 seconds" in session.outcome.outcomes[0].text


def test_stalled_message_times_out_and_never_ends_the_data(tmp_path):
    """A next hop that stops reading: 4.4.2, and no end of data is written."""
    session = Session(tmp_path, body=b"x" * 78 + b"\r\n", timeout=30)
    session.receive(b"220 mx\r\n250 mx\r\n250 OK\r\n250 OK\r\n250 OK\r\n")
    assert session.sent()[-1] == b"DATA"
    session.receive(b"354 go\r\n")
    assert session.transport.producer is not None

    session.clock.advance(30)

    assert results(session.outcome) == [(ALICE, 0, "4.4.2"), (BOB, 0, "4.4.2")]
    assert (
        session.outcome.outcomes[0].text == "192.0.2.1:25 took no data for 30 seconds"
    )
    assert b"." not in session.sent()


def test_refusal_before_the_end_of_data_then_hang_up(tmp_path):
    """A reply while the message streams is kept, and used if the peer hangs up."""
    session = Session(tmp_path, body=b"x" * 78 + b"\r\n")
    session.receive(b"220 mx\r\n250 mx\r\n250 OK\r\n250 OK\r\n250 OK\r\n354 go\r\n")
    session.receive(b"552 5.3.4 Message too big for me\r\n")
    assert session.results == []

    session.protocol.connectionLost(Failure(ConnectionDone()))

    assert results(session.outcome) == [(ALICE, 552, "5.3.4"), (BOB, 552, "5.3.4")]
    assert session.outcome.outcomes[0].text == "Message too big for me"


def test_421_mid_session_ends_it_for_everyone_unanswered(tmp_path):
    session = Session(tmp_path)
    session.receive(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n")
    session.receive(b"250 OK\r\n250 OK\r\n421 4.3.2 shutting down\r\n")

    assert session.sent()[-1] != b"QUIT"
    assert results(session.outcome) == [(ALICE, 421, "4.3.2"), (BOB, 421, "4.3.2")]


def test_malformed_reply_is_a_temporary_protocol_error(tmp_path):
    session = Session(tmp_path)
    session.receive(b"hello there\r\n")

    assert results(session.outcome) == [(ALICE, 0, "4.5.0"), (BOB, 0, "4.5.0")]
    assert "malformed reply line 'hello there'" in session.outcome.outcomes[0].text


def test_control_character_in_a_recipient_is_never_sent(tmp_path):
    """A CRLF in an address would inject a command: refused locally."""
    evil = "x@y.test>\r\nRSET\r\nRCPT TO:<z@y.test"
    session = Session(tmp_path, recipients=[evil, ALICE])
    session.receive(b"220 mx\r\n250 mx\r\n250 OK\r\n")

    assert session.sent() == [
        b"EHLO client.test",
        b"MAIL FROM:<sender@origin.test>",
        b"RCPT TO:<alice@peer.test>",
    ]
    session.receive(b"250 OK\r\n")
    assert session.sent() == [b"DATA"]


def test_bad_policy_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        Session(tmp_path, tls="sometimes")


@pytest.mark.parametrize(
    "text",
    [
        b".a\r\n..b\r\n.\r\nc\r\n.",
        b"\r\n.\r\n.\r\n",
        b"no dots\r\nat all\r\n",
        b"..\r\n\r\n.x",
    ],
)
def test_stuffing_is_the_same_however_the_message_is_cut(text):
    """Every line that starts with a dot gets one more, across any boundary."""
    whole = _stuff(text, True)
    assert whole.replace(b"\n..", b"\n.").removeprefix(b".") == text
    for cut in range(len(text) + 1):
        first, second = text[:cut], text[cut:]
        at_line_start = first.endswith(b"\n") if first else True
        assert _stuff(first, True) + _stuff(second, at_line_start) == whole
