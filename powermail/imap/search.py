"""SEARCH (RFC 3501 6.4.4): which messages match a list of search keys.

Runs in a worker thread.  Keys on flags, numbers, dates and sizes use the
snapshot alone; a message file is read only when a key looks at content,
and then once for all the keys.  Strings are compared case-insensitively on
decoded text: the client's charset is decoded by the parser, the message's
encoded words, transfer encodings and charsets by ``imap.message``.
"""

from __future__ import annotations

from calendar import timegm

from powermail.imap.message import Message
from powermail.imap.parser import SearchKey
from powermail.imap.selected import SelectedMailbox
from powermail.storage.maildirpp import Entry, FolderError

__all__ = ["needs_body", "search"]

_BODY_KEYS = {"BODY", "TEXT"}
_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_DAY = 86400


def needs_body(keys: list[SearchKey]) -> bool:
    """Whether a key looks past the header section."""
    return any(k.name in _BODY_KEYS or needs_body(k.keys) for k in keys)


class _Candidate:
    """One message under test; its content is read at most once."""

    __slots__ = ("_message", "entry", "seq", "view", "whole")

    def __init__(
        self, view: SelectedMailbox, entry: Entry, seq: int, *, whole: bool
    ) -> None:
        self.view = view
        self.entry = entry
        self.seq = seq
        self.whole = whole
        self._message: Message | None = None

    @property
    def message(self) -> Message:
        """The message, or only its header section when no key needs more."""
        if self._message is None:
            folder = self.view.folder
            uid = self.entry.uid
            data = folder.read_message(uid) if self.whole else folder.read_header(uid)
            self._message = Message(data)
        return self._message

    def size(self) -> int:
        if self._message is not None and self.whole:
            return self._message.size
        return self.view.folder.message_size(self.entry.uid)


def search(view: SelectedMailbox, keys: list[SearchKey]) -> list[tuple[int, int]]:
    """(message number, UID) of every message matching all ``keys``.

    A message removed from the disk meanwhile does not match.
    """
    found = []
    snapshot = view.snapshot.by_uid()
    largest_uid = view.uids[-1] if view.uids else 0
    whole = needs_body(keys)
    for seq, uid in enumerate(view.uids, start=1):
        entry = snapshot.get(uid)
        if entry is None:
            continue
        candidate = _Candidate(view, entry, seq, whole=whole)
        try:
            if all(_matches(candidate, k, len(view.uids), largest_uid) for k in keys):
                found.append((seq, uid))
        except FolderError:
            continue
    return found


def _matches(c: _Candidate, key: SearchKey, count: int, largest_uid: int) -> bool:
    name = key.name
    entry = c.entry
    if name == "ALL":
        return True
    if name in _FLAG_KEYS:
        flag, wanted = _FLAG_KEYS[name]
        return (flag in entry.flags) == wanted
    if name == "RECENT":
        return c.view.is_recent(entry.uid)
    if name == "NEW":
        return c.view.is_recent(entry.uid) and "\\Seen" not in entry.flags
    if name == "OLD":
        return not c.view.is_recent(entry.uid)
    if name == "KEYWORD":
        return _has_flag(entry.flags, key.args[0])
    if name == "UNKEYWORD":
        return not _has_flag(entry.flags, key.args[0])
    if name == "SEQUENCE":
        return key.args[0].contains(c.seq, count)
    if name == "UID":
        return key.args[0].contains(entry.uid, largest_uid)
    if name == "LARGER":
        return c.size() > key.args[0]
    if name == "SMALLER":
        return c.size() < key.args[0]
    if name in ("BEFORE", "ON", "SINCE"):
        return _compare_day(_day_of(entry.internaldate), key.args[0], name)
    if name in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        sent = c.message.sent_date()
        if sent is None:
            return False
        return _compare_day(float(timegm(sent.timetuple())), key.args[0], name[4:])
    if name in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return c.message.header_contains(name, key.args[0])
    if name == "HEADER":
        field_name, needle = key.args
        return c.message.header_contains(field_name, needle)
    if name == "BODY":
        return c.message.body_contains(key.args[0])
    if name == "TEXT":
        return c.message.text_contains(key.args[0])
    if name == "NOT":
        return not _matches(c, key.keys[0], count, largest_uid)
    if name == "OR":
        return any(_matches(c, k, count, largest_uid) for k in key.keys)
    if name == "AND":
        return all(_matches(c, k, count, largest_uid) for k in key.keys)
    raise AssertionError(f"search key {name} not handled")


def _has_flag(flags: frozenset[str], wanted: str) -> bool:
    folded = wanted.casefold()
    return any(f.casefold() == folded for f in flags)


def _day_floor(stamp: float) -> float:
    return stamp - stamp % _DAY


def _day_of(stamp: float) -> float:
    # INTERNALDATE is shown in UTC, so its day is the UTC day.
    return _day_floor(stamp)


def _compare_day(day: float, wanted: float, how: str) -> bool:
    if how == "BEFORE":
        return day < wanted
    if how == "ON":
        return day == wanted
    return day >= wanted
