"""Durable file primitives shared by the stores: private files, fsyncs.

Everything here blocks: call it from a worker thread, never the reactor.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Any, BinaryIO

from twisted.logger import Logger

__all__ = [
    "DirectorySyncs",
    "create_private",
    "fsync_directory",
    "link_or_copy",
    "unlink_quietly",
    "write_durably",
]

_log = Logger()


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_private(path: Path) -> BinaryIO:
    """A new file only its owner can read; it must not exist yet."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename.

    The caller fsyncs the folder once it has renamed all it needs to.
    """
    # A name of its own for every write: two writers never share a file.
    partial = path.with_name(f"{path.name}.{os.urandom(6).hex()}.tmp")
    with create_private_replacing(partial) as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def create_private_replacing(path: Path) -> BinaryIO:
    """Like create_private, but a leftover file of that name is replaced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


class DirectorySyncs:
    """Group commits of directory fsyncs, one group per directory."""

    def __init__(self) -> None:
        self._groups: dict[Path, _GroupSync] = {}
        self._lock = threading.Lock()

    def sync(self, path: Path) -> None:
        """fsync ``path``, sharing one fsync among the threads that ask at once."""
        with self._lock:
            group = self._groups.get(path)
            if group is None:
                group = self._groups[path] = _GroupSync()
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


def link_or_copy(
    source: Path,
    target: Path,
    *,
    through: Path | None = None,
    mtime: float | None = None,
) -> None:
    """Hard-link ``source`` as ``target``; where that cannot be, copy durably.

    The copy is written to ``through`` and renamed to ``target`` when given
    (so ``target`` never holds a partial file), else straight to
    ``target``; ``mtime``, if given, becomes the copy's.  The caller fsyncs
    the folders.
    """
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    written = target if through is None else through
    with open(source, "rb") as src, create_private(written) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        if mtime is not None:
            os.utime(dst.fileno(), (mtime, mtime))
        os.fsync(dst.fileno())
    if through is not None:
        os.rename(through, target)


def unlink_quietly(path: Any) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.error("could not remove {path}: {error}", path=str(path), error=exc)
