"""Starting the real `twistd powermail` for end-to-end tests.

The server runs from the checkout (PYTHONPATH), on free loopback ports, with
a configuration and a data directory inside the test's temporary folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The demo password of every test mailbox.
PASSWORD = "test-password"
_HASH = None


def password_hash() -> str:
    global _HASH
    if _HASH is None:
        from powermail.passwords import hash_password

        _HASH = hash_password(PASSWORD)
    return _HASH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(
    directory: Path, *, mx_extra: str = "", imap_extra: str = "", extra: str = ""
) -> Path:
    """A test configuration: example.test with alice, bob and a UTF-8 user.

    The IMAP listeners get free ports too: ``imap_port`` and ``imaps_port``
    read them back.
    """
    port = free_port()
    imap, imaps = free_port(), free_port()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "powermail.toml"
    path.write_text(
        f"""\
# test configuration
[server]
hostname = "mx.example.test"
data_dir = "data"

[mx]
listen = ["127.0.0.1:{port}"]
{mx_extra}

[imap]
listen = ["127.0.0.1:{imap}"]
tls_listen = ["127.0.0.1:{imaps}"]
{imap_extra}

[domains."example.test"]

[mailboxes."alice@example.test"]
password = "{password_hash()}"

[mailboxes."bob@example.test"]

[mailboxes."jösé@example.test"]

[aliases]
"postmaster@example.test" = ["alice@example.test"]
"abuse@example.test" = ["alice@example.test"]
"team@example.test" = ["alice@example.test", "bob@example.test"]
{extra}
""",
        encoding="utf-8",
    )
    return path


def mx_port(config: Path) -> int:
    import tomllib

    listen = tomllib.loads(config.read_text("utf-8"))["mx"]["listen"][0]
    return int(listen.rsplit(":", 1)[1])


def imap_port(config: Path, *, tls: bool = False) -> int:
    import tomllib

    section = tomllib.loads(config.read_text("utf-8"))["imap"]
    listen = section["tls_listen" if tls else "listen"][0]
    return int(listen.rsplit(":", 1)[1])


def twistd_command(config: Path) -> list[str]:
    # The twistd script installed beside this interpreter, as a user runs it.
    return [
        str(Path(sys.executable).parent / "twistd"),
        "-n",
        "--pidfile=",
        "powermail",
        "--config",
        str(config),
    ]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class PowerMail:
    """One server process; ``log_text()`` reads what it logged so far."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.port = mx_port(config)
        self.imap_port = imap_port(config)
        self.imaps_port = imap_port(config, tls=True)
        self.data_dir = config.parent / "data"
        self.log_path = config.parent / "twistd.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            twistd_command(self.config),
            cwd=self.config.parent,
            env=environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited early:\n{self.log_text()}")
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=5
                ) as probe:
                    # A whole session, so the server has counted it out again
                    # before the test opens its own connections.
                    probe.recv(1024)
                    probe.sendall(b"QUIT\r\n")
                    while probe.recv(1024):
                        pass
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"twistd did not listen in time:\n{self.log_text()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to clean up."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def maildir(self, local: str, domain: str = "example.test") -> Path:
        return self.data_dir / "mail" / domain / local / "Maildir"

    def messages(self, local: str) -> list[bytes]:
        """Every message in ``local``'s new/, oldest first."""
        new = self.maildir(local) / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged in time:\n{self.log_text()}")
