"""Durable delivery into Maildirs.

A delivery is a small transaction, as in maildir's own protocol: the message
is streamed into ``tmp/`` of the first recipient's Maildir, then, in a worker
thread, fsynced, linked into ``new/`` of every recipient and each ``new/``
fsynced.  Only then does the commit's Deferred fire, so a caller that waits
for it before acknowledging never acknowledges a message a crash could lose.
The file holds the message exactly as given, CRLF line ends included.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

__all__ = ["MaildirStore", "MaildirDelivery", "fsync_directory", "maildir_name"]

_log = Logger()
_sequence = itertools.count(1)
RunBlocking = Callable[..., Deferred]


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_part() -> str:
    # Maildir file names may not hold '/' or ':'; the spec escapes them.
    host = socket.gethostname() or "localhost"
    return host.replace("/", r"\057").replace(":", r"\072")


_HOST = _host_part()


def maildir_name() -> str:
    """A unique base name, in the form Dovecot and Courier write."""
    now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micro}P{os.getpid()}Q{next(_sequence)}.{_HOST}"


class MaildirStore:
    """The Maildirs of local mailboxes, one per mailbox under ``root``.

    ``run_blocking`` runs a function off the reactor thread and returns a
    Deferred; tests may pass one that runs it at once.
    """

    def __init__(self, root: Path, *, run_blocking: RunBlocking = deferToThread):
        self.root = root
        self.run_blocking = run_blocking

    def maildir_for(self, domain: str, local_key: str) -> Path:
        """Where the Maildir of ``local_key@domain`` lives."""
        return self.root / domain / local_key / "Maildir"

    def begin(self, maildirs: Iterable[Path]) -> MaildirDelivery:
        """Start a delivery of one message to each Maildir in ``maildirs``."""
        return MaildirDelivery(list(dict.fromkeys(maildirs)), self.run_blocking)


def _ensure_maildir(maildir: Path) -> list[Path]:
    """Create ``maildir`` with its three folders; list the folders to fsync."""
    created: list[Path] = []
    if (maildir / "new").is_dir() and (maildir / "tmp").is_dir():
        return created
    missing = []
    parent = maildir
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for sub in ("cur", "new", "tmp"):
        os.makedirs(maildir / sub, exist_ok=True)
    # Each folder we made must be recorded in its parent, up to the one
    # that already existed: fsync those parents.
    created.append(maildir)
    created.extend(p.parent for p in missing)
    return created


class MaildirDelivery:
    """One message on its way into one or more Maildirs."""

    def __init__(self, maildirs: list[Path], run_blocking: RunBlocking) -> None:
        if not maildirs:
            raise ValueError("a delivery needs at least one Maildir")
        self.maildirs = maildirs
        self.run_blocking = run_blocking
        self.size = 0
        self._to_sync: list[Path] = []
        for maildir in maildirs:
            self._to_sync.extend(_ensure_maildir(maildir))
        self.base_name = maildir_name()
        self.tmp_path = maildirs[0] / "tmp" / self.base_name
        self._file: BinaryIO | None = open(self.tmp_path, "xb")  # noqa: SIM115
        self.paths: list[Path] = []

    def write(self, data: bytes) -> None:
        """Append ``data`` to the message; buffered, no disk wait."""
        assert self._file is not None, "write after commit or abort"
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> Deferred[list[Path]]:
        """Make the message durable in every Maildir; fires with the paths."""
        file, self._file = self._file, None
        assert file is not None, "commit twice"
        return self.run_blocking(self._commit_blocking, file)

    def _commit_blocking(self, file: BinaryIO) -> list[Path]:
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        name = f"{self.base_name},S={self.size},W={self.size}"
        paths: list[Path] = []
        try:
            for maildir in self.maildirs:
                target = maildir / "new" / name
                _link_or_copy(self.tmp_path, target)
                paths.append(target)
            for folder in dict.fromkeys(
                [*self._to_sync, *(m / "new" for m in self.maildirs)]
            ):
                fsync_directory(folder)
        except BaseException:
            for path in paths:
                _unlink_quietly(path)
            raise
        finally:
            _unlink_quietly(self.tmp_path)
        self.paths = paths
        return paths

    def abort(self) -> None:
        """Forget the message; nothing of it stays on disk."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
            _unlink_quietly(self.tmp_path)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        _copy_durably(source, target)


def _copy_durably(source: Path, target: Path) -> None:
    partial = target.parent.parent / "tmp" / target.name
    with open(source, "rb") as src, open(partial, "xb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.rename(partial, target)


def _unlink_quietly(path: Any) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.error("could not remove {path}: {error}", path=str(path), error=exc)
