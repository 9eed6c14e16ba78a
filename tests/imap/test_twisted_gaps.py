"""What Twisted's own IMAP server does where PowerMail's must differ.

These tests pin the Twisted behaviour that made PowerMail write its own
protocol (docs/architecture.md, "Why not IMAP4Server"), next to the test of
PowerMail's answer.  If a Twisted release fixes one, its test here fails
and the reason in the architecture page should be revisited.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.mail import imap4
from zope.interface import implementer


@implementer(ITLSTransport)
class _TlsTransport(StringTransport):
    def startTLS(self, contextFactory):  # noqa: N802, N803 (Twisted's names)
        self.tls_started = True


def test_twisted_imap4server_answers_a_command_pipelined_behind_starttls():
    """Twisted answers CAPABILITY sent in the clear after STARTTLS as if it
    came through TLS (the injection class of CVE-2011-0411); PowerMail
    discards it: see test_imap_protocol.test_starttls_discards_what_was_
    pipelined_behind_it and the end-to-end test over a real TLS socket."""
    server = imap4.IMAP4Server(contextFactory=object())
    transport = _TlsTransport()
    server.makeConnection(transport)
    transport.clear()
    server.dataReceived(b"a STARTTLS\r\nb CAPABILITY\r\n")
    reply = transport.value()
    assert transport.tls_started
    assert reply.startswith(b"a OK Begin TLS negotiation now\r\n")
    assert b"b OK CAPABILITY completed" in reply


def test_twisted_imap4server_refuses_login_before_tls_even_from_loopback():
    """Twisted advertises LOGINDISABLED to every client it could offer
    STARTTLS to, loopback included; PowerMail allows loopback by
    configuration (test_imap_protocol.test_greeting_lists_capabilities...)."""
    server = imap4.IMAP4Server(contextFactory=object())
    transport = _TlsTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    server.makeConnection(transport)
    assert b"LOGINDISABLED" in transport.value()
