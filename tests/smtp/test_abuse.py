"""Clients that try to exhaust the MX: floods, stalls and clients that never read."""

from __future__ import annotations

import socket
import time

from powermail_process import PowerMail
from smtp_wire import Wire


def rss_kib(server: PowerMail) -> int:
    assert server.process is not None
    status = open(f"/proc/{server.process.pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0])


def test_a_client_that_never_reads_cannot_grow_memory(shared_powermail: PowerMail):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", shared_powermail.port))
    sock.settimeout(0.2)
    before = rss_kib(shared_powermail)
    sent = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and sent < 50_000_000:
        try:
            sent += sock.send(b"NOOP\r\n" * 2000)
        except TimeoutError:
            pass  # the server stopped reading, as it should
    grown = rss_kib(shared_powermail) - before
    sock.close()
    # Replies to the NOOPs sent would take several times what was sent; the
    # server may hold only its socket buffers' worth.
    assert grown < 20_000, (sent, grown)
    assert sent < 20_000_000


def test_a_burst_behind_a_message_does_not_freeze_other_clients(
    shared_powermail: PowerMail,
):
    wire = Wire(shared_powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    wire.command(b"RCPT TO:<bob@example.test>")
    wire.command(b"DATA")
    wire.sock.settimeout(0.5)
    burst = b"Subject: burst\r\n\r\n" + b"x" * 70 * 1000 + b"\r\n.\r\n"
    burst += b"NOOP\r\n" * 300_000
    try:
        wire.sock.sendall(burst)
    except TimeoutError:
        pass  # the server reads at its own pace
    started = time.monotonic()
    other = Wire(shared_powermail.port, timeout=5)
    assert other.reply() == b"220 mx.example.test ESMTP PowerMail\r\n"
    assert other.command(b"NOOP") == b"250 2.0.0 OK\r\n"
    assert time.monotonic() - started < 2
    wire.close()


def test_stalled_tls_handshake_releases_its_slot(limited):
    server = limited("idle_timeout = 1\nmax_connections_per_client = 2")
    stalled = []
    for _ in range(2):
        wire = Wire(server.port)
        wire.reply()
        assert wire.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
        stalled.append(wire)  # and never start the handshake
    refused = Wire(server.port)
    assert refused.reply().startswith(b"421 4.7.0")
    # Idle timeout (1 s), then at most the close grace period (10 s).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = Wire(server.port)
        if probe.reply().startswith(b"220"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("stalled sessions kept their slots")
    for wire in stalled:
        assert wire.closed()
