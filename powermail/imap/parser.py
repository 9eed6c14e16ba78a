"""The grammar of IMAP4rev1 commands (RFC 3501 section 9), read on demand.

A command arrives as its text, with each literal taken out and replaced by a
NUL byte (a NUL is never valid in command text, so it cannot be forged), plus
the literals in order.  Each command handler reads its own arguments with a
:class:`Cursor`, so the grammar that applies is always the command's own: a
fetch attribute may hold spaces inside its brackets, a search key nests.
Every syntax error raises :class:`ParseError`, which becomes a tagged BAD.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from calendar import timegm
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from powermail.storage.files import unlink_quietly

__all__ = [
    "Cursor",
    "FetchItem",
    "Literal",
    "ParseError",
    "SearchKey",
    "SequenceSet",
    "LITERAL_MARK",
]

LITERAL_MARK = 0  # the NUL byte that stands for a literal in command text

# RFC 3501 ATOM-CHAR: any CHAR except atom-specials.
_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0x00, 0x20)) | {0x7F}
_ATOM_CHARS = bytes(c for c in range(0x01, 0x80) if c not in _ATOM_SPECIALS)
_ASTRING_CHARS = _ATOM_CHARS + b"]"
_LIST_CHARS = _ATOM_CHARS + b"]%*"
_TAG_CHARS = bytes(c for c in _ASTRING_CHARS if c != ord("+"))

_MONTHS = {
    name: number
    for number, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun"]
        + ["jul", "aug", "sep", "oct", "nov", "dec"],
        start=1,
    )
}
_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
_DATE_TIME = re.compile(
    rb'"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"'
)


class ParseError(Exception):
    """Bad syntax; ``str()`` is the text of the BAD reply."""


@dataclass
class Literal:
    """A literal's octets: in memory, or spooled to a file when large.

    A spooled literal (a large APPEND) is finished in a worker thread with
    ``finish_blocking``; ``discard`` removes whatever file is left.
    """

    size: int
    data: bytes | None = None
    spool: Any = None

    def bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        raise ParseError("Literal too large here")

    def finish_blocking(self) -> Path:
        """Write out and fsync a spooled literal; its path."""
        return self.spool.finish_blocking()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()
            unlink_quietly(self.spool.path)


@dataclass(frozen=True)
class SequenceSet:
    """A sequence set: ranges of numbers, ``None`` standing for ``*``."""

    ranges: tuple[tuple[int | None, int | None], ...]
    _resolved: dict = field(default_factory=dict, compare=False, repr=False)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """The ranges with ``*`` as ``largest``, low to high, merged.

        However many ranges a client sends, the result has no overlaps, so
        what is done for each range is done once per number at most.
        """
        cached = self._resolved.get(largest)
        if cached is not None:
            return cached
        spans = []
        for low, high in self.ranges:
            low = largest if low is None else low
            high = largest if high is None else high
            spans.append((low, high) if low <= high else (high, low))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                if high > merged[-1][1]:
                    merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        self._resolved.clear()
        self._resolved[largest] = merged
        return merged

    def contains(self, number: int, largest: int) -> bool:
        spans = self.resolve(largest)
        index = bisect_right(spans, (number, _NO_END)) - 1
        return index >= 0 and spans[index][0] <= number <= spans[index][1]

    def __str__(self) -> str:
        def one(n: int | None) -> str:
            return "*" if n is None else str(n)

        return ",".join(
            one(lo) if lo == hi else f"{one(lo)}:{one(hi)}" for lo, hi in self.ranges
        )


_NO_END = 1 << 64


@dataclass(frozen=True)
class FetchItem:
    """One fetch attribute: ``name`` upper-case, sections for BODY[...].

    ``name`` is one of ENVELOPE FLAGS INTERNALDATE RFC822 RFC822.HEADER
    RFC822.SIZE RFC822.TEXT BODY BODYSTRUCTURE UID, or BODY[] for a
    section, with ``peek``, ``part``, ``kind``, ``fields`` and ``partial``.
    """

    name: str
    peek: bool = False
    part: tuple[int, ...] = ()
    kind: str = ""
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None
    # How the item is named in the response (RFC 3501 7.4.2).
    label: str = ""


@dataclass
class SearchKey:
    """One search key: ``name`` upper-case, ``args`` as parsed, ``keys`` nested."""

    name: str
    args: tuple = ()
    keys: list[SearchKey] = field(default_factory=list)


_SIMPLE_FETCH = {
    "ENVELOPE",
    "FLAGS",
    "INTERNALDATE",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.SIZE",
    "RFC822.TEXT",
    "BODY",
    "BODYSTRUCTURE",
    "UID",
}
_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SEARCH_NO_ARG = {
    "ALL",
    "ANSWERED",
    "DELETED",
    "DRAFT",
    "FLAGGED",
    "NEW",
    "OLD",
    "RECENT",
    "SEEN",
    "UNANSWERED",
    "UNDELETED",
    "UNDRAFT",
    "UNFLAGGED",
    "UNSEEN",
}
_SEARCH_STRING = {"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"}
_SEARCH_DATE = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}
_SEARCH_NUMBER = {"LARGER", "SMALLER"}
_SEARCH_FLAG = {"KEYWORD", "UNKEYWORD"}
MAX_SEARCH_DEPTH = 50


class Cursor:
    """Reads the arguments of one command, left to right."""

    def __init__(self, text: bytes, literals: list[Literal] | None = None) -> None:
        self.text = text
        self.pos = 0
        self.literals = list(literals or [])
        self._next_literal = 0

    # -- low level ------------------------------------------------------

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> int | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def expect_end(self) -> None:
        if not self.at_end():
            raise ParseError("Unexpected characters at the end of the command")

    def space(self) -> None:
        if self.peek() != 0x20:
            if self.at_end():
                raise ParseError("Missing arguments")
            raise ParseError("Expected one space between arguments")
        self.pos += 1

    def maybe_space(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def char(self, wanted: bytes) -> None:
        if self.text[self.pos : self.pos + 1] != wanted:
            raise ParseError(f"Expected {wanted.decode()!r}")
        self.pos += 1

    def _run(self, allowed: bytes) -> bytes:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in allowed:
            self.pos += 1
        return text[start : self.pos]

    # -- RFC 3501 productions --------------------------------------------

    def atom(self, what: str = "an atom") -> str:
        run = self._run(_ATOM_CHARS)
        if not run:
            raise ParseError(f"Expected {what}")
        return run.decode("ascii")

    def tag(self) -> str:
        run = self._run(_TAG_CHARS)
        if not run:
            raise ParseError("Missing or invalid tag")
        return run.decode("ascii")

    def number(self, what: str = "a number") -> int:
        run = self._run(b"0123456789")
        if not run:
            raise ParseError(f"Expected {what}")
        value = int(run)
        if value > 0xFFFFFFFF:
            raise ParseError(f"{what.capitalize()} is too large")
        return value

    def nz_number(self, what: str = "a number") -> int:
        value = self.number(what)
        if value == 0:
            raise ParseError(f"{what.capitalize()} must not be 0")
        return value

    def literal(self) -> Literal:
        if self.peek() != LITERAL_MARK:
            raise ParseError("Expected a literal")
        self.pos += 1
        if self._next_literal >= len(self.literals):
            raise ParseError("Literal missing")
        literal = self.literals[self._next_literal]
        self._next_literal += 1
        return literal

    def quoted(self) -> bytes:
        self.char(b'"')
        out = bytearray()
        text = self.text
        while True:
            if self.pos >= len(text):
                raise ParseError("Unterminated quoted string")
            c = text[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(text) or text[self.pos] not in b'"\\':
                    raise ParseError("Invalid escape in quoted string")
                c = text[self.pos]
                self.pos += 1
            elif c in (0x00, 0x0A, 0x0D):
                raise ParseError("Invalid character in quoted string")
            out.append(c)

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == LITERAL_MARK:
            return self.literal().bytes()
        raise ParseError("Expected a string")

    def astring(self, what: str = "a string") -> bytes:
        c = self.peek()
        if c == 0x22 or c == LITERAL_MARK:
            return self.string()
        run = self._run(_ASTRING_CHARS)
        if not run:
            raise ParseError(f"Expected {what}")
        return run

    def nstring_or_nil(self) -> bytes | None:
        if self.text[self.pos : self.pos + 3].upper() == b"NIL":
            after = self.text[self.pos + 3 : self.pos + 4]
            if not after or after in b" )":
                self.pos += 3
                return None
        return self.string()

    def id_params(self) -> list[tuple[str, str | None]] | None:
        """RFC 2971 ID arguments: NIL, or pairs of field name and value."""
        if self.text[self.pos : self.pos + 3].upper() == b"NIL":
            self.pos += 3
            return None
        self.char(b"(")
        pairs: list[tuple[str, str | None]] = []
        while self.peek() != ord(")"):
            if pairs:
                self.space()
            key = self.string()
            self.space()
            value = self.nstring_or_nil()
            if len(key) > 30 or (value is not None and len(value) > 1024):
                raise ParseError("ID field name or value too long")
            if len(pairs) >= 30:
                raise ParseError("Too many ID fields")
            pairs.append(
                (
                    key.decode("utf-8", "replace"),
                    None if value is None else value.decode("utf-8", "replace"),
                )
            )
        self.pos += 1
        return pairs

    def mailbox(self) -> str:
        """A mailbox name: 7-bit (modified UTF-7), INBOX case-insensitive."""
        raw = self.astring("a mailbox name")
        return _mailbox_text(raw)

    def list_mailbox(self) -> str:
        """A LIST pattern: like a mailbox name, with % and * allowed."""
        c = self.peek()
        if c == 0x22 or c == LITERAL_MARK:
            raw = self.string()
        else:
            raw = self._run(_LIST_CHARS)
            if not raw:
                raise ParseError("Expected a mailbox pattern")
        return _mailbox_text(raw)

    def sequence_set(self) -> SequenceSet:
        ranges = []
        while True:
            low = self._seq_number()
            high = low
            if self.peek() == ord(":"):
                self.pos += 1
                high = self._seq_number()
            ranges.append((low, high))
            if self.peek() != ord(","):
                return SequenceSet(tuple(ranges))
            self.pos += 1

    def _seq_number(self) -> int | None:
        if self.peek() == ord("*"):
            self.pos += 1
            return None
        return self.nz_number("a message number")

    def flag(self) -> str:
        """A flag: \\System or a keyword atom (as the client spelled it)."""
        if self.peek() == ord("\\"):
            self.pos += 1
            if self.peek() == ord("*"):
                raise ParseError("\\* is not a flag")
            return "\\" + self.atom("a flag name")
        return self.atom("a flag")

    def flag_list(self, *, bare_allowed: bool = False) -> list[str]:
        """``(flag ...)``; STORE may also give its flags without parentheses."""
        if self.peek() != ord("("):
            if not bare_allowed:
                raise ParseError("Expected a flag list in parentheses")
            flags = [self.flag()]
            while self.maybe_space():
                flags.append(self.flag())
            return flags
        self.pos += 1
        flags: list[str] = []
        if self.peek() == ord(")"):
            self.pos += 1
            return flags
        while True:
            flags.append(self.flag())
            if self.peek() == ord(")"):
                self.pos += 1
                return flags
            self.space()

    def paren_list(self, read: Callable[[], object]) -> list:
        self.char(b"(")
        items: list = []
        if self.peek() == ord(")"):
            self.pos += 1
            return items
        while True:
            items.append(read())
            if self.peek() == ord(")"):
                self.pos += 1
                return items
            self.space()

    def date(self) -> float:
        """A search date (``1-Feb-2024``, maybe quoted): midnight UTC, epoch."""
        quoted = self.peek() == 0x22
        if quoted:
            self.pos += 1
        match = _DATE.match(self.text, self.pos)
        if match is None:
            raise ParseError("Invalid date (expected dd-Mon-yyyy)")
        self.pos = match.end()
        if quoted:
            self.char(b'"')
        return _epoch(match.group(1), match.group(2), match.group(3))

    def date_time(self) -> float:
        """An APPEND date-time (``"01-Feb-2024 10:00:00 +0100"``), epoch."""
        match = _DATE_TIME.match(self.text, self.pos)
        if match is None:
            raise ParseError(
                'Invalid date-time (expected "dd-Mon-yyyy hh:mm:ss +zzzz")'
            )
        self.pos = match.end()
        day, month, year, hh, mm, ss, sign, zh, zm = match.groups()
        if int(hh) > 23 or int(mm) > 59 or int(ss) > 60 or int(zm) > 59:
            raise ParseError("Invalid time in date-time")
        base = _epoch(day.strip(), month, year)
        offset = (int(zh) * 60 + int(zm)) * 60
        if sign == b"-":
            offset = -offset
        return base + int(hh) * 3600 + int(mm) * 60 + int(ss) - offset

    # -- FETCH -------------------------------------------------------------

    def fetch_items(self) -> list[FetchItem]:
        """A macro, one fetch attribute, or a parenthesised list of them."""
        if self.peek() == ord("("):
            items = self.paren_list(self.fetch_item)
            if not items:
                raise ParseError("Empty fetch attribute list")
            return items
        start = self.pos
        word = self._run(_ATOM_CHARS).upper().decode("ascii")
        if word in _FETCH_MACROS and (self.at_end() or self.peek() != ord("[")):
            return [FetchItem(name, label=name) for name in _FETCH_MACROS[word]]
        self.pos = start
        return [self.fetch_item()]

    def fetch_item(self) -> FetchItem:
        run = self._run(_ATOM_CHARS.replace(b"[", b"")).upper().decode("ascii")
        if self.peek() == ord("[") and run in ("BODY", "BODY.PEEK"):
            return self._body_section(peek=run == "BODY.PEEK")
        if run in _SIMPLE_FETCH:
            return FetchItem(run, label=run)
        if not run:
            raise ParseError("Expected a fetch attribute")
        raise ParseError(f"Unknown fetch attribute {run}")

    def _body_section(self, *, peek: bool) -> FetchItem:
        self.char(b"[")
        part: list[int] = []
        kind = ""
        fields: tuple[str, ...] = ()
        while self.peek() is not None and chr(self.peek()).isdigit():
            part.append(self.nz_number("a part number"))
            if self.peek() != ord("."):
                break
            self.pos += 1
        if self.peek() != ord("]"):
            kind = self._run(_ATOM_CHARS.replace(b"[", b"")).upper().decode("ascii")
            allowed = {"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"}
            if part:
                allowed.add("MIME")
            if kind not in allowed:
                raise ParseError(f"Invalid section {kind or '(empty)'}")
            if kind.startswith("HEADER.FIELDS"):
                self.space()
                names = self.paren_list(lambda: self.astring("a header name"))
                if not names:
                    raise ParseError("Empty header field list")
                for n in names:
                    # RFC 5322 2.2: printable US-ASCII except the colon.
                    if not n or any(c < 33 or c > 126 or c == 58 for c in n):
                        raise ParseError("Invalid header field name")
                fields = tuple(n.decode("ascii").upper() for n in names)
        self.char(b"]")
        partial = None
        if self.peek() == ord("<"):
            self.pos += 1
            origin = self.number("a partial origin")
            self.char(b".")
            length = self.nz_number("a partial length")
            self.char(b">")
            partial = (origin, length)
        section = ".".join(map(str, part))
        if kind:
            section = f"{section}.{kind}" if section else kind
        if fields:
            section += " (" + " ".join(map(_astring, fields)) + ")"
        label = f"BODY[{section}]"
        if partial is not None:
            label += f"<{partial[0]}>"
        return FetchItem(
            "BODY[]",
            peek=peek,
            part=tuple(part),
            kind=kind,
            fields=fields,
            partial=partial,
            label=label,
        )

    # -- SEARCH ------------------------------------------------------------

    def search_keys(self, decode: Callable[[bytes], str]) -> list[SearchKey]:
        """Every search key up to the end of the command (all must match)."""
        keys = [self.search_key(decode, 0)]
        while self.maybe_space():
            keys.append(self.search_key(decode, 0))
        self.expect_end()
        return keys

    def search_key(self, decode: Callable[[bytes], str], depth: int) -> SearchKey:
        if depth > MAX_SEARCH_DEPTH:
            raise ParseError("Search keys nested too deeply")
        c = self.peek()
        if c == ord("("):
            self.pos += 1
            group = [self.search_key(decode, depth + 1)]
            while self.peek() != ord(")"):
                self.space()
                group.append(self.search_key(decode, depth + 1))
            self.pos += 1
            return SearchKey("AND", keys=group)
        if c is not None and (chr(c).isdigit() or c == ord("*")):
            return SearchKey("SEQUENCE", (self.sequence_set(),))
        name = self.atom("a search key").upper()
        if name in _SEARCH_NO_ARG:
            return SearchKey(name)
        self.space()
        if name in _SEARCH_STRING:
            return SearchKey(name, (decode(self.astring()),))
        if name in _SEARCH_DATE:
            return SearchKey(name, (self.date(),))
        if name in _SEARCH_NUMBER:
            return SearchKey(name, (self.number(),))
        if name in _SEARCH_FLAG:
            return SearchKey(name, (self.flag(),))
        if name == "HEADER":
            field_name = self.astring("a header name").decode("ascii", "replace")
            self.space()
            return SearchKey(name, (field_name, decode(self.astring())))
        if name == "UID":
            return SearchKey(name, (self.sequence_set(),))
        if name == "NOT":
            return SearchKey(name, keys=[self.search_key(decode, depth + 1)])
        if name == "OR":
            first = self.search_key(decode, depth + 1)
            self.space()
            return SearchKey(name, keys=[first, self.search_key(decode, depth + 1)])
        raise ParseError(f"Unknown search key {name}")


def _astring(text: str) -> str:
    """``text`` as an IMAP astring: an atom when it can be, else quoted."""
    raw = text.encode("utf-8", "replace")
    if raw and all(c in _ASTRING_CHARS for c in raw):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mailbox_text(raw: bytes) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError(
            "Mailbox names must be 7-bit (modified UTF-7, RFC 3501 5.1.3)"
        ) from None
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ParseError("Mailbox name contains a control character")
    if name.upper() == "INBOX":
        return "INBOX"
    return name


def _epoch(day: bytes, month: bytes, year: bytes) -> float:
    number = _MONTHS.get(month.decode("ascii").lower())
    if number is None:
        raise ParseError(f"Invalid month {month.decode('ascii', 'replace')}")
    try:
        stamp = time.strptime(f"{int(day)} {number} {int(year)}", "%d %m %Y")
    except ValueError:
        raise ParseError("Invalid date") from None
    return float(timegm(stamp))
