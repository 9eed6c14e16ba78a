"""Edits of the configuration reach a running server without a restart.

The `powermail` command changes the file; the server picks it up within five
seconds, on connections that stay open the whole time.
"""

from __future__ import annotations

import subprocess
import sys
import time

from powermail_process import PowerMail, environment
from smtp_wire import Wire


def cli(server: PowerMail, *args: str, password: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "powermail.cli", "-c", str(server.config), *args],
        input=password + "\n" if password is not None else None,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rcpt_reply(wire: Wire, address: bytes) -> bytes:
    wire.command(b"RSET")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    return wire.command(b"RCPT TO:<" + address + b">")


def wait_for_reply(
    wire: Wire, address: bytes, expected: bytes, limit: float = 5.0
) -> float:
    """Seconds until RCPT for ``address`` gets ``expected``; fails after ``limit``."""
    start = time.monotonic()
    while True:
        reply = rcpt_reply(wire, address)
        elapsed = time.monotonic() - start
        if reply.startswith(expected):
            return elapsed
        assert elapsed < limit, reply
        time.sleep(0.2)


def test_cli_edits_apply_live_on_open_connections(powermail: PowerMail):
    wire = Wire(powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    assert rcpt_reply(wire, b"carol@example.test").startswith(b"550 5.1.1")

    cli(powermail, "mailbox", "add", "carol@example.test", password="carol-pass")
    wait_for_reply(wire, b"carol@example.test", b"250 2.1.5")

    cli(powermail, "alias", "add", "sales@example.test", "carol@example.test")
    wait_for_reply(wire, b"sales@example.test", b"250 2.1.5")

    cli(powermail, "domain", "add", "example.org", "--postmaster", "alice@example.test")
    wait_for_reply(wire, b"postmaster@example.org", b"250 2.1.5")

    cli(powermail, "alias", "remove", "sales@example.test", "carol@example.test")
    cli(powermail, "mailbox", "remove", "carol@example.test")
    wait_for_reply(wire, b"carol@example.test", b"550 5.1.1")
    assert rcpt_reply(wire, b"sales@example.test").startswith(b"550 5.1.1")

    # The same connection carries a message to the end.
    wire.command(b"RSET")
    wire.command(b"MAIL FROM:<zoe@remote.test>")
    wire.command(b"RCPT TO:<postmaster@example.org>")
    wire.command(b"DATA")
    assert wire.command(b"Subject: still here\r\n\r\n.").startswith(b"250 2.0.0")
    assert len(powermail.messages("alice")) == 1


def test_invalid_hand_edit_is_logged_and_the_old_config_stays(powermail: PowerMail):
    wire = Wire(powermail.port)
    wire.reply()
    wire.command(b"EHLO client.test")
    text = powermail.config.read_text()
    powermail.config.write_text(text + '\n[mailboxes."dave@example.test"]\nmode = 3\n')
    log = powermail.wait_for_log("configuration not reloaded")
    assert (
        f'{powermail.config}: mailboxes."dave@example.test".mode: must be a string, not an integer'
        in log
    )
    assert rcpt_reply(wire, b"dave@example.test").startswith(b"550 5.1.1")
    assert rcpt_reply(wire, b"alice@example.test").startswith(b"250 2.1.5")

    # Fixed by hand: applied.
    powermail.config.write_text(text + '\n[mailboxes."dave@example.test"]\n')
    wait_for_reply(wire, b"dave@example.test", b"250 2.1.5")


def test_listener_change_is_named_and_waits_for_a_restart(powermail: PowerMail):
    text = powermail.config.read_text()
    powermail.config.write_text(text.replace("127.0.0.1:", "127.0.0.2:", 1))
    log = powermail.wait_for_log("mx.listen changed")
    assert "the running server keeps the old value until it is restarted" in log
    wire = Wire(powermail.port)
    assert wire.reply() == b"220 mx.example.test ESMTP PowerMail\r\n"
