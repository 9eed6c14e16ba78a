"""MX redirection through the real `twistd powermail`, to a real second MX.

The second MX is aiosmtpd on loopback; bounces go to the sender's domain,
found through a DNS server built from twisted.names on loopback.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time

import pytest
from dns_server import start_dns_server
from powermail_process import PowerMail, free_port, write_config
from second_mx import Behaviour, SecondMx

MESSAGE = (
    b"From: Zoe <zoe@remote.test>\r\n"
    b"To: carol@example.test\r\n"
    b"Subject: forwarded\r\n"
    b"\r\n"
    b"line one\r\n"
    b".a line with a dot\r\n"
    b"end\r\n"
)


@pytest.fixture
def dns():
    process, port = start_dns_server(
        {
            "remote.test": {"MX": [[10, "mx.remote.test"]]},
            "mx.remote.test": {"A": ["127.0.0.1"]},
        }
    )
    yield port
    process.terminate()
    process.wait(10)


@pytest.fixture
def forwarding(tmp_path, dns):
    """PowerMail with carol (redirect), a redirect catch-all domain, and a peer."""
    started = []

    def start(
        behaviour: Behaviour | None = None,
        *,
        peer: bool = True,
        retry_delay: int = 1,
        verify: bool = False,
    ):
        second = SecondMx(behaviour=behaviour)
        if peer:
            second.start()
        config = write_config(
            tmp_path,
            extra=f"""
[mailboxes."carol@example.test"]
mode = "redirect"
next_hop = "[127.0.0.1]:{second.port}"

[domains."corp.test"]
catch_all = "admin@corp.test"

[mailboxes."admin@corp.test"]
mode = "redirect"
next_hop = "[127.0.0.1]:{second.port}"
verify_recipients = {"true" if verify else "false"}

[dns]
servers = ["127.0.0.1:{dns}"]

[queue]
retry_delays = [{retry_delay}]
smtp_port = {second.port}
""",
        )
        server = PowerMail(config)
        server.start()
        started.append((server, second, peer))
        return server, second

    yield start
    for server, second, peer in started:
        server.stop()
        if peer:
            try:
                second.stop()
            except Exception:  # noqa: BLE001 (already stopped by the test)
                pass


def send(server: PowerMail, recipients: list[str], message: bytes = MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        assert client.sendmail("zoe@remote.test", recipients, message) == {}


def forwarded_body(data: bytes) -> bytes:
    """The message as forwarded, without the Received line PowerMail added."""
    assert data.startswith(b"Received: from "), data[:200]
    end = data.index(b"\r\n", data.index(b"\r\n\tby ") + 2)
    rest = data[end + 2 :]
    if rest.startswith(b"\tfor "):
        rest = rest[rest.index(b"\r\n") + 2 :]
    return rest


def test_mixed_domain_stores_alice_and_forwards_carol(forwarding):
    server, second = forwarding()
    send(server, ["alice@example.test", "Carol@example.test"])
    (got,) = second.wait_for(1)
    assert got.mail_from == "zoe@remote.test"
    assert got.rcpt_tos == ["Carol@example.test"]
    assert b"Return-Path" not in got.data
    assert forwarded_body(got.data) == MESSAGE
    (local,) = server.messages("alice")
    assert local.startswith(b"Return-Path: <zoe@remote.test>\r\nReceived: ")
    assert local.endswith(MESSAGE)
    log = server.wait_for_log("delivered ")
    msg_id = log.split("accepted ")[1].split()[0]
    assert f"delivered {msg_id} to <Carol@example.test>" in log


def test_catch_all_forwards_with_the_original_recipients_in_one_transaction(forwarding):
    server, second = forwarding()
    send(server, ["sales@corp.test", "bob@corp.test", "postmaster@corp.test"])
    (got,) = second.wait_for(1)
    assert sorted(got.rcpt_tos) == [
        "bob@corp.test",
        "postmaster@corp.test",
        "sales@corp.test",
    ]
    assert forwarded_body(got.data) == MESSAGE


def test_refused_recipient_bounces_to_the_sender(forwarding):
    server, second = forwarding(Behaviour(refuse={"bad@corp.test"}))
    send(server, ["good@corp.test", "bad@corp.test"])
    delivered, bounce = second.wait_for(2)
    assert delivered.rcpt_tos == ["good@corp.test"]
    assert bounce.mail_from == "<>"  # aiosmtpd writes the null sender so
    assert bounce.rcpt_tos == ["zoe@remote.test"]
    report = email.message_from_bytes(bounce.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(
        p for p in report.walk() if p.get_content_type() == "message/delivery-status"
    )
    text = status.as_string()
    assert "Final-Recipient: rfc822; bad@corp.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "550 5.1.1 no such user here" in text
    headers = next(
        p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"
    )
    assert "Subject: forwarded" in headers.get_content()


def test_temporary_failure_is_retried_until_accepted(forwarding):
    server, second = forwarding(Behaviour(defer={"carol@example.test": 2}))
    send(server, ["carol@example.test"])
    (got,) = second.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["carol@example.test"]
    log = server.log_text()
    assert log.count("deferred ") == 2


def test_kill_during_outage_loses_nothing(forwarding, tmp_path):
    """Accepted while the next hop is down, then a kill -9: delivered after restart."""
    server, second = forwarding(peer=False)
    send(server, ["carol@example.test", "x@corp.test"])
    server.wait_for_log("deferred ")
    server.kill()
    second.start()
    server.start()
    got = second.wait_for(1, timeout=20)
    assert sorted(r for m in got for r in m.rcpt_tos) == [
        "carol@example.test",
        "x@corp.test",
    ]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and list(
        (server.data_dir / "queue/messages").iterdir()
    ):
        time.sleep(0.1)
    assert list((server.data_dir / "queue/messages").iterdir()) == []


def test_unknown_port_for_next_hop_is_a_config_error(tmp_path):
    config = write_config(
        tmp_path,
        extra=f"""
[mailboxes."carol@example.test"]
mode = "redirect"
next_hop = "[127.0.0.1]:{free_port()}:9"
""",
    )
    server = PowerMail(config)
    with pytest.raises(RuntimeError, match=r'mailboxes."carol@example.test".next_hop'):
        server.start()


def powermail_cli(server: PowerMail, *args: str) -> str:
    import subprocess
    import sys

    from powermail_process import environment

    result = subprocess.run(
        [sys.executable, "-m", "powermail.cli", "-c", str(server.config), *args],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_queue_commands_against_the_running_server(forwarding):
    """list, show, hold, release, delete, and retry within two seconds."""
    server, second = forwarding(peer=False, retry_delay=3600)
    send(server, ["carol@example.test"])
    send(server, ["x@corp.test"])
    server.wait_for_log("deferred ")
    listing = powermail_cli(server, "queue", "list")
    assert listing.count("\n") == 2 and "carol@example.test" in listing
    first_id = next(
        line.split()[0] for line in listing.splitlines() if "carol@" in line
    )
    other_id = next(
        line.split()[0] for line in listing.splitlines() if "x@corp" in line
    )
    shown = powermail_cli(server, "queue", "show", first_id)
    assert "carol@example.test" in shown and "4.4.1 connection to" in shown
    assert (
        powermail_cli(server, "queue", "hold", first_id).strip() == f"held {first_id}"
    )
    assert (
        powermail_cli(server, "queue", "delete", other_id).strip()
        == f"deleted {other_id}"
    )

    second.start()
    # Held: a retry of everything leaves it alone.
    powermail_cli(server, "queue", "retry")
    time.sleep(1)
    assert second.received == []
    powermail_cli(server, "queue", "release", first_id)
    time.sleep(0.5)
    assert second.received == []  # released, next attempt still an hour away
    started = time.monotonic()
    powermail_cli(server, "queue", "retry", first_id)
    (got,) = second.wait_for(1, timeout=2)
    assert time.monotonic() - started < 2
    assert got.rcpt_tos == ["carol@example.test"]
    deadline = time.monotonic() + 5
    while "queue is empty" not in powermail_cli(server, "queue", "list"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_switching_a_mailbox_to_local_applies_to_the_next_message(forwarding):
    server, second = forwarding()
    send(server, ["carol@example.test"])
    second.wait_for(1)
    powermail_cli(server, "mailbox", "set", "carol@example.test", "--mode", "local")
    server.wait_for_log("reloaded")
    send(server, ["carol@example.test"])
    (stored,) = server.messages("carol")
    assert stored.endswith(MESSAGE)
    assert len(second.received) == 1


def test_catch_all_verifies_recipients_with_the_next_hop(forwarding):
    """Refused downstream: 550 at RCPT; unknown or unreachable: 450, never 550."""
    from smtp_wire import Wire

    server, second = forwarding(
        Behaviour(refuse={"bad@corp.test"}, defer={"later@corp.test": 5}), verify=True
    )
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    assert wire.command(b"RCPT TO:<bad@corp.test>") == (
        b"550 5.1.1 No such user here: bad@corp.test\r\n"
    )
    assert wire.command(b"RCPT TO:<later@corp.test>") == (
        b"450 4.1.1 Cannot verify later@corp.test now, try again later\r\n"
    )
    assert wire.command(b"RCPT TO:<good@corp.test>") == b"250 2.1.5 Recipient OK\r\n"
    # A recipient the catch-all does not take is not asked about.
    assert wire.command(b"RCPT TO:<bob@example.test>") == b"250 2.1.5 Recipient OK\r\n"
    wire.command(b"DATA")
    assert wire.command(MESSAGE + b".").startswith(b"250 2.0.0")
    delivered = second.wait_for(1)
    assert delivered[0].rcpt_tos == ["good@corp.test"]
    # The refusal is cached: asked once, refused again without asking.
    wire.command(b"RSET")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    asked = second.handler.rcpt_asked.count("bad@corp.test")
    assert wire.command(b"RCPT TO:<bad@corp.test>").startswith(b"550 5.1.1")
    assert second.handler.rcpt_asked.count("bad@corp.test") == asked == 1


def test_verification_with_the_next_hop_down_is_temporary(forwarding):
    from smtp_wire import Wire

    server, second = forwarding(peer=False, verify=True)
    wire = Wire(server.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    assert wire.command(b"RCPT TO:<anyone@corp.test>") == (
        b"450 4.1.1 Cannot verify anyone@corp.test now, try again later\r\n"
    )


def test_long_line_is_reencoded_on_the_way_out_only(forwarding):
    server, second = forwarding()
    body = b"x" * 5000
    message = (
        b"From: zoe@remote.test\r\nSubject: long\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body + b"\r\n"
    )
    send(server, ["alice@example.test", "carol@example.test"], message)
    (got,) = second.wait_for(1)
    assert max(map(len, got.data.split(b"\r\n"))) <= 998
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert parsed.get_content() == body.decode() + "\r\n"
    (local,) = server.messages("alice")
    assert local.endswith(message)
