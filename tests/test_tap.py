"""`twistd powermail` as a user starts it: plugin found, bad configs refused."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from powermail_process import REPO, PowerMail, environment, free_port, twistd_command

TWISTD = str(Path(sys.executable).parent / "twistd")


def test_installed_twistd_lists_the_plugin(tmp_path):
    """The README's install puts the plugin where twistd finds it (no PYTHONPATH)."""
    out = subprocess.run(
        [TWISTD, "--help"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "powermail" in out
    help_text = subprocess.run(
        [TWISTD, "-n", "powermail", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert "--config=" in help_text and "conf/powermail.toml" in help_text


def test_embedded_default_starts_and_accepts_mail(tmp_path):
    """conf/powermail.toml as shipped (on a free port): self-signed TLS, delivery."""
    (tmp_path / "conf").mkdir()
    text = (REPO / "conf/powermail.toml").read_text()
    port = free_port()
    (tmp_path / "conf/powermail.toml").write_text(
        text.replace("127.0.0.1:2525", f"127.0.0.1:{port}")
    )
    server = PowerMail(tmp_path / "conf/powermail.toml")
    server.data_dir = tmp_path / "var"
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.starttls()
            client.sendmail(
                "z@remote.test",
                ["abuse@example.test", "bob@example.test"],
                b"Subject: hi\r\n\r\nhi\r\n",
            )
        assert len(server.messages("alice")) == 1 and len(server.messages("bob")) == 1
        assert (tmp_path / "var/tls/selfsigned.key").stat().st_mode & 0o077 == 0
    finally:
        server.stop()


def _start_with(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "powermail.toml"
    path.write_text(text)
    return subprocess.run(
        twistd_command(path),
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


GOOD = """
[server]
data_dir = "data"
[mx]
listen = ["127.0.0.1:{port}"]
[domains."example.test"]
[mailboxes."alice@example.test"]
[aliases]
"postmaster@example.test" = ["alice@example.test"]
"abuse@example.test" = ["alice@example.test"]
"""


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (
            ("[mx]", "[mx]\nmax_recipients = 'many'"),
            "mx.max_recipients",
            "must be an integer, not a string",
        ),
        (("[mx]", "[mx]\ncolour = 1"), "mx.colour", "unknown key"),
        (
            ('"abuse@example.test" = ["alice@example.test"]', ""),
            'domains."example.test"',
            "abuse@example.test must be a mailbox",
        ),
        (
            ("[mx]", "[tls]\ncertificate = 'nope.pem'\nprivate_key = 'nope.key'\n[mx]"),
            "tls.certificate",
            "{dir}/nope.pem: no such file",
        ),
        (
            (
                '[mailboxes."alice@example.test"]',
                '[mailboxes."alice@example.test"]\n[mailboxes."ALICE@example.test"]',
            ),
            'mailboxes."ALICE@example.test"',
            "duplicate mailbox",
        ),
        (
            (
                'listen = ["127.0.0.1:{port}"]',
                'listen = ["127.0.0.1:{port}", "0.0.0.0:{port}"]',
            ),
            "mx.listen[1]",
            "port {port} is already used by mx.listen[0]",
        ),
        (
            (
                '[mailboxes."alice@example.test"]',
                '[mailboxes."alice@example.test"]\nmode = "forward"',
            ),
            'mailboxes."alice@example.test".mode',
            "'forward' is not one of: local, redirect",
        ),
        (
            ('[mailboxes."alice@example.test"]', '[mailboxes."al ice@example.test"]'),
            'mailboxes."al ice@example.test"',
            "invalid address",
        ),
    ],
)
def test_bad_configuration_stops_the_start_with_one_message(
    tmp_path, change, key, reason
):
    port = free_port()
    old, new = change
    text = GOOD.format(port=port).replace(
        old.format(port=port), new.format(port=port), 1
    )
    result = _start_with(tmp_path, text)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    expected = f"powermail: {tmp_path / 'powermail.toml'}: {key}: "
    expected += reason.format(port=port, dir=tmp_path)
    assert lines[0].startswith(expected), lines[0]


def test_installed_powermail_command_checks_the_default(tmp_path):
    """The console script the README uses is installed beside twistd."""
    command = Path(sys.executable).parent / "powermail"
    result = subprocess.run(
        [str(command), "-c", str(REPO / "conf/powermail.toml"), "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK (1 domain, 2 mailboxes, 2 aliases)")


def test_an_address_in_use_stops_the_start_with_one_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = GOOD.format(port=port) + (
            f'[imap]\nlisten = ["127.0.0.1:{free_port()}"]\n'
            f'tls_listen = ["127.0.0.1:{free_port()}"]\n'
        )
        result = _start_with(tmp_path, text)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"powermail: {tmp_path / 'powermail.toml'}: mx.listen[0]:"
        f" 127.0.0.1:{port}: Address already in use"
    ]


def test_a_second_server_on_the_same_data_dir_is_refused(powermail):
    """It would share the queue and take over the control socket."""
    result = subprocess.run(
        twistd_command(powermail.config),
        cwd=powermail.config.parent,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"powermail: {powermail.config}: server.data_dir: another PowerMail is"
        f" running with {powermail.data_dir}"
    ]
    assert (powermail.data_dir / "control.sock").exists()
