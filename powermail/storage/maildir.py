"""Durable delivery into Maildirs.

A delivery is a small transaction, as in maildir's own protocol: the message
goes into ``tmp/`` of the first recipient's Maildir, then, in a worker
thread, is fsynced, linked into ``new/`` of every recipient and each ``new/``
fsynced (one fsync shared by the deliveries that finish together).  Only then does the commit's Deferred fire, so a caller that waits
for it before acknowledging never acknowledges a message a crash could lose.
The file holds the message exactly as given, CRLF line ends included.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
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


# A message up to this size is kept in memory until its commit, so that all
# of its disk work (create, write, fsync, link) runs in a worker thread; a
# larger one is streamed to its tmp/ file as it arrives.
SPILL_THRESHOLD = 256 * 1024


class MaildirStore:
    """The Maildirs of local mailboxes, one per mailbox under ``root``.

    ``run_blocking`` runs a function off the reactor thread and returns a
    Deferred; tests may pass one that runs it at once.
    """

    def __init__(
        self,
        root: Path,
        *,
        run_blocking: RunBlocking = deferToThread,
        spill_threshold: int = SPILL_THRESHOLD,
    ) -> None:
        self.root = root
        self.run_blocking = run_blocking
        self.spill_threshold = spill_threshold
        self._ready: set[Path] = set()
        self._syncs: dict[Path, _GroupSync] = {}
        self._syncs_lock = threading.Lock()

    def maildir_for(self, domain: str, local_key: str) -> Path:
        """Where the Maildir of ``local_key@domain`` lives."""
        return self.root / domain / local_key / "Maildir"

    def begin(self, maildirs: Iterable[Path]) -> MaildirDelivery:
        """Start a delivery of one message to each Maildir in ``maildirs``."""
        return MaildirDelivery(self, list(dict.fromkeys(maildirs)))

    def prepare(self, maildir: Path) -> list[Path]:
        """Make sure ``maildir`` exists; list the folders whose entries are new."""
        if maildir in self._ready:
            return []
        created = _ensure_maildir(maildir)
        self._ready.add(maildir)
        return created

    def forget(self, maildirs: Iterable[Path]) -> None:
        """Check these Maildirs again next time (one may have been removed)."""
        self._ready.difference_update(maildirs)

    def sync_directory(self, path: Path) -> None:
        """fsync ``path``, sharing one fsync among the threads that ask at once."""
        with self._syncs_lock:
            group = self._syncs.get(path)
            if group is None:
                group = self._syncs[path] = _GroupSync()
        group.sync(path)


class _GroupSync:
    """Group commit for one directory.

    A thread asks after its own change (a link into ``new/``) is made.  An
    fsync that starts after that covers the change, so a thread that finds
    an fsync already running waits for it and then, if it started too early
    to count, for the next one, which one of the waiters runs for all.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False

    def sync(self, path: Path) -> None:
        with self._condition:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket and self._running:
                self._condition.wait()
            if self._done >= ticket:
                return
            self._running = True
            covers = self._requested
        try:
            fsync_directory(path)
        except BaseException:
            with self._condition:
                self._running = False
                self._condition.notify_all()
            raise
        with self._condition:
            self._done = max(self._done, covers)
            self._running = False
            self._condition.notify_all()


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
    # Mail is private to its owner: folders 0700, files 0600.
    for folder in reversed(missing):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(maildir / sub, mode=0o700, exist_ok=True)
    # Each folder we made must be recorded in its parent, up to the one
    # that already existed: fsync those parents.
    created.append(maildir)
    created.extend(p.parent for p in missing)
    return created


class MaildirDelivery:
    """One message on its way into one or more Maildirs."""

    def __init__(self, store: MaildirStore, maildirs: list[Path]) -> None:
        if not maildirs:
            raise ValueError("a delivery needs at least one Maildir")
        self.store = store
        self.maildirs = maildirs
        self.size = 0
        self.base_name = maildir_name()
        self.tmp_path = maildirs[0] / "tmp" / self.base_name
        self.paths: list[Path] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._file: BinaryIO | None = None
        self._to_sync: list[Path] = []
        self._finished = False

    def write(self, data: bytes) -> None:
        """Append ``data`` to the message; no wait for the disk."""
        assert not self._finished, "write after commit or abort"
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self.store.spill_threshold:
            # A large message: stream it to disk from here on.  Creating
            # one file on the reactor thread is the price of flat memory.
            self._open_file()

    def _open_file(self) -> None:
        for maildir in self.maildirs:
            self._to_sync.extend(self.store.prepare(maildir))
        self._file = _create_private(self.tmp_path)
        self._file.write(b"".join(self._chunks))
        self._chunks = []

    def commit(self) -> Deferred[list[Path]]:
        """Make the message durable in every Maildir; fires with the paths."""
        assert not self._finished, "commit twice"
        self._finished = True
        return self.store.run_blocking(self._commit_blocking)

    def _commit_blocking(self) -> list[Path]:
        name = f"{self.base_name},S={self.size},W={self.size}"
        paths: list[Path] = []
        try:
            if self._file is None:
                self._open_file()
            file = self._file
            assert file is not None
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()
            for maildir in self.maildirs:
                target = maildir / "new" / name
                _link_or_copy(self.tmp_path, target)
                paths.append(target)
            for folder in dict.fromkeys(self._to_sync):
                fsync_directory(folder)
            for maildir in self.maildirs:
                self.store.sync_directory(maildir / "new")
        except BaseException:
            for path in paths:
                _unlink_quietly(path)
            self.store.forget(self.maildirs)
            raise
        finally:
            self._file = None
            _unlink_quietly(self.tmp_path)
        self.paths = paths
        return paths

    def abort(self) -> None:
        """Forget the message; nothing of it stays on disk."""
        self._finished = True
        self._chunks = []
        file, self._file = self._file, None
        if file is not None:
            file.close()
            _unlink_quietly(self.tmp_path)


def _create_private(path: Path) -> BinaryIO:
    """A new file only its owner can read; it must not exist yet."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        _copy_durably(source, target)


def _copy_durably(source: Path, target: Path) -> None:
    partial = target.parent.parent / "tmp" / target.name
    with open(source, "rb") as src, _create_private(partial) as dst:
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
