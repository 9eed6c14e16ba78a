"""A private Dovecot serving one Maildir, for compatibility tests.

Dovecot runs from a configuration of its own (no system configuration), on
a free loopback port, for one user with a known password.  Dovecot never
lets a mail process run as root, so while it runs the Maildir belongs to
``nobody`` and the mail process is chrooted into it (the test's temporary
folders above it are private to root); :meth:`DovecotProcess.stop` gives the
tree back to its owner.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DOVECOT = Path("/usr/sbin/dovecot")
# The unprivileged account the mail process runs as.
MAIL_USER = "nobody"


def dovecot_available() -> bool:
    """Whether this machine can run a private Dovecot (installed, we are root)."""
    return DOVECOT.exists() and os.geteuid() == 0 and _ids(MAIL_USER) is not None


def _ids(user: str) -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


class DovecotProcess:
    """A running Dovecot; ``port`` speaks IMAP without TLS."""

    def __init__(
        self,
        process: subprocess.Popen,
        port: int,
        maildir: Path,
        owner: tuple[int, int],
        run_dir: Path,
        log_path: Path,
    ) -> None:
        self.process = process
        self.port = port
        self.maildir = maildir
        self.log_path = log_path
        self._owner = owner
        self._run_dir = run_dir

    def log(self) -> str:
        """What Dovecot logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop Dovecot, wait for it, and give the Maildir back to its owner."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.maildir.exists():
            _chown_tree(self.maildir, *self._owner)
        shutil.rmtree(self._run_dir, ignore_errors=True)


def start_dovecot(
    workdir: Path,
    maildir: Path,
    *,
    user: str = "alice@example.test",
    password: str = "test-password",
) -> DovecotProcess:
    """Start Dovecot serving ``maildir`` to ``user``; waits until it listens."""
    ids = _ids(MAIL_USER)
    assert ids is not None, f"no user {MAIL_USER}"
    workdir.mkdir(parents=True, exist_ok=True)
    maildir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = maildir.stat()
    owner = (st.st_uid, st.st_gid)
    _chown_tree(maildir, *ids)

    # Unix sockets live in base_dir, whose path must stay short; the auth
    # process (user "dovecot") reads the password file there too.
    run_dir = Path(tempfile.mkdtemp(prefix="dovecot-"))
    os.chmod(run_dir, 0o755)
    passwd = run_dir / "users"
    # The home "<maildir>/./" chroots the mail process into the Maildir.
    passwd.write_text(f"{user}:{{PLAIN}}{password}:{ids[0]}:{ids[1]}::{maildir}/./::\n")
    os.chmod(passwd, 0o644)

    port = _free_port()
    log_path = workdir / "dovecot.log"
    state_dir = workdir / "state"
    state_dir.mkdir(exist_ok=True)
    config = workdir / "dovecot.conf"
    config.write_text(
        f"""\
base_dir = {run_dir}/base
state_dir = {state_dir}
log_path = {log_path}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
valid_chroot_dirs = {maildir}
mail_location = maildir:~
mail_fsync = optimized
namespace inbox {{
  inbox = yes
  separator = .
}}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
    )
    process = subprocess.Popen(
        [str(DOVECOT), "-F", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    dovecot = DovecotProcess(process, port, maildir, owner, run_dir, log_path)
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace")
            dovecot.stop()
            raise RuntimeError(f"dovecot exited: {error}{dovecot.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return dovecot
        except OSError:
            if time.monotonic() > deadline:
                dovecot.stop()
                raise RuntimeError(f"dovecot did not listen: {dovecot.log()}") from None
            time.sleep(0.02)
