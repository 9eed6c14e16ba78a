"""Telling idling sessions about changes to their folder (RFC 2177 IDLE).

A change made through this server (a STORE, an APPEND, an EXPUNGE by
another session) is pushed at once from the folder's new snapshot.  Changes
made by any other program (the MX writing into ``new/``, Dovecot, a script)
are found by polling: every ``interval`` seconds each folder that someone
idles on is synced once, in a worker thread, and its idlers told.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from powermail.storage.maildirpp import Folder, FolderError, Snapshot

__all__ = ["FolderNotifier"]

_log = Logger()

# Called with the new snapshot, or None once the folder is gone.
Listener = Callable[[Snapshot | None], None]


class FolderNotifier:
    """Who idles on which folder, and a poll of those folders."""

    def __init__(
        self,
        clock: Any,
        *,
        interval: float = 1.0,
        run_blocking: Callable[..., Any] = deferToThread,
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._run_blocking = run_blocking
        self._listeners: dict[Folder, dict[int, Listener]] = {}
        self._polling: set[Folder] = set()
        self._loop: task.LoopingCall | None = None

    def watch(self, folder: Folder, key: int, listener: Listener) -> None:
        """Call ``listener(snapshot)`` whenever ``folder`` may have changed."""
        self._listeners.setdefault(folder, {})[key] = listener
        if self._loop is None:
            self._loop = task.LoopingCall(self._poll)
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=False)

    def unwatch(self, folder: Folder, key: int) -> None:
        listeners = self._listeners.get(folder)
        if listeners is None:
            return
        listeners.pop(key, None)
        if not listeners:
            del self._listeners[folder]
        if not self._listeners and self._loop is not None:
            self._loop.stop()
            self._loop = None

    def changed(self, folder: Folder) -> None:
        """This server just changed ``folder``: tell its idlers now."""
        for listener in list(self._listeners.get(folder, {}).values()):
            listener(folder.snapshot)

    def _poll(self) -> None:
        for folder in list(self._listeners):
            if folder in self._polling:
                continue
            self._polling.add(folder)
            d = self._run_blocking(folder.sync)
            d.addCallback(lambda snapshot, f=folder: self._tell(f, snapshot))
            d.addErrback(self._failed, folder)
            d.addBoth(lambda _, f=folder: self._polling.discard(f))

    def _tell(self, folder: Folder, snapshot: Snapshot) -> None:
        for listener in list(self._listeners.get(folder, {}).values()):
            listener(snapshot)

    def _failed(self, failure: Any, folder: Folder) -> None:
        if failure.check(FolderError) and failure.value.code == "NONEXISTENT":
            # Deleted or renamed: its idlers are told there is nothing left.
            self._tell(folder, None)
            return
        _log.failure("could not sync {mailbox}", failure, mailbox=folder.name)
