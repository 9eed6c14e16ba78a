"""One user's mail as Dovecot keeps it: Maildir++ with Dovecot's index files.

The user's Maildir root is INBOX; every other folder is a directory
``.Name`` beside INBOX's ``cur``/``new``/``tmp``, named with the IMAP name
itself (modified UTF-7, hierarchy separator ``.``).  UIDs live in each
folder's ``dovecot-uidlist``, keyword letters in ``dovecot-keywords``, the
subscriptions in the root's ``subscriptions``, all in the formats Dovecot 2.3
reads and writes, so an administrator may point Dovecot at the same Maildir
(or PowerMail at Dovecot's) and clients see the same UIDs, UIDVALIDITY,
flags, keywords, folders and subscriptions.

Between processes the folder's state is guarded by Dovecot's dotlock
``dovecot-uidlist.lock``; inside this process by one lock per
:class:`Folder`, and every session of the process shares one Folder object
per folder.  Everything here blocks: the IMAP layer calls it from worker
threads.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import shutil
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)
from twisted.logger import Logger

from powermail.storage.files import (
    create_private,
    fsync_directory,
    link_or_copy,
    unlink_quietly,
)
from powermail.storage.maildir import ensure_maildir, maildir_name

__all__ = [
    "SEPARATOR",
    "SPECIAL_USE",
    "SYSTEM_FLAGS",
    "Entry",
    "Folder",
    "FolderError",
    "Snapshot",
    "UserMail",
]

SEPARATOR = "."
SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
}
SYSTEM_FLAGS = ("\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen")

_log = Logger()

# Maildir's flag letters (cr.yp.to/proto/maildir.html), as Dovecot maps them.
_FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
_LETTER_FLAGS = {letter: flag for flag, letter in _FLAG_LETTERS.items()}
_SYSTEM_BY_UPPER = {flag.upper(): flag for flag in SYSTEM_FLAGS}
_MAX_KEYWORDS = 26  # one lowercase letter each, as in Dovecot

_MAX_NAME_OCTETS = 200
_MAX_DEPTH = 20

_UIDLIST = "dovecot-uidlist"
_KEYWORDS = "dovecot-keywords"
_SUBSCRIPTIONS = "subscriptions"
_UIDVALIDITY = "dovecot-uidvalidity"
# Dovecot renames a folder to this name before removing it, and its folder
# listing skips (and after an hour removes) a leftover one.
_TRASH_DIR = "..DOVECOT-TRASHED"

# Dovecot's own limits for the dotlocks it shares with us.
_UIDLIST_STALE = 120.0
_PROCESS_STARTED = time.time()
_LEFT_OVER_AGE = 5.0
_SUBSCRIPTIONS_STALE = 30.0
_LOCK_WAIT = 10.0

# A scan is trusted to have seen every change only once it ran this long
# after the newest mtime it relied on: a file created in the same clock
# tick as the scan leaves the directory's mtime unchanged.
_MTIME_SLACK_NS = 2_000_000_000

_SUBSCRIPTIONS_V2 = b"V\t2\n\n"

# Files left in tmp/ this long are remains of a crash (the Maildir spec's
# 36 hours, which Dovecot follows); each folder's tmp/ is looked at hourly.
_TMP_STALE = 36 * 3600
_TMP_CLEAN_INTERVAL = 3600.0


def clean_tmp(tmp: Path) -> None:
    """Remove files in ``tmp`` untouched for 36 hours."""
    limit = time.time() - _TMP_STALE
    try:
        with os.scandir(tmp) as it:
            stale = [
                e.path
                for e in it
                if e.is_file(follow_symlinks=False)
                and e.stat(follow_symlinks=False).st_mtime < limit
            ]
    except FileNotFoundError:
        return
    for path in stale:
        _log.info("removing stale {path}", path=path)
        unlink_quietly(path)


class FolderError(Exception):
    """A refused folder operation, with the reply it deserves.

    ``code`` is an RFC 5530 response code ("NONEXISTENT", "ALREADYEXISTS",
    "CANNOT", "LIMIT", "INUSE", "SERVERBUG") or None; ``text`` is a sentence
    for the client that never names a file or directory.
    """

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of a folder as the last scan saw it."""

    uid: int
    # The file's current name (in cur/, with ":2,<flags>"; a message still
    # in new/ has no flag part).
    name: str
    # IMAP flag names: system flags with their backslash, keywords as stored.
    flags: frozenset[str]
    # The file's mtime: Dovecot's received date, IMAP's INTERNALDATE.
    internaldate: float
    # The size with CRLF line ends, if known without reading the file.
    vsize: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A folder's state at one moment: never changed, replaced by a newer one."""

    uidvalidity: int
    next_uid: int
    entries: tuple[Entry, ...]  # sorted by uid
    _index: dict[int, Entry] | None = field(
        default=None, init=False, compare=False, repr=False
    )

    def by_uid(self) -> dict[int, Entry]:
        """The entries by UID (built once; do not change the dict)."""
        index = self._index
        if index is None:
            index = {entry.uid: entry for entry in self.entries}
            object.__setattr__(self, "_index", index)
        return index


# -- folder names ---------------------------------------------------------------


def _refuse_name(why: str) -> FolderError:
    return FolderError(f"Invalid folder name: {why}.", code="CANNOT")


def _check_name(name: str) -> str:
    """``name`` as stored (INBOX spelled in capitals), or FolderError."""
    if not isinstance(name, str) or not name:
        raise _refuse_name("it is empty")
    first, sep, rest = name.partition(SEPARATOR)
    if first.upper() == "INBOX":
        if not sep:
            return "INBOX"
        name = "INBOX" + sep + rest
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise _refuse_name(
            "it must be in modified UTF-7 (RFC 3501 section 5.1.3)"
        ) from None
    if len(raw) > _MAX_NAME_OCTETS:
        raise _refuse_name(f"it is longer than {_MAX_NAME_OCTETS} octets")
    for char in name:
        if char in "%*":
            raise _refuse_name("the LIST wildcards % and * are not allowed")
        if char in "/\\":
            raise _refuse_name("/ and \\ are not allowed")
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise _refuse_name("control characters are not allowed")
    parts = name.split(SEPARATOR)
    if any(not part for part in parts):
        raise _refuse_name(
            f"it has an empty level (a leading, trailing or doubled {SEPARATOR})"
        )
    if len(parts) > _MAX_DEPTH:
        raise _refuse_name(f"it is more than {_MAX_DEPTH} levels deep")
    try:
        decoded = raw.decode("imap4-utf-7")
        again = decoded.encode("imap4-utf-7")
    except (UnicodeError, ValueError):
        again = None
    if again != raw:
        raise _refuse_name("it is not valid modified UTF-7 (RFC 3501 section 5.1.3)")
    if any(unicodedata.category(char) == "Cc" for char in decoded):
        raise _refuse_name("control characters are not allowed")
    return name


# -- Maildir file names ----------------------------------------------------------


def _base_of(filename: str) -> str:
    """The part of a Maildir file name that never changes (before ':')."""
    return filename.split(":", 1)[0]


def _split_info(filename: str) -> tuple[str, str, str]:
    """(prefix, flag letters, kept tail) of ``prefix:2,<letters>[,tail]``.

    Like Dovecot, the info part is what follows the last ':'; a second ','
    starts flags of some other program, kept as they are.
    """
    prefix, colon, info = filename.rpartition(":")
    if not colon:
        return filename, "", ""
    if not info.startswith("2,"):
        return prefix, "", ""
    letters, comma, tail = info[2:].partition(",")
    return prefix, letters, comma + tail


def _size_field(filename: str, key: str) -> int | None:
    """The ``,S=`` or ``,W=`` number of a file name's base, if present."""
    match = re.search(rf",{key}=(\d+)(?:[,:]|$)", _base_of(filename))
    return int(match.group(1)) if match else None


def _sort_key(base: str) -> tuple[int, int, str]:
    """Dovecot's order for giving UIDs: timestamp, microseconds, name."""
    match = re.match(r"(\d*)(?:\.[^.:]*?M(\d+))?", base)
    seconds = int(match.group(1) or 0)
    micro = int(match.group(2) or 0)
    return seconds, micro, base


def _count_vsize(file: BinaryIO) -> tuple[int, int]:
    """(size, size with every bare LF counted as CRLF) of an open file."""
    size = bare = 0
    last = b""
    while chunk := file.read(1 << 20):
        size += len(chunk)
        bare += chunk.count(b"\n") - chunk.count(b"\r\n")
        if last == b"\r" and chunk.startswith(b"\n"):
            bare -= 1
        last = chunk[-1:]
    return size, size + bare


_LF = re.compile(rb"\r?\n")


def _to_crlf(data: bytes) -> bytes:
    # Most files already have CRLF (the MX stores what it received): the
    # two counts are far cheaper than a rewrite.
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _LF.sub(b"\r\n", data)


def _header_end(data: bytes, start: int) -> int:
    """Offset after the first empty line (CRLF or LF) at or after ``start``."""
    if start == 0:
        if data.startswith(b"\r\n"):
            return 2
        if data.startswith(b"\n"):
            return 1
    crlf = data.find(b"\n\r\n", start)
    lf = data.find(b"\n\n", start, crlf + 3 if crlf >= 0 else len(data))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    return crlf + 3 if crlf >= 0 else -1


def _read_header(file: BinaryIO) -> bytes:
    """The header section of an open message file, up to its blank line."""
    data = b""
    while chunk := file.read(16384):
        searched_from = max(len(data) - 2, 0)
        data += chunk
        end = _header_end(data, searched_from)
        if end >= 0:
            return data[:end]
    return data


# -- dotlocks ---------------------------------------------------------------------


class _DotLock:
    """Dovecot's dotlock on ``target``: ``<target>.lock`` created with O_EXCL.

    Its holder may replace ``target`` by writing the new contents into the
    lock file and renaming it over ``target``, which also releases it.  A
    lock older than ``stale_after`` seconds is taken to be left by a crash.
    """

    def __init__(
        self, target: Path, *, stale_after: float, wait: float | None = None
    ) -> None:
        self.target = target
        self.path = target.with_name(target.name + ".lock")
        self.stale_after = stale_after
        self.wait = _LOCK_WAIT if wait is None else wait
        self._fd: int | None = None

    def __enter__(self) -> _DotLock:
        deadline = time.monotonic() + self.wait
        delay = 0.002
        while True:
            try:
                self._fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                )
                return self
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise FolderError(
                    "The folder no longer exists.", code="NONEXISTENT"
                ) from None
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                continue
            age = time.time() - st.st_mtime
            # A lock older than this process, and not just being written,
            # was left by a crash of ours (the data_dir lock keeps a second
            # PowerMail away; Dovecot holds it for milliseconds).
            left_over = st.st_mtime < _PROCESS_STARTED and age > _LEFT_OVER_AGE
            if age > self.stale_after or left_over:
                _log.warn(
                    "removing stale lock {lock}, {age:.0f} s old",
                    lock=str(self.path),
                    age=time.time() - st.st_mtime,
                )
                self._remove_if_same(st)
                continue
            if time.monotonic() > deadline:
                raise FolderError(
                    "The folder is locked by another program; try again later.",
                    code="INUSE",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _remove_if_same(self, seen: os.stat_result) -> None:
        # Another process may have replaced the stale lock already.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_ino, st.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):
            unlink_quietly(self.path)

    def replace(self, data: bytes) -> os.stat_result:
        """Make ``data`` the target's durable contents; the lock is released."""
        assert self._fd is not None, "replace without the lock"
        fd, self._fd = self._fd, None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            st = os.fstat(fd)
            os.rename(self.path, self.target)
        except FileNotFoundError:
            os.close(fd)
            unlink_quietly(self.path)
            # The folder was deleted or renamed while we held its lock.
            raise FolderError(
                "The folder no longer exists.", code="NONEXISTENT"
            ) from None
        except BaseException:
            os.close(fd)
            unlink_quietly(self.path)
            raise
        os.close(fd)
        fsync_directory(self.target.parent)
        return st

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            unlink_quietly(self.path)


def _file_stamp(st: os.stat_result | None) -> tuple[int, int, int] | None:
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


# -- dovecot-uidlist ------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    uid: int
    base: str
    extensions: list[str]  # "<key><value>", as Dovecot writes them

    def extension(self, key: str) -> str | None:
        for item in self.extensions:
            if item.startswith(key):
                return item[1:]
        return None

    def set_extension(self, key: str, value: str) -> None:
        self.extensions = [e for e in self.extensions if not e.startswith(key)]
        self.extensions.append(key + value)


@dataclass(slots=True)
class _Uidlist:
    """The contents of a ``dovecot-uidlist`` (version 3; version 1 is read)."""

    uidvalidity: int
    next_uid: int
    guid: str
    header_extra: list[str] = field(default_factory=list)
    records: dict[str, _Record] = field(default_factory=dict)  # by base name

    @classmethod
    def parse(cls, data: bytes) -> _Uidlist | None:
        """The uidlist in ``data``, or None if its header is unusable."""
        text = data.decode("utf-8", "surrogateescape")
        lines = text.split("\n")
        header = lines[0].split()
        uidlist = None
        if header[:1] == ["3"]:
            values: dict[str, str] = {}
            extra = []
            for item in header[1:]:
                if item[:1] in ("V", "N", "G"):
                    values[item[0]] = item[1:]
                else:
                    extra.append(item)
            try:
                uidlist = cls(int(values["V"]), int(values["N"]), values.get("G", ""))
            except (KeyError, ValueError):
                return None
            uidlist.header_extra = extra
        elif header[:1] == ["1"] and len(header) >= 3:
            try:
                uidlist = cls(int(header[1]), int(header[2]), "")
            except ValueError:
                return None
        if uidlist is None or uidlist.uidvalidity <= 0:
            return None
        version3 = header[0] == "3"
        seen: set[int] = set()
        highest = 0
        for line in lines[1:]:
            if not line:
                continue
            uid_text, _, rest = line.partition(" ")
            if not uid_text.isdigit() or int(uid_text) == 0:
                _log.warn("ignoring a broken uidlist line: {line!r}", line=line[:80])
                continue
            uid = int(uid_text)
            extensions = []
            if version3:
                rest = rest.lstrip(" ")
                while rest and not rest.startswith(":"):
                    item, _, rest = rest.partition(" ")
                    extensions.append(item)
                    rest = rest.lstrip(" ")
                rest = rest[1:]
            base = _base_of(rest)
            if not base or "/" in base or uid in seen:
                _log.warn("ignoring a broken uidlist line: {line!r}", line=line[:80])
                continue
            seen.add(uid)
            highest = max(highest, uid)
            # A later line for the same file wins, as in Dovecot.
            uidlist.records[base] = _Record(uid, base, extensions)
        # Dovecot appends records without rewriting the header's N.
        uidlist.next_uid = max(uidlist.next_uid, highest + 1, 1)
        return uidlist

    def serialize(self) -> bytes:
        """Version 3, as Dovecot writes it: header, then records by UID."""
        header = [f"3 V{self.uidvalidity} N{self.next_uid} G{self.guid}"]
        header.extend(self.header_extra)
        lines = [" ".join(header)]
        for record in sorted(self.records.values(), key=lambda r: r.uid):
            fields = [str(record.uid), *record.extensions, ":" + record.base]
            lines.append(" ".join(fields))
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


# -- folders ----------------------------------------------------------------------

# Every Folder of this process, by the real path of its directory, while
# anyone holds it: the sessions of one user share one state per folder.
_registry: weakref.WeakValueDictionary[str, Folder] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
# The folders used last stay in memory when no session holds them, so a
# client that logs in again (or a mail program polling every few minutes)
# does not rescan a large folder; a sync still notices any change on disk.
_KEEP_RECENT = 64
_kept: collections.OrderedDict[str, Folder] = collections.OrderedDict()


def forget_folders() -> None:
    """Drop every shared Folder, as a new process starts (for tests)."""
    with _registry_lock:
        _kept.clear()
        _registry.clear()


class Folder:
    """One Maildir++ folder: its messages, UIDs, flags and keywords.

    Get it from :meth:`UserMail.folder`.  All methods block and are safe to
    call from several threads; ``snapshot`` is the state the last
    :meth:`sync` or change produced.
    """

    def __init__(self, name: str, path: Path, new_uidvalidity: Callable[[], int]):
        self.name = name
        self.path = path
        self._root_text = str(path)
        self.snapshot = Snapshot(0, 1, ())
        self._new_uidvalidity = new_uidvalidity
        self._lock = threading.Lock()
        self._detached = False
        self._uidlist: _Uidlist | None = None
        self._uidlist_stamp: tuple[int, int, int] | None = None
        self._keywords: list[str | None] = []
        self._keywords_stamp: tuple[int, int, int] | None = None
        self._files: dict[str, tuple[str, str]] = {}  # base -> (subdir, name)
        self._where: dict[int, tuple[str, str]] = {}  # uid -> (subdir, name)
        self._mtimes: dict[str, float] = {}  # base -> mtime
        self._vsizes: dict[str, int] = {}  # base -> vsize counted by us
        self._entries: dict[str, Entry] = {}  # file name -> entry
        self._stamp: tuple | None = None
        self._scanned_at = 0
        self._recent: set[int] = set()
        self._recent_known: set[int] = set()
        self._tmp_cleaned = float("-inf")

    def __repr__(self) -> str:
        return f"<Folder {self.name!r}>"

    # -- public -------------------------------------------------------------

    def sync(self, *, move_new: bool = True) -> Snapshot:
        """Look at the disk again; the new snapshot.

        New messages get UIDs; with ``move_new`` those in ``new/`` move to
        ``cur/`` as Dovecot moves them (an EXAMINE passes False).
        """
        with self._lock:
            now = time.monotonic()
            if now - self._tmp_cleaned > _TMP_CLEAN_INTERVAL:
                self._tmp_cleaned = now
                clean_tmp(self.path / "tmp")
            return self._sync_locked(move_new=move_new)

    def claim_recent(self, uids: Iterable[int]) -> set[int]:
        """The ``uids`` that are \\Recent for the caller.

        A message is recent once, for the first session that asks: it got
        its UID from this process (found in new/ or unrecorded in cur/,
        appended or copied here) or a sync of this process moved it out of
        new/.
        """
        with self._lock:
            claimed = self._recent.intersection(uids)
            self._recent -= claimed
            return claimed

    def tmp_path(self) -> Path:
        """A fresh path in ``tmp/`` to write a message into, for :meth:`append`."""
        tmp = self.path / "tmp"
        if not tmp.is_dir():
            # Never made again here: the folder may have just been deleted
            # or renamed, and a lone tmp/ would look like a folder.
            self._check_attached()
            if not (self.path / "cur").is_dir():
                raise FolderError("The folder no longer exists.", code="NONEXISTENT")
            os.makedirs(tmp, mode=0o700, exist_ok=True)
        return tmp / maildir_name()

    def append(
        self,
        data_path: Path,
        *,
        flags: frozenset[str],
        internaldate: float | None,
    ) -> int:
        """Add the message written at ``data_path`` (in this folder's tmp/).

        The message is durable, with its UID recorded, when this returns
        the UID.  ``internaldate`` (seconds since the epoch) becomes the
        file's mtime.
        """
        data_path = Path(data_path)
        if os.path.realpath(data_path.parent) != os.path.realpath(self.path / "tmp"):
            raise ValueError("append takes a file in the folder's own tmp/")
        try:
            file = open(data_path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            # Deleted or renamed with the folder it was written into.
            raise FolderError(
                "The folder no longer exists.", code="NONEXISTENT"
            ) from None
        with file:
            size, vsize = _count_vsize(file)
            # Mail is private to its owner, however the caller made the file.
            os.fchmod(file.fileno(), 0o600)
            if internaldate is not None:
                os.utime(file.fileno(), (internaldate, internaldate))
            os.fsync(file.fileno())
        base = f"{maildir_name()},S={size},W={vsize}"
        try:
            with self._lock:
                (uid,) = self._commit_locked([(data_path, base, frozenset(flags))])
        finally:
            unlink_quietly(data_path)
        _log.info("appended UID {uid} to {mailbox}", uid=uid, mailbox=self.name)
        return uid

    def store_flags(self, changes: dict[int, frozenset[str]]) -> Snapshot:
        """Give each UID exactly the flags given; the new snapshot.

        A message expunged meanwhile is skipped.  \\Recent and unknown
        system flags are ignored; a keyword beyond the 26 a Maildir folder
        can name is refused with LIMIT before anything changes.
        """
        with self._lock:
            self._check_attached()
            self._sync_locked(move_new=True)
            return self._store_locked(changes)

    def update_flags(
        self, uids: Iterable[int], update: Callable[[frozenset[str]], frozenset[str]]
    ) -> tuple[Snapshot, set[int]]:
        """Apply ``update`` to each message's current flags; the new snapshot
        and the UIDs whose flags changed.

        The current flags are read and the new ones written under the
        folder's lock, so two sessions adding different flags to one
        message at once both have their way (STORE +FLAGS, FETCH's \\Seen).
        """
        with self._lock:
            self._check_attached()
            self._sync_locked(move_new=True)
            current = self.snapshot.by_uid()
            changes = {}
            for uid in uids:
                entry = current.get(uid)
                if entry is None:
                    continue
                flags = frozenset(update(entry.flags))
                if flags != entry.flags:
                    changes[uid] = flags
            return self._store_locked(changes), set(changes)

    def _store_locked(self, changes: dict[int, frozenset[str]]) -> Snapshot:
        wanted = {flag for flags in changes.values() for flag in flags}
        self._ensure_keywords_locked(wanted)
        renamed_from: set[str] = set()
        for uid, flags in changes.items():
            for attempt in range(2):
                where = self._where.get(uid)
                if where is None:
                    break
                subdir, old = where
                new = self._flagged_name(old, flags)
                if new == old and subdir == "cur":
                    break
                try:
                    os.rename(self.path / subdir / old, self.path / "cur" / new)
                except FileNotFoundError:
                    if attempt == 0:
                        self._sync_locked(move_new=False, force=True)
                    continue
                renamed_from.add(subdir)
                self._files[_base_of(old)] = ("cur", new)
                self._where[uid] = ("cur", new)
                break
        if renamed_from:
            fsync_directory(self.path / "cur")
            if "new" in renamed_from:
                fsync_directory(self.path / "new")
            self._rebuild_locked()
        return self.snapshot

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Remove these messages for good; the UIDs really removed."""
        with self._lock:
            self._check_attached()
            return self._expunge_locked(uids)

    def _expunge_locked(self, uids: Iterable[int]) -> list[int]:
        removed: list[int] = []
        bases: set[str] = set()
        dirs: set[str] = set()
        for uid in dict.fromkeys(uids):
            for attempt in range(2):
                where = self._where.get(uid)
                if where is None:
                    break
                subdir, name = where
                try:
                    os.unlink(self.path / subdir / name)
                except FileNotFoundError:
                    if attempt == 0:
                        self._sync_locked(move_new=False, force=True)
                    continue
                removed.append(uid)
                bases.add(_base_of(name))
                dirs.add(subdir)
                break
        if not removed:
            return removed
        for subdir in sorted(dirs):
            fsync_directory(self.path / subdir)
        for base in bases:
            self._files.pop(base, None)
        try:
            with self._uidlist_lock() as lock:
                self._read_uidlist_locked()
                if self._uidlist is not None:
                    for base in bases:
                        self._uidlist.records.pop(base, None)
                    self._write_uidlist_locked(lock)
        except FolderError as exc:
            if exc.code != "INUSE":
                raise
            # The files are gone, which is what counts; their records
            # go with a later write.
            _log.warn("{mailbox} is locked; uidlist kept", mailbox=self.name)
        self._rebuild_locked()
        _log.info(
            "expunged {count} messages from {mailbox}",
            count=len(removed),
            mailbox=self.name,
        )
        return removed

    def copy_to(self, uids: Iterable[int], target: Folder) -> list[tuple[int, int]]:
        """Copy messages, flags and keywords kept, into ``target``.

        Returns (source UID, new UID) pairs in the order given; a message
        expunged meanwhile is left out.  The copies are durable on return.
        """
        staged: list[tuple[int, Path, str, frozenset[str]]] = []
        try:
            with self._lock:
                self._check_attached()
                for uid in dict.fromkeys(uids):
                    item = self._stage_copy_locked(uid, target)
                    if item is not None:
                        staged.append(item)
            if not staged:
                return []
            with target._lock:
                new_uids = target._commit_locked(
                    [(path, base, flags) for _, path, base, flags in staged]
                )
        finally:
            for _, path, _, _ in staged:
                unlink_quietly(path)
        _log.info(
            "copied {count} messages from {mailbox} to {target}",
            count=len(new_uids),
            mailbox=self.name,
            target=target.name,
        )
        return [(item[0], new) for item, new in zip(staged, new_uids, strict=True)]

    def move_to(self, uids: Iterable[int], target: Folder) -> list[tuple[int, int]]:
        """Move messages into ``target`` (RFC 6851): copy, then expunge here.

        Both folders stay locked from the copy to the expunge, so two
        sessions moving one message leave one copy, not two.  Returns
        (source UID, new UID) pairs; a message already gone is left out.
        """
        if target is self:
            pairs = self.copy_to(uids, self)
            self.expunge([old for old, _ in pairs])
            return pairs
        # Always the same order, so two moves in opposite directions
        # cannot each hold the lock the other waits for.
        first, second = sorted((self, target), key=lambda f: f._root_text)
        staged: list[tuple[int, Path, str, frozenset[str]]] = []
        try:
            with first._lock, second._lock:
                self._check_attached()
                target._check_attached()
                for uid in dict.fromkeys(uids):
                    item = self._stage_copy_locked(uid, target)
                    if item is not None:
                        staged.append(item)
                if not staged:
                    return []
                new_uids = target._commit_locked(
                    [(path, base, flags) for _, path, base, flags in staged]
                )
                self._expunge_locked([item[0] for item in staged])
        finally:
            for _, path, _, _ in staged:
                unlink_quietly(path)
        _log.info(
            "moved {count} messages from {mailbox} to {target}",
            count=len(new_uids),
            mailbox=self.name,
            target=target.name,
        )
        return [(item[0], new) for item, new in zip(staged, new_uids, strict=True)]

    def open_message(self, uid: int) -> BinaryIO:
        """The message file of ``uid``, opened for reading as stored."""
        with self._lock:
            self._check_attached()
            for attempt in range(2):
                where = self._where.get(uid)
                if where is None:
                    break
                try:
                    return open(os.path.join(self._root_text, *where), "rb")
                except FileNotFoundError:
                    if attempt == 0:
                        self._sync_locked(move_new=False, force=True)
        raise FolderError("The message was expunged.", code="NONEXISTENT")

    def read_message(self, uid: int) -> bytes:
        """The whole message of ``uid`` with CRLF line ends, as IMAP serves it."""
        with self.open_message(uid) as file:
            return _to_crlf(file.read())

    def read_header(self, uid: int) -> bytes:
        """The header section of ``uid``'s message (blank line included), CRLF.

        A message without a blank line is all header.
        """
        with self.open_message(uid) as file:
            return _to_crlf(_read_header(file))

    def message_size(self, uid: int) -> int:
        """The message's size with CRLF line ends (RFC822.SIZE)."""
        entry = self.snapshot.by_uid().get(uid)
        if entry is not None and entry.vsize is not None:
            return entry.vsize
        with self._lock:
            where = self._where.get(uid)
            if where is not None and _base_of(where[1]) in self._vsizes:
                return self._vsizes[_base_of(where[1])]
        with self.open_message(uid) as file:
            _, vsize = _count_vsize(file)
        with self._lock:
            where = self._where.get(uid)
            if where is not None:
                self._vsizes[_base_of(where[1])] = vsize
                self._entries.pop(where[1], None)
        return vsize

    def status(self) -> dict:
        """MESSAGES, RECENT, UIDNEXT, UIDVALIDITY and UNSEEN, for STATUS.

        RECENT counts the messages no session has been shown as recent yet.
        """
        with self._lock:
            snapshot = self._sync_locked(move_new=False)
            recent = len(self._recent.intersection(snapshot.by_uid()))
        unseen = sum(1 for e in snapshot.entries if "\\Seen" not in e.flags)
        return {
            "MESSAGES": len(snapshot.entries),
            "RECENT": recent,
            "UIDNEXT": snapshot.next_uid,
            "UIDVALIDITY": snapshot.uidvalidity,
            "UNSEEN": unseen,
        }

    # -- scanning -----------------------------------------------------------

    def _check_attached(self) -> None:
        if self._detached:
            raise FolderError("The folder was deleted or renamed.", code="NONEXISTENT")

    def _detach(self) -> None:
        with self._lock:
            self._detached = True

    def _dir_stamp(self) -> tuple:
        try:
            cur = os.stat(self.path / "cur").st_mtime_ns
        except FileNotFoundError:
            raise FolderError(
                "The folder no longer exists.", code="NONEXISTENT"
            ) from None
        new = _stat_or_none(self.path / "new")
        uidlist = _stat_or_none(self.path / _UIDLIST)
        # A keyword renamed in dovecot-keywords changes the flags of every
        # file with its letter, though no file changes.
        keywords = _stat_or_none(self.path / _KEYWORDS)
        return (
            cur,
            0 if new is None else new.st_mtime_ns,
            _file_stamp(uidlist),
            _file_stamp(keywords),
        )

    def _sync_locked(self, *, move_new: bool, force: bool = False) -> Snapshot:
        self._check_attached()
        stamp = self._dir_stamp()
        newest = max(
            stamp[0],
            stamp[1],
            stamp[2][2] if stamp[2] else 0,
            stamp[3][2] if stamp[3] else 0,
        )
        pending_new = move_new and any(d == "new" for d, _ in self._files.values())
        if (
            not force
            and stamp == self._stamp
            and self._scanned_at - newest > _MTIME_SLACK_NS
            and not pending_new
        ):
            return self.snapshot
        scanned_at = time.time_ns()

        self._read_uidlist_locked()
        self._read_keywords_locked()
        files = self._scan_locked()
        unrecorded = self._uidlist is None or any(
            base not in self._uidlist.records for base in files
        )
        in_new = move_new and any(d == "new" for d, _ in files.values())
        if unrecorded or in_new:
            try:
                files = self._record_new_locked(move_new=move_new)
            except FolderError as exc:
                if exc.code != "INUSE" or self._uidlist is None:
                    raise
                # Another program holds the folder: show what is recorded,
                # the new messages come with the next sync, which must not
                # skip its scan.
                _log.warn("{mailbox} is locked; new mail waits", mailbox=self.name)
                stamp = None
        self._files = files
        self._stamp = stamp
        self._scanned_at = scanned_at
        self._rebuild_locked()
        return self.snapshot

    def _list(self, subdir: str) -> list[str]:
        try:
            with os.scandir(self.path / subdir) as it:
                return [e.name for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            if subdir == "cur":
                raise FolderError(
                    "The folder no longer exists.", code="NONEXISTENT"
                ) from None
            return []

    def _scan_locked(self) -> dict[str, tuple[str, str]]:
        """Every message file, by base name.

        new/ is read before cur/, so a file another program moves from one
        to the other meanwhile is still seen.  A recorded file that seems
        gone is looked for once more: a rename while a directory is read
        can hide a file from that reading.
        """
        files: dict[str, tuple[str, str]] = {}
        for _ in range(2):
            for subdir in ("new", "cur"):
                for name in self._list(subdir):
                    files[_base_of(name)] = (subdir, name)
            records = self._uidlist.records if self._uidlist else {}
            if all(base in files for base in self._files if base in records):
                break
        return files

    def _record_new_locked(self, *, move_new: bool) -> dict[str, tuple[str, str]]:
        """Give UIDs to unrecorded files (and move new/ to cur/), under the lock."""
        with self._uidlist_lock() as lock:
            self._read_uidlist_locked()
            files = self._scan_locked()
            uidlist = self._uidlist
            created = uidlist is None
            if created:
                uidlist = self._uidlist = _Uidlist(
                    self._new_uidvalidity(), 1, os.urandom(16).hex()
                )
            fresh = sorted(
                (base for base in files if base not in uidlist.records), key=_sort_key
            )
            for base in fresh:
                uid = uidlist.next_uid
                uidlist.records[base] = _Record(uid, base, [])
                uidlist.next_uid += 1
                self._mark_recent(uid)
            moved = False
            if move_new:
                for base, (subdir, name) in list(files.items()):
                    if subdir != "new":
                        continue
                    target = name if ":" in name else name + ":2,"
                    try:
                        os.rename(self.path / "new" / name, self.path / "cur" / target)
                    except FileNotFoundError:
                        continue  # moved by another program: seen next time
                    files[base] = ("cur", target)
                    moved = True
                    self._mark_recent(uidlist.records[base].uid)
            if moved:
                fsync_directory(self.path / "cur")
                fsync_directory(self.path / "new")
            if fresh or created:
                # Records whose files are gone go: their UIDs stay used.
                for base in [b for b in uidlist.records if b not in files]:
                    del uidlist.records[base]
                self._write_uidlist_locked(lock)
        return files

    def _mark_recent(self, uid: int) -> None:
        if uid not in self._recent_known:
            self._recent_known.add(uid)
            self._recent.add(uid)

    def _rebuild_locked(self) -> None:
        """Make the snapshot from the files and records in memory."""
        uidlist = self._uidlist
        records = uidlist.records if uidlist else {}
        entries: list[Entry] = []
        where: dict[int, tuple[str, str]] = {}
        cache: dict[str, Entry] = {}
        mtimes: dict[str, float] = {}
        for base, (subdir, name) in self._files.items():
            record = records.get(base)
            if record is None:
                continue
            entry = self._entries.get(name)
            if entry is None or entry.uid != record.uid:
                mtime = self._mtimes.get(base)
                if mtime is None:
                    st = _stat_or_none(self.path / subdir / name)
                    if st is None:
                        continue
                    mtime = st.st_mtime
                entry = Entry(
                    record.uid,
                    name,
                    self._flags_of(name),
                    mtime,
                    self._known_vsize(base, name, record),
                )
            cache[name] = entry
            mtimes[base] = entry.internaldate
            entries.append(entry)
            where[record.uid] = (subdir, name)
        entries.sort(key=lambda e: e.uid)
        self._entries = cache
        self._mtimes = mtimes
        self._vsizes = {b: v for b, v in self._vsizes.items() if b in mtimes}
        self._where = where
        self.snapshot = Snapshot(
            uidlist.uidvalidity if uidlist else 0,
            uidlist.next_uid if uidlist else 1,
            tuple(entries),
        )

    def _known_vsize(self, base: str, name: str, record: _Record) -> int | None:
        vsize = _size_field(name, "W")
        if vsize is None:
            ext = record.extension("W")
            if ext is not None and ext.isdigit():
                vsize = int(ext)
        if vsize is None:
            vsize = self._vsizes.get(base)
        return vsize

    # -- flags and keywords -------------------------------------------------

    def _flags_of(self, name: str) -> frozenset[str]:
        _, letters, _ = _split_info(name)
        flags = set()
        for letter in letters:
            if letter in _LETTER_FLAGS:
                flags.add(_LETTER_FLAGS[letter])
            elif "a" <= letter <= "z":
                index = ord(letter) - ord("a")
                if index < len(self._keywords) and self._keywords[index]:
                    flags.add(self._keywords[index])
        return frozenset(flags)

    def _keyword_index(self, keyword: str) -> int | None:
        # Dovecot compares keywords without regard to case.
        wanted = keyword.lower()
        for index, name in enumerate(self._keywords):
            if name is not None and name.lower() == wanted:
                return index
        return None

    def _flagged_name(self, name: str, flags: Iterable[str]) -> str:
        """``name`` with exactly ``flags``; letters this code does not know kept."""
        prefix, old_letters, tail = _split_info(name)
        letters = set()
        for letter in old_letters:
            if letter in _LETTER_FLAGS:
                continue
            if "a" <= letter <= "z":
                index = ord(letter) - ord("a")
                if index < len(self._keywords) and self._keywords[index]:
                    continue
            letters.add(letter)
        for flag in flags:
            if flag.startswith("\\"):
                system = _SYSTEM_BY_UPPER.get(flag.upper())
                if system is not None:
                    letters.add(_FLAG_LETTERS[system])
                continue
            index = self._keyword_index(flag)
            if index is not None:
                letters.add(chr(ord("a") + index))
        return f"{prefix}:2,{''.join(sorted(letters))}{tail}"

    def _read_keywords_locked(self) -> None:
        path = self.path / _KEYWORDS
        try:
            with open(path, "rb") as file:
                stamp = _file_stamp(os.fstat(file.fileno()))
                if stamp == self._keywords_stamp:
                    return
                data = file.read()
        except FileNotFoundError:
            stamp, data = None, b""
            if self._keywords_stamp is None and not self._keywords:
                return
        keywords: list[str | None] = [None] * _MAX_KEYWORDS
        for line in data.decode("utf-8", "replace").split("\n"):
            index, _, name = line.partition(" ")
            if index.isdigit() and int(index) < _MAX_KEYWORDS and name:
                keywords[int(index)] = name
        while keywords and keywords[-1] is None:
            keywords.pop()
        if keywords != self._keywords:
            self._entries.clear()
        self._keywords = keywords
        self._keywords_stamp = stamp

    def _ensure_keywords_locked(self, flags: Iterable[str]) -> None:
        """Give every keyword in ``flags`` a letter, durably; LIMIT if full."""
        self._read_keywords_locked()
        wanted = [f for f in flags if not f.startswith("\\")]
        for keyword in wanted:
            if (
                not keyword
                or any(c in keyword for c in " \t\r\n\x00")
                or (not keyword.isascii())
            ):
                raise FolderError(f"Invalid keyword {keyword[:40]!r}.", code="CANNOT")
        if all(self._keyword_index(k) is not None for k in wanted):
            return
        # Dovecot changes dovecot-keywords only while it holds the uidlist lock.
        with self._uidlist_lock():
            self._read_keywords_locked()
            keywords = list(self._keywords)
            added = False
            for keyword in sorted(set(wanted)):
                if self._keyword_index(keyword) is not None:
                    continue
                if keyword.lower() in {k.lower() for k in keywords if k}:
                    continue
                try:
                    slot = keywords.index(None)
                except ValueError:
                    if len(keywords) >= _MAX_KEYWORDS:
                        raise FolderError(
                            f"A folder can hold at most {_MAX_KEYWORDS} keywords.",
                            code="LIMIT",
                        ) from None
                    keywords.append(None)
                    slot = len(keywords) - 1
                keywords[slot] = keyword
                added = True
            if added:
                self._write_keywords_locked(keywords)

    def _write_keywords_locked(self, keywords: list[str | None]) -> None:
        path = self.path / _KEYWORDS
        data = "".join(f"{i} {name}\n" for i, name in enumerate(keywords) if name)
        old = _stat_or_none(path)
        lock = path.with_name(_KEYWORDS + ".lock")
        # Dovecot does the same: this lock is only ever taken under the
        # uidlist lock, which we hold, so a leftover one is stale.
        unlink_quietly(lock)
        with create_private(lock) as file:
            file.write(data.encode("utf-8"))
            file.flush()
            # Dovecot notices a change by the mtime in whole seconds only.
            st = os.fstat(file.fileno())
            if old is not None and int(st.st_mtime) <= int(old.st_mtime):
                bumped = int(old.st_mtime) + 1
                os.utime(file.fileno(), (bumped, bumped))
            os.fsync(file.fileno())
            stamp = _file_stamp(os.fstat(file.fileno()))
        os.rename(lock, path)
        fsync_directory(self.path)
        self._keywords = list(keywords)
        self._keywords_stamp = stamp
        self._entries.clear()

    # -- the uidlist --------------------------------------------------------

    def _uidlist_lock(self) -> _DotLock:
        return _DotLock(self.path / _UIDLIST, stale_after=_UIDLIST_STALE)

    def _read_uidlist_locked(self) -> None:
        """Read dovecot-uidlist if it changed since we last read or wrote it."""
        path = self.path / _UIDLIST
        try:
            with open(path, "rb") as file:
                stamp = _file_stamp(os.fstat(file.fileno()))
                if stamp == self._uidlist_stamp and self._uidlist is not None:
                    return
                data = file.read()
        except FileNotFoundError:
            if self._uidlist is not None:
                _log.warn("{mailbox} lost its uidlist: new UIDs", mailbox=self.name)
            self._uidlist = None
            self._uidlist_stamp = None
            return
        uidlist = _Uidlist.parse(data)
        if uidlist is None:
            _log.warn("{mailbox} has a broken uidlist: new UIDs", mailbox=self.name)
        elif self._uidlist is not None:
            if uidlist.uidvalidity != self._uidlist.uidvalidity:
                _log.warn(
                    "{mailbox} changed UIDVALIDITY to {uidvalidity}",
                    mailbox=self.name,
                    uidvalidity=uidlist.uidvalidity,
                )
            else:
                # UIDs are never given twice, whatever the file says.
                uidlist.next_uid = max(uidlist.next_uid, self._uidlist.next_uid)
        self._uidlist = uidlist
        self._uidlist_stamp = stamp

    def _write_uidlist_locked(self, lock: _DotLock) -> None:
        uidlist = self._uidlist
        assert uidlist is not None
        if not uidlist.guid:
            uidlist.guid = os.urandom(16).hex()
        # Sizes we had to count are kept for Dovecot and for next time.
        for base, vsize in self._vsizes.items():
            record = uidlist.records.get(base)
            if record is not None and record.extension("W") is None:
                record.set_extension("W", str(vsize))
        st = lock.replace(uidlist.serialize())
        self._uidlist_stamp = _file_stamp(st)

    # -- adding messages ----------------------------------------------------

    def _stage_copy_locked(
        self, uid: int, target: Folder
    ) -> tuple[int, Path, str, frozenset[str]] | None:
        """Link ``uid``'s file into ``target``'s tmp/ under a new base name."""
        for attempt in range(2):
            where = self._where.get(uid)
            if where is None:
                return None
            subdir, name = where
            source = self.path / subdir / name
            entry = self.snapshot.by_uid().get(uid)
            try:
                st = os.stat(source)
                size = _size_field(name, "S") or st.st_size
                vsize = entry.vsize if entry is not None else None
                if vsize is None:
                    vsize = self._vsizes.get(_base_of(name))
                if vsize is None:
                    with open(source, "rb") as file:
                        size, vsize = _count_vsize(file)
                base = f"{maildir_name()},S={size},W={vsize}"
                staged = target.tmp_path().with_name(base)
                link_or_copy(source, staged, mtime=st.st_mtime)
            except FileNotFoundError:
                if attempt == 0:
                    self._sync_locked(move_new=False, force=True)
                continue
            flags = entry.flags if entry is not None else self._flags_of(name)
            return uid, staged, base, flags
        return None

    def _commit_locked(
        self, items: list[tuple[Path, str, frozenset[str]]]
    ) -> list[int]:
        """Link staged files into cur/ and give them UIDs; the UIDs, in order.

        ``items`` are (file in tmp/, new base name, IMAP flags).  The links
        are fsynced before the uidlist records them, and the uidlist is
        durable before this returns.
        """
        self._check_attached()
        # The uidlist as the last scan (or our last write) left it: if it
        # differs under the lock, another program recorded messages we have
        # not scanned.
        known_stamp = self._uidlist_stamp
        known = self._uidlist is not None
        self._ensure_keywords_locked({f for _, _, flags in items for f in flags})
        linked: list[Path] = []
        try:
            with self._uidlist_lock() as lock:
                self._read_uidlist_locked()
                changed_elsewhere = not known or self._uidlist_stamp != known_stamp
                uidlist = self._uidlist
                if uidlist is None:
                    uidlist = self._uidlist = _Uidlist(
                        self._new_uidvalidity(), 1, os.urandom(16).hex()
                    )
                names = []
                for path, base, flags in items:
                    name = self._flagged_name(base, flags)
                    try:
                        os.link(path, self.path / "cur" / name)
                    except FileNotFoundError:
                        # The folder was deleted or renamed meanwhile.
                        raise FolderError(
                            "The folder no longer exists.", code="NONEXISTENT"
                        ) from None
                    linked.append(self.path / "cur" / name)
                    names.append((base, name))
                fsync_directory(self.path / "cur")
                uids = []
                for base, _ in names:
                    uid = uidlist.next_uid
                    uidlist.next_uid += 1
                    uidlist.records[base] = _Record(uid, base, [])
                    uids.append(uid)
                self._write_uidlist_locked(lock)
        except BaseException:
            for path in linked:
                unlink_quietly(path)
            raise
        for (base, name), uid in zip(names, uids, strict=True):
            self._files[base] = ("cur", name)
            self._mark_recent(uid)
        if changed_elsewhere:
            # Another program gave UIDs too: rescan so that no snapshot
            # shows ours without theirs below them.
            self._sync_locked(move_new=False, force=True)
        else:
            self._rebuild_locked()
        return uids


# -- the user's mail -------------------------------------------------------------

# Folder creation, removal and renaming in this process, one at a time.
_structure_lock = threading.RLock()
# The highest UIDVALIDITY handed out per (root, folder name) in this process.
_handed_out: dict[tuple[str, str], int] = {}
_uidvalidity_lock = threading.Lock()


class UserMail:
    """All folders and subscriptions of one user, in the Maildir at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- the tree -----------------------------------------------------------

    def prepare(self) -> None:
        """Make sure the Maildir exists, with Sent, Drafts, Trash and Junk.

        Safe to call at every login.  A special folder is subscribed when
        this creates it, INBOX on the first call (the MX may have made the
        Maildir before: no subscriptions file yet is what tells).
        """
        with _structure_lock:
            fresh = not (self.root / _SUBSCRIPTIONS).exists()
            self._ensure_root()
            if fresh:
                self._set_subscribed("INBOX", True)
            clean_tmp(self.root / "tmp")
            for name in SPECIAL_USE:
                if self._path(name).is_dir():
                    continue
                try:
                    self._create_locked(name)
                except FolderError as exc:
                    if exc.code != "ALREADYEXISTS":
                        raise
                    continue
                self._set_subscribed(name, True)

    def _ensure_root(self) -> None:
        for folder in ensure_maildir(self.root):
            fsync_directory(folder)

    def _path(self, name: str) -> Path:
        return self.root if name == "INBOX" else self.root / (SEPARATOR + name)

    def canonical(self, name: str) -> str:
        """``name`` as stored ("INBOX" for any spelling of it), or FolderError."""
        return _check_name(name)

    def folder_names(self) -> list[str]:
        """ "INBOX", then every other folder, sorted."""
        names = []
        try:
            with os.scandir(self.root) as it:
                for item in it:
                    if not item.name.startswith(SEPARATOR) or not item.is_dir():
                        continue
                    name = item.name[1:]
                    try:
                        if _check_name(name) != name or name == "INBOX":
                            continue
                    except FolderError:
                        continue
                    names.append(name)
        except FileNotFoundError:
            pass
        return ["INBOX", *sorted(names)]

    def exists(self, name: str) -> bool:
        """Whether folder ``name`` exists (INBOX always does)."""
        name = _check_name(name)
        return name == "INBOX" or self._path(name).is_dir()

    def create(self, name: str) -> None:
        """Create the folder ``name`` (not its parents: Maildir++ needs none)."""
        name = _check_name(name)
        with _structure_lock:
            self._create_locked(name)

    def _create_locked(self, name: str) -> None:
        if name == "INBOX" or self._path(name).exists():
            raise FolderError("The folder already exists.", code="ALREADYEXISTS")
        self._ensure_root()
        # Built in tmp/ and renamed into place, so that no one (Dovecot
        # neither) sees a folder without its cur/ or uidlist.
        stage = self.root / "tmp" / f"folder.{maildir_name()}"
        os.mkdir(stage, 0o700)
        try:
            for sub in ("cur", "new", "tmp"):
                os.mkdir(stage / sub, 0o700)
            with create_private(stage / "maildirfolder"):
                pass
            uidlist = _Uidlist(self._new_uidvalidity(name), 1, os.urandom(16).hex())
            with create_private(stage / _UIDLIST) as file:
                file.write(uidlist.serialize())
                file.flush()
                os.fsync(file.fileno())
            fsync_directory(stage)
            try:
                os.rename(stage, self._path(name))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FolderError(
                        "The folder already exists.", code="ALREADYEXISTS"
                    ) from None
                raise
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        fsync_directory(self.root)
        _log.info(
            "created folder {mailbox} in {root}", mailbox=name, root=str(self.root)
        )

    def delete(self, name: str) -> None:
        """Remove the folder ``name`` and its messages; its subfolders stay.

        Subscriptions are kept, as RFC 3501 section 6.3.4 wants.
        """
        name = _check_name(name)
        if name == "INBOX":
            raise FolderError("INBOX cannot be deleted.", code="CANNOT")
        with _structure_lock:
            path = self._path(name)
            if not path.is_dir():
                raise FolderError("The folder does not exist.", code="NONEXISTENT")
            self._remember_uidvalidity(name, path)
            trash = self.root / _TRASH_DIR
            if trash.exists():
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                raise FolderError(
                    "The folder does not exist.", code="NONEXISTENT"
                ) from None
            fsync_directory(self.root)
            _detach(path)
            shutil.rmtree(trash, ignore_errors=True)
        _log.info(
            "deleted folder {mailbox} in {root}", mailbox=name, root=str(self.root)
        )

    def rename(self, old: str, new: str) -> None:
        """Rename ``old`` and its subfolders to ``new``, UIDs kept.

        Renaming INBOX moves its messages into a new folder ``new`` (with a
        UIDVALIDITY of its own) and leaves INBOX empty, as RFC 3501 section
        6.3.5 says; INBOX's subfolders stay.
        """
        old = _check_name(old)
        new = _check_name(new)
        if new == "INBOX" or old == new:
            raise FolderError("The target folder already exists.", code="ALREADYEXISTS")
        with _structure_lock:
            if old == "INBOX":
                self._rename_inbox(new)
                return
            if new.startswith(old + SEPARATOR):
                raise FolderError(
                    "A folder cannot be moved into itself.", code="CANNOT"
                )
            sources = [
                n
                for n in self.folder_names()
                if n == old or n.startswith(old + SEPARATOR)
            ]
            if not sources:
                raise FolderError("The folder does not exist.", code="NONEXISTENT")
            targets = [_check_name(new + n[len(old) :]) for n in sources]
            for target in targets:
                if self._path(target).exists():
                    raise FolderError(
                        "The target folder already exists.", code="ALREADYEXISTS"
                    )
            for source, target in zip(sources, targets, strict=True):
                os.rename(self._path(source), self._path(target))
                _detach(self._path(source))
            fsync_directory(self.root)
        _log.info(
            "renamed folder {mailbox} to {target} in {root}",
            mailbox=old,
            target=new,
            root=str(self.root),
        )

    def _rename_inbox(self, new: str) -> None:
        self._create_locked(new)
        inbox = self.folder("INBOX")
        target = self.folder(new)
        snapshot = inbox.sync(move_new=True)
        uids = [entry.uid for entry in snapshot.entries]
        if uids:
            inbox.copy_to(uids, target)
            inbox.expunge(uids)
        _log.info(
            "moved INBOX of {root} to {mailbox}", root=str(self.root), mailbox=new
        )

    def folder(self, name: str, *, readonly: bool = False) -> Folder:
        """The folder ``name``, shared with every other user of it in this process.

        Its first look at the disk never moves new/ to cur/ (an EXAMINE must
        not); ``sync(move_new=...)`` decides that.  ``readonly`` is accepted
        for symmetry with EXAMINE and changes nothing more.
        """
        name = _check_name(name)
        path = self._path(name)
        if name == "INBOX":
            self._ensure_root()
        elif not path.is_dir():
            raise FolderError("The folder does not exist.", code="NONEXISTENT")
        key = os.path.realpath(path)
        with _registry_lock:
            folder = _registry.get(key)
            fresh = folder is None or folder._detached
            if fresh:
                folder = Folder(name, path, lambda: self._new_uidvalidity(name))
                _registry[key] = folder
            _kept[key] = folder
            _kept.move_to_end(key)
            while len(_kept) > _KEEP_RECENT:
                _kept.popitem(last=False)
        if fresh:
            folder.sync(move_new=False)
        return folder

    # -- UIDVALIDITY --------------------------------------------------------

    def _new_uidvalidity(self, name: str) -> int:
        """A UIDVALIDITY for a new folder ``name``.

        The current time, but above any this process gave that name before
        and above Dovecot's counter in ``dovecot-uidvalidity``, which is
        then advanced so that Dovecot's next folder gets a higher one still.
        """
        with _uidvalidity_lock:
            key = (os.path.realpath(self.root), name)
            value = max(int(time.time()), _handed_out.get(key, 0) + 1)
            value = self._advance_dovecot_counter(value)
            _handed_out[key] = value
            return value

    def _remember_uidvalidity(self, name: str, path: Path) -> None:
        try:
            uidlist = _Uidlist.parse((path / _UIDLIST).read_bytes())
        except OSError:
            return
        if uidlist is not None:
            with _uidvalidity_lock:
                key = (os.path.realpath(self.root), name)
                _handed_out[key] = max(_handed_out.get(key, 0), uidlist.uidvalidity)

    def _advance_dovecot_counter(self, value: int) -> int:
        # Dovecot keeps its last UIDVALIDITY as 8 hex digits in
        # dovecot-uidvalidity and in the name of an empty marker file
        # dovecot-uidvalidity.<hex>, which it renames to claim the next one.
        prefix = _UIDVALIDITY + "."
        markers = []
        try:
            for item in os.listdir(self.root):
                if item.startswith(prefix) and re.fullmatch(
                    r"[0-9a-f]{1,8}", item[len(prefix) :]
                ):
                    markers.append(int(item[len(prefix) :], 16))
        except FileNotFoundError:
            return value
        try:
            text = (self.root / _UIDVALIDITY).read_text("ascii").strip()
            current = int(text, 16) if re.fullmatch(r"[0-9a-f]{8}", text) else 0
        except (OSError, UnicodeError):
            current = 0
        last = max([current, *markers])
        value = max(value, last + 1)
        if markers:
            try:
                os.rename(
                    self.root / f"{prefix}{max(markers):08x}",
                    self.root / f"{prefix}{value:08x}",
                )
            except FileNotFoundError:
                pass
        else:
            try:
                os.close(
                    os.open(
                        self.root / f"{prefix}{value:08x}",
                        os.O_CREAT | os.O_EXCL,
                        0o400,
                    )
                )
            except FileExistsError:
                pass
        fd = os.open(
            self.root / _UIDVALIDITY, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            os.pwrite(fd, f"{value:08x}".encode(), 0)
            os.ftruncate(fd, 8)
        finally:
            os.close(fd)
        return value

    # -- subscriptions ------------------------------------------------------

    def subscriptions(self) -> list[str]:
        """The subscribed names, in the order they were subscribed."""
        return _read_subscriptions(self.root / _SUBSCRIPTIONS)

    def subscribe(self, name: str) -> None:
        """Subscribe to ``name`` (it need not exist)."""
        self._set_subscribed(_check_name(name), True)

    def unsubscribe(self, name: str) -> None:
        """Drop ``name`` from the subscriptions."""
        self._set_subscribed(_check_name(name), False)

    def _set_subscribed(self, name: str, subscribed: bool) -> None:
        path = self.root / _SUBSCRIPTIONS
        self._ensure_root()
        with _DotLock(path, stale_after=_SUBSCRIPTIONS_STALE) as lock:
            names = _read_subscriptions(path)
            if (name in names) == subscribed:
                return
            if subscribed:
                names.append(name)
            else:
                names = [n for n in names if n != name]
            lock.replace(_serialize_subscriptions(names))


def _detach(path: Path) -> None:
    """Retire the shared Folder object of ``path``: it was deleted or renamed."""
    with _registry_lock:
        folder = _registry.pop(os.path.realpath(path), None)
    if folder is not None:
        folder._detach()


def _tab_unescape(text: str) -> str:
    # Dovecot's tab escaping: \001 followed by 1, t, r or n.
    out = []
    chars = iter(text)
    for char in chars:
        if char == "\x01":
            following = next(chars, "")
            out.append(
                {"1": "\x01", "t": "\t", "r": "\r", "n": "\n"}.get(following, following)
            )
        else:
            out.append(char)
    return "".join(out)


def _read_subscriptions(path: Path) -> list[str]:
    """Both of Dovecot's formats: version 2 (levels split by tabs) and 1."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    version2 = data.startswith(_SUBSCRIPTIONS_V2)
    if version2:
        data = data[len(_SUBSCRIPTIONS_V2) :]
    names: list[str] = []
    for line in data.decode("utf-8", "replace").split("\n"):
        if not line:
            continue
        if version2:
            line = SEPARATOR.join(_tab_unescape(part) for part in line.split("\t"))
        if line.upper() == "INBOX":
            line = "INBOX"
        if line not in names:
            names.append(line)
    return names


def _serialize_subscriptions(names: list[str]) -> bytes:
    # What Dovecot 2.3 writes: the version 2 header, then one name a line
    # with its levels separated by tabs.
    lines = ["\t".join(name.split(SEPARATOR)) + "\n" for name in names]
    return _SUBSCRIPTIONS_V2 + "".join(lines).encode("utf-8")
