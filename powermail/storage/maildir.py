"""Durable delivery into Maildirs.

A delivery is a small transaction, as in maildir's own protocol: the message
goes into ``tmp/`` of the first recipient's Maildir, then, in a worker
thread, is fsynced, linked into ``new/`` of every recipient and each ``new/``
fsynced (one fsync shared by the deliveries that finish together).  Only then does the commit's Deferred fire, so a caller that waits
for it before acknowledging never acknowledges a message a crash could lose.
The file holds the message exactly as given, CRLF line ends included.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from powermail.storage.files import (
    DirectorySyncs,
    fsync_directory,
    link_or_copy,
    unlink_quietly,
)
from powermail.storage.spool import SPILL_THRESHOLD, SpoolFile

__all__ = [
    "MaildirDelivery",
    "MaildirStore",
    "ensure_maildir",
    "fsync_directory",
    "maildir_name",
]

_sequence = itertools.count(1)
RunBlocking = Callable[..., Deferred]


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
        self._syncs = DirectorySyncs()

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
        created = ensure_maildir(maildir)
        self._ready.add(maildir)
        return created

    def forget(self, maildirs: Iterable[Path]) -> None:
        """Check these Maildirs again next time (one may have been removed)."""
        self._ready.difference_update(maildirs)

    def sync_directory(self, path: Path) -> None:
        """fsync ``path``, shared with the deliveries that finish together."""
        self._syncs.sync(path)


def ensure_maildir(maildir: Path) -> list[Path]:
    """Create ``maildir`` with its three folders; list the folders to fsync."""
    created: list[Path] = []
    if all((maildir / sub).is_dir() for sub in ("cur", "new", "tmp")):
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
        self.base_name = maildir_name()
        self.paths: list[Path] = []
        self._to_sync: list[Path] = []
        self._finished = False
        self._spool = SpoolFile(
            maildirs[0] / "tmp" / self.base_name,
            prepare=self._prepare,
            threshold=store.spill_threshold,
        )

    @property
    def size(self) -> int:
        return self._spool.size

    def _prepare(self) -> None:
        for maildir in self.maildirs:
            self._to_sync.extend(self.store.prepare(maildir))

    def write(self, data: bytes) -> None:
        """Append ``data`` to the message; no wait for the disk."""
        assert not self._finished, "write after commit or abort"
        self._spool.write(data)

    def commit(self, *, long_lines: bool = False) -> Deferred[list[Path]]:
        """Make the message durable in every Maildir; fires with the paths.

        ``long_lines`` changes nothing here: a Maildir keeps the message
        exactly as received, whatever its line lengths.
        """
        assert not self._finished, "commit twice"
        self._finished = True
        return self.store.run_blocking(self._commit_blocking)

    def _commit_blocking(self) -> list[Path]:
        name = f"{self.base_name},S={self.size},W={self.size}"
        paths: list[Path] = []
        tmp_path = self._spool.path
        try:
            self._spool.finish_blocking()
            for maildir in self.maildirs:
                target = maildir / "new" / name
                # A copy, if linking fails, goes through this Maildir's tmp/.
                link_or_copy(tmp_path, target, through=maildir / "tmp" / name)
                paths.append(target)
            for folder in dict.fromkeys(self._to_sync):
                fsync_directory(folder)
            for maildir in self.maildirs:
                self.store.sync_directory(maildir / "new")
        except BaseException:
            for path in paths:
                unlink_quietly(path)
            self.store.forget(self.maildirs)
            raise
        finally:
            unlink_quietly(tmp_path)
        self.paths = paths
        return paths

    def abort(self) -> None:
        """Forget the message; nothing of it stays on disk."""
        self._finished = True
        self._spool.discard()
