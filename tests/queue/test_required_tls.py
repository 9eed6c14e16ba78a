"""next_hop_tls = "required": STARTTLS and a certificate that tls.ca_file trusts."""

from __future__ import annotations

import smtplib
import ssl

import pytest
from dns_server import start_dns_server
from powermail_process import PowerMail, write_config
from second_mx import SecondMx

from powermail.tls import ensure_self_signed


@pytest.fixture
def secure_peer(tmp_path):
    cert, key = ensure_self_signed(tmp_path / "peer-tls", "secure.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    peer = SecondMx(tls_context=context).start()
    dns, dns_port = start_dns_server({"secure.test": {"A": ["127.0.0.1"]}})
    yield peer, cert, dns_port
    peer.stop()
    dns.terminate()
    dns.wait(10)


def start(tmp_path, peer, dns_port, ca_file) -> PowerMail:
    config = write_config(
        tmp_path / "pm",
        extra=f"""
[mailboxes."carol@example.test"]
mode = "redirect"
next_hop = "[secure.test]:{peer.port}"
next_hop_tls = "required"

[tls]
ca_file = "{ca_file}"

[dns]
servers = ["127.0.0.1:{dns_port}"]

[queue]
retry_delays = [3600]
""",
    )
    server = PowerMail(config)
    server.start()
    return server


def send(server: PowerMail) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail(
            "zoe@remote.test", ["carol@example.test"], b"Subject: tls\r\n\r\nx\r\n"
        )


def test_verified_certificate_delivers(tmp_path, secure_peer):
    peer, cert, dns_port = secure_peer
    server = start(tmp_path, peer, dns_port, cert)
    try:
        send(server)
        (got,) = peer.wait_for(1)
        assert got.rcpt_tos == ["carol@example.test"]
        assert "(TLS yes)" in server.wait_for_log("delivered ")
    finally:
        server.stop()


def test_untrusted_certificate_defers_and_sends_nothing(tmp_path, secure_peer):
    peer, _cert, dns_port = secure_peer
    other, _ = ensure_self_signed(tmp_path / "other-ca", "secure.test")
    server = start(tmp_path, peer, dns_port, other)
    try:
        send(server)
        log = server.wait_for_log("deferred ")
        assert "4.7.5" in log and "TLS handshake" in log
        assert peer.received == []
    finally:
        server.stop()
