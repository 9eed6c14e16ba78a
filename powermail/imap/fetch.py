"""The data of FETCH responses (RFC 3501 7.4.2), one message at a time.

Runs in a worker thread: it reads the message file.  A message is read only
when an item needs its content; UID, FLAGS and INTERNALDATE come from the
folder's snapshot, RFC822.SIZE from the size the file name records.
"""

from __future__ import annotations

import time

from powermail.imap.message import Message, partial
from powermail.imap.parser import FetchItem
from powermail.imap.selected import format_flags
from powermail.storage.maildirpp import Entry, Folder

__all__ = [
    "ResponseTooLargeError",
    "fetch_response",
    "sets_seen",
    "internal_date",
    "needs_content",
]

SECTIONS_BUDGET = 1024 * 1024


class ResponseTooLargeError(Exception):
    """The sections asked of one message add up to far more than it."""


_WITHOUT_CONTENT = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"}
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def sets_seen(item: FetchItem) -> bool:
    """Whether fetching ``item`` sets \\Seen (RFC 3501 6.4.5)."""
    if item.name == "BODY[]":
        return not item.peek
    return item.name in ("RFC822", "RFC822.TEXT")


def needs_content(items: list[FetchItem]) -> bool:
    return any(item.name not in _WITHOUT_CONTENT for item in items)


def _header_only(item: FetchItem) -> bool:
    if item.name in ("ENVELOPE", "RFC822.HEADER"):
        return True
    return item.name == "BODY[]" and not item.part and item.kind.startswith("HEADER")


def needs_body(items: list[FetchItem]) -> bool:
    """Whether an item needs more of the message than its header section."""
    return any(
        item.name not in _WITHOUT_CONTENT and not _header_only(item) for item in items
    )


def internal_date(stamp: float) -> str:
    """``"17-Jul-1996 02:44:25 +0000"``, the INTERNALDATE form, in UTC."""
    t = time.gmtime(stamp)
    return (
        f'"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} '
        f'{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"'
    )


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n%s" % (len(data), data)


def fetch_response(
    folder: Folder,
    entry: Entry,
    seq: int,
    items: list[FetchItem],
    *,
    recent: bool,
    with_uid: bool,
    with_flags: bool,
) -> bytes:
    """The whole ``* seq FETCH (...)`` line for one message.

    ``with_uid`` puts UID first (UID FETCH), ``with_flags`` adds FLAGS when
    this fetch has just set \\Seen.  Raises FolderError if the message has
    gone from the disk.
    """
    message: Message | None = None
    whole = False
    if needs_body(items):
        message = Message(folder.read_message(entry.uid))
        whole = True
    elif needs_content(items):
        # Headers only (a client listing a folder): the body is not read.
        message = Message(folder.read_header(entry.uid))
    parts: list[bytes] = []
    names = {item.name for item in items}
    # The response is made in memory: its sections may add up to twice the
    # message (BODY[] with BODY[TEXT], say) and a megabyte more.
    budget = 2 * message.size + SECTIONS_BUDGET if message is not None else None
    total = 0
    if with_uid and "UID" not in names:
        parts.append(b"UID %d" % entry.uid)
    for item in items:
        part = _item(folder, entry, item, message, recent, whole)
        total += len(part)
        if budget is not None and total > budget:
            raise ResponseTooLargeError(entry.uid)
        parts.append(part)
    if with_flags and "FLAGS" not in names:
        parts.append(b"FLAGS " + format_flags(entry.flags, recent=recent).encode())
    return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))


def _item(
    folder: Folder,
    entry: Entry,
    item: FetchItem,
    message: Message | None,
    recent: bool,
    whole: bool,
) -> bytes:
    name = item.name
    if name == "UID":
        return b"UID %d" % entry.uid
    if name == "FLAGS":
        return b"FLAGS " + format_flags(entry.flags, recent=recent).encode()
    if name == "INTERNALDATE":
        return b"INTERNALDATE " + internal_date(entry.internaldate).encode()
    if name == "RFC822.SIZE":
        size = message.size if whole else folder.message_size(entry.uid)
        return b"RFC822.SIZE %d" % size
    assert message is not None
    if name == "ENVELOPE":
        return b"ENVELOPE " + message.envelope()
    if name == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + message.bodystructure(extended=True)
    if name == "BODY":
        return b"BODY " + message.bodystructure(extended=False)
    if name == "RFC822":
        return b"RFC822 " + _literal(message.section((), ""))
    if name == "RFC822.HEADER":
        return b"RFC822.HEADER " + _literal(message.section((), "HEADER"))
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT " + _literal(message.section((), "TEXT"))
    data = message.section(item.part, item.kind, item.fields)
    if item.partial is not None:
        data = partial(data, item.partial[0], item.partial[1])
    return item.label.encode() + b" " + _literal(data)
