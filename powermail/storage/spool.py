"""A message being received: kept in memory while small, on disk once large.

Small messages (the usual case) never touch the disk from the reactor
thread: their file is created, written and fsynced by ``finish_blocking`` in
a worker thread.  A message past the threshold is streamed to its file as it
arrives, so memory stays flat however large it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from powermail.storage.files import create_private, unlink_quietly

__all__ = ["SPILL_THRESHOLD", "SpoolFile"]

SPILL_THRESHOLD = 256 * 1024


class SpoolFile:
    """The bytes of one message on their way to ``path``.

    ``prepare`` is called once, before the file is created (on the reactor
    thread for a large message, in ``finish_blocking`` otherwise): it makes
    the folders the file needs.
    """

    def __init__(
        self,
        path: Path,
        *,
        prepare: Callable[[], None] = lambda: None,
        threshold: int = SPILL_THRESHOLD,
    ) -> None:
        self.path = path
        self.size = 0
        self._prepare = prepare
        self._threshold = threshold
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        """Append ``data``; no wait for the disk while the message is small."""
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._threshold:
            # Creating one file on the reactor thread is the price of flat
            # memory for a large message.
            self._open()

    def _open(self) -> None:
        self._prepare()
        self._file = create_private(self.path)
        self._file.write(b"".join(self._chunks))
        self._chunks = []

    def finish_blocking(self) -> Path:
        """Write what is left and fsync the file; for a worker thread."""
        if self._file is None:
            self._open()
        file, self._file = self._file, None
        assert file is not None
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        return self.path

    def discard(self) -> None:
        """Forget the message; its file, if any, is removed."""
        self._chunks = []
        file, self._file = self._file, None
        if file is not None:
            file.close()
            unlink_quietly(self.path)
