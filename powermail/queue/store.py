"""The durable outbound queue on disk.

Each message is two files in ``queue/messages/``: ``ID.eml``, the message
exactly as it will be sent (CRLF line ends), and ``ID.json``, its envelope
and per-recipient state in a versioned JSON a person can read.  The JSON is
written last: a message whose JSON exists is committed; an ``.eml`` without
one was never acknowledged and is removed at start.  Every write is a
temporary file, fsync, rename, then an fsync of the folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from powermail.queue.reencode import fit_for_transport
from powermail.storage.files import (
    DirectorySyncs,
    fsync_directory,
    unlink_quietly,
    write_durably,
)
from powermail.storage.spool import SPILL_THRESHOLD, SpoolFile

__all__ = [
    "FORMAT_VERSION",
    "QueueDelivery",
    "QueueStore",
    "QueuedMessage",
    "QueuedRecipient",
]

_log = Logger()
FORMAT_VERSION = 1
RunBlocking = Callable[..., Deferred]

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)
# Ids name files: letters, digits, and inner dashes or underscores only.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(slots=True)
class QueuedRecipient:
    """One envelope recipient and what became of it so far."""

    address: str
    next_hop: str
    tls: str = "opportunistic"
    state: str = PENDING
    attempts: int = 0
    code: int | None = None
    status: str | None = None
    text: str | None = None
    remote_mta: str | None = None


@dataclass(slots=True)
class QueuedMessage:
    """A message in the queue: envelope, schedule and recipients' states."""

    id: str
    sender: str
    created: float
    size: int
    smtputf8: bool = False
    eight_bit: bool = False
    recipients: list[QueuedRecipient] = field(default_factory=list)
    next_attempt: float = 0.0
    attempts: int = 0
    held: bool = False
    delay_warned: bool = False
    # Set for the DSNs PowerMail itself sends, which never bounce.
    is_report: bool = False

    @property
    def pending(self) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> bytes:
        data = {"version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, text: bytes) -> QueuedMessage:
        """Read an envelope; ValueError says what is wrong with a bad one."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.pop("version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown queue format version {version!r}")
        raw_recipients = data.pop("recipients", None)
        if not isinstance(raw_recipients, list) or not all(
            isinstance(r, dict) for r in raw_recipients
        ):
            raise ValueError("recipients must be a list of objects")
        try:
            entry = cls(
                recipients=[QueuedRecipient(**r) for r in raw_recipients], **data
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        entry._check()
        return entry

    def _check(self) -> None:
        if not isinstance(self.id, str) or not _SAFE_ID.fullmatch(self.id):
            raise ValueError(f"bad id {self.id!r}")
        for name in ("created", "next_attempt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite")
        for name in ("size", "attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number")
        for name in ("smtputf8", "eight_bit", "held", "delay_warned", "is_report"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        if not isinstance(self.sender, str):
            raise ValueError("sender must be a string")
        if not self.recipients:
            raise ValueError("no recipients")
        for recipient in self.recipients:
            if recipient.state not in STATES:
                raise ValueError(f"unknown state {recipient.state!r}")
            for name in ("address", "next_hop", "tls"):
                if not isinstance(getattr(recipient, name), str):
                    raise ValueError(f"recipient {name} must be a string")


class QueueStore:
    """The files of the queue under ``root``; blocking work runs in threads."""

    def __init__(
        self,
        root: Path,
        *,
        run_blocking: RunBlocking = deferToThread,
        spill_threshold: int = SPILL_THRESHOLD,
    ) -> None:
        self.root = root
        self.messages = root / "messages"
        self.tmp = root / "tmp"
        self.run_blocking = run_blocking
        self.spill_threshold = spill_threshold
        self._syncs = DirectorySyncs()
        self._locks: dict[str, DeferredLock] = {}

    def ensure_blocking(self) -> None:
        """Create the queue's folders durably (at start)."""
        for folder in (self.root, self.messages, self.tmp):
            if not folder.is_dir():
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fsync_directory(folder.parent)

    def message_path(self, msg_id: str) -> Path:
        return self.messages / f"{msg_id}.eml"

    def _envelope_path(self, msg_id: str) -> Path:
        return self.messages / f"{msg_id}.json"

    def begin(self, entry: QueuedMessage) -> QueueDelivery:
        """Start writing ``entry``'s message; commit makes it part of the queue."""
        return QueueDelivery(self, entry)

    def load_blocking(self) -> list[QueuedMessage]:
        """Every committed message; leftovers of unacknowledged ones are removed."""
        self.ensure_blocking()
        for leftover in self.tmp.iterdir():
            unlink_quietly(leftover)
        entries = []
        names = {p.name for p in self.messages.iterdir()}
        for name in sorted(names):
            if name.endswith(".tmp"):
                unlink_quietly(self.messages / name)
                continue
            if name.endswith(".json") and f"{name[:-5]}.eml" not in names:
                _log.error(
                    "queue entry {msg_id} has an envelope but no message, left in place",
                    msg_id=name[:-5],
                )
                continue
            if not name.endswith(".eml"):
                continue
            msg_id = name[: -len(".eml")]
            envelope = self._envelope_path(msg_id)
            if f"{msg_id}.json" not in names:
                # The envelope comes last: without it, no 250 was ever sent.
                unlink_quietly(self.messages / name)
                continue
            try:
                entry = QueuedMessage.from_json(envelope.read_bytes())
                if entry.id != msg_id:
                    raise ValueError(f"its id is {entry.id!r}")
            except (OSError, ValueError) as exc:
                _log.error(
                    "queue entry {msg_id} unreadable, left in place: {error}",
                    msg_id=msg_id,
                    error=exc,
                )
                continue
            entries.append(entry)
        return entries

    def save(self, entry: QueuedMessage) -> Deferred[None]:
        """Record ``entry``'s state as it is now, durably.

        The state is serialised here, on the caller's thread, and the saves
        of one entry are written one after the other, so the file always
        ends with the latest state.
        """
        data = entry.to_json()
        lock = self._locks.setdefault(entry.id, DeferredLock())
        d = lock.run(self.run_blocking, self._write_envelope_blocking, entry.id, data)
        d.addBoth(self._forget_lock, entry.id, lock)
        return d

    def _forget_lock(self, result: object, msg_id: str, lock: DeferredLock) -> object:
        if not lock.locked and not lock.waiting and self._locks.get(msg_id) is lock:
            del self._locks[msg_id]
        return result

    def _write_envelope_blocking(self, msg_id: str, data: bytes) -> None:
        write_durably(self._envelope_path(msg_id), data)
        self._syncs.sync(self.messages)

    def remove(self, entry: QueuedMessage | str) -> Deferred[None]:
        """Take an entry (or id) out of the queue: delivered, bounced, deleted."""
        msg_id = entry if isinstance(entry, str) else entry.id
        lock = self._locks.setdefault(msg_id, DeferredLock())
        d = lock.run(self.run_blocking, self._remove_blocking, msg_id)
        d.addBoth(self._forget_lock, msg_id, lock)
        return d

    def load_one_blocking(self, msg_id: str) -> QueuedMessage:
        """One committed entry, read from its envelope; KeyError if gone."""
        path = self._envelope_path(msg_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyError(msg_id) from None
        entry = QueuedMessage.from_json(data)
        if entry.id != msg_id:
            raise ValueError(f"its id is {entry.id!r}")
        return entry

    def read_all_blocking(self) -> list[QueuedMessage]:
        """Every readable entry, without touching anything (for listings)."""
        found = []
        for path in sorted(self.messages.glob("*.json")):
            try:
                found.append(self.load_one_blocking(path.stem))
            except (KeyError, OSError, ValueError):
                continue
        return found

    def _remove_blocking(self, msg_id: str) -> None:
        # The envelope goes first, so a crash in between leaves an .eml
        # without envelope, which the next start removes.
        unlink_quietly(self._envelope_path(msg_id))
        unlink_quietly(self.message_path(msg_id))
        self._syncs.sync(self.messages)

    def enqueue_blocking(self, entry: QueuedMessage, data: bytes) -> None:
        """Queue a message PowerMail writes itself (a DSN): file and envelope."""
        spool = SpoolFile(self.tmp / entry.id, threshold=len(data) + 1)
        spool.write(data)
        self._commit_blocking(entry, spool)

    def _commit_blocking(
        self, entry: QueuedMessage, spool: SpoolFile, fit: bool = False
    ) -> None:
        try:
            spool.finish_blocking()
            if fit:
                self._fit_blocking(entry, spool.path)
            os.rename(spool.path, self.message_path(entry.id))
            write_durably(self._envelope_path(entry.id), entry.to_json())
        except BaseException:
            unlink_quietly(spool.path)
            unlink_quietly(self.message_path(entry.id))
            raise
        self._syncs.sync(self.messages)

    def _fit_blocking(self, entry: QueuedMessage, path: Path) -> None:
        """Rewrite the spooled file so that no line exceeds 998 octets."""
        data = path.read_bytes()
        fitted = fit_for_transport(data)
        if fitted is data:
            return
        replacement = SpoolFile(
            path.with_name(path.name + ".fit"), threshold=len(fitted) + 1
        )
        replacement.write(fitted)
        replacement.finish_blocking()
        os.replace(replacement.path, path)
        entry.size = len(fitted)


class QueueDelivery:
    """One message on its way into the queue, written like a Maildir delivery."""

    def __init__(self, store: QueueStore, entry: QueuedMessage) -> None:
        self.store = store
        self.entry = entry
        self._finished = False
        self._spool = SpoolFile(store.tmp / entry.id, threshold=store.spill_threshold)

    def write(self, data: bytes) -> None:
        assert not self._finished, "write after commit or abort"
        self._spool.write(data)

    def commit(self, *, long_lines: bool = False) -> Deferred[QueuedMessage]:
        """Make message and envelope durable; fires with the entry.

        ``long_lines``: the message has lines over 998 octets; the parts
        holding them are re-encoded first (``queue.reencode``), in the
        worker thread, since this copy is sent on.
        """
        assert not self._finished, "commit twice"
        self._finished = True
        self.entry.size = self._spool.size
        d = self.store.run_blocking(
            self.store._commit_blocking, self.entry, self._spool, long_lines
        )
        d.addCallback(lambda _: self.entry)
        return d

    def abort(self) -> None:
        self._finished = True
        self._spool.discard()
