"""One message's content as IMAP4rev1 sees it: envelope, body structure,
sections and the SEARCH keys that look inside it.

Everything here works on the message's own octets.  A small bytes-level
MIME parser finds every part's header and body as offsets into the
original data, so a section is always the exact bytes that were stored,
never a re-generated copy.  The parser never raises: broken messages
degrade the way Dovecot 2.3 degrades them (RFC 3501 sections 6.4.4,
6.4.5 and 7.4.2; RFC 2045, 2046, 2047 and 2231).

Parsing is lazy: the envelope and the header sections read only the top
header; the MIME tree is built the first time a body structure, a part
or a body search needs it, and is kept on the :class:`Message`.
"""

from __future__ import annotations

import binascii
import datetime
import re
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

__all__ = [
    "Message",
    "nstring",
    "partial",
    "string",
    "to_crlf",
]

# How deep multiparts and message/rfc822 may nest before the parser stops
# descending and treats the part as an opaque leaf.
MAX_DEPTH = 20
# How many parts one message may have; later parts stay inside their
# parent's body but get no entry of their own (Dovecot stops at 10,000).
MAX_PARTS = 10_000

_NEEDS_LITERAL = re.compile(rb"[\x00\r\n\x80-\xff]")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_UNESCAPE = re.compile(rb"\\(.)", re.S)

# The body of a multipart that has no parts at all (RFC 3501 requires one).
_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
_EMPTY_BODYSTRUCTURE = (
    b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
)
# Header fields holding addresses: SEARCH also matches their display form.
_ADDRESS_HEADERS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "return-path",
        "delivered-to",
    }
)


def to_crlf(data: bytes) -> bytes:
    """Every line end as CRLF: bare LF -> CRLF, existing CRLF kept, lone CR kept as is."""
    if b"\n" not in data or data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def string(value: bytes | str) -> bytes:
    """An IMAP string: quoted when it can be, else a literal; never NIL.

    A quoted string escapes ``"`` and ``\\``; CR, LF, NUL and 8-bit octets
    can only travel in a literal (RFC 3501 section 4.3).
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    if _NEEDS_LITERAL.search(value):
        return b"{%d}\r\n" % len(value) + value
    if b"\\" in value or b'"' in value:
        value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + value + b'"'


def nstring(value: bytes | str | None) -> bytes:
    """IMAP nstring: NIL for None, else :func:`string` of the value."""
    if value is None:
        return b"NIL"
    return string(value)


def partial(data: bytes, origin: int | None, length: int | None) -> bytes:
    """The ``<origin.length>`` slice of a section (RFC 3501 6.4.5).

    An origin beyond the end gives the empty string; the result is cut to
    ``length`` octets.  No origin means the whole section.
    """
    if origin is None:
        return data if length is None else data[:length]
    if origin >= len(data):
        return b""
    if length is None:
        return data[origin:]
    return data[origin : origin + length]


# -- headers ---------------------------------------------------------------


def _blank_line_end(data: bytes, start: int, limit: int) -> int:
    """The offset just after the empty line ending the header at ``start``.

    -1 when there is no empty line before ``limit``.
    """
    if data.startswith(b"\r\n", start) and start + 2 <= limit:
        return start + 2
    if data.startswith(b"\n", start) and start < limit:
        return start + 1
    crlf = data.find(b"\n\r\n", start, limit)
    lf = data.find(b"\n\n", start, crlf + 3 if crlf >= 0 else limit)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    if crlf >= 0:
        return crlf + 3
    return -1


# One field: the first line up to its colon (if any), then continuations.
_FIELD = re.compile(rb"([^:\n]*)(:?)[^\n]*(?:\n[ \t][^\n]*)*\n?")


def _parse_fields(data: bytes, start: int, end: int) -> list[tuple[str, int, int, int]]:
    """Split the header in ``data[start:end]`` into fields.

    Each field is ``(lowercase name, start, colon, end)``; ``end`` is after
    its last line's line end, continuation lines included.  A line with no
    colon is a field with the name ``""`` and ``colon`` -1: it is kept (so
    HEADER.FIELDS.NOT returns it, as Dovecot does) but matches no name.
    """
    fields: list[tuple[str, int, int, int]] = []
    for m in _FIELD.finditer(data, start, end):
        field_start, field_end = m.span()
        if m.group(2):
            name = m.group(1).rstrip(b" \t").decode("latin-1").lower()
            fields.append((name, field_start, m.end(1), field_end))
        elif field_end - field_start > 2 or data[field_start:field_end].strip(b"\r\n"):
            fields.append(("", field_start, -1, field_end))
        # else: the empty line that ends the header, or the empty match at its end.
    return fields


def _named_fields(data: bytes, end: int, name: str) -> list[tuple[str, int, int, int]]:
    """The fields called ``name`` (lowercase) in ``data[:end]``, as
    :func:`_parse_fields` gives them, found without splitting the others."""
    wanted = name.encode("latin-1")
    low = data[:end].lower()
    fields = []
    position = 0 if low.startswith(wanted) else low.find(b"\n" + wanted)
    while position >= 0:
        start = position if position == 0 and low.startswith(wanted) else position + 1
        after = start + len(wanted)
        while after < end and low[after] in b" \t":
            after += 1
        if after < end and low[after] == ord(":"):
            colon = after
            scan = colon
            while True:
                newline = data.find(b"\n", scan, end)
                if newline < 0:
                    field_end = end
                    break
                if newline + 1 < end and data[newline + 1] in b" \t":
                    scan = newline + 1
                    continue
                field_end = newline + 1
                break
            fields.append((name, start, colon, field_end))
        position = low.find(b"\n" + wanted, start + 1)
    return fields


def _field_value(data: bytes, field: tuple[str, int, int, int]) -> bytes:
    """A field's value, unfolded (CRLF before WSP removed), leading WSP gone."""
    _, _, colon, end = field
    if colon < 0:
        return b""
    value = data[colon + 1 : end]
    if value.find(b"\n", 0, len(value) - 1) >= 0:
        value = _FOLD.sub(b"", value)
    return value.rstrip(b"\r\n").lstrip(b" \t")


# -- structured header fields (MIME) ---------------------------------------

_COMMENT_OR_QUOTED = re.compile(rb'"(?:[^"\\]|\\.)*"?|\(', re.S)


def _strip_comments(value: bytes) -> bytes:
    """``value`` with its RFC 5322 comments replaced by a space."""
    if b"(" not in value:
        return value
    out = []
    pos = 0
    while True:
        m = _COMMENT_OR_QUOTED.search(value, pos)
        if m is None:
            out.append(value[pos:])
            return b"".join(out)
        if m.group() != b"(":
            out.append(value[pos : m.end()])
            pos = m.end()
            continue
        out.append(value[pos : m.start()])
        out.append(b" ")
        pos = _comment_end(value, m.start())[0]


_COMMENT_SPECIAL = re.compile(rb"[()\\]")


def _comment_end(value: bytes, pos: int) -> tuple[int, bytes]:
    """Where the comment opening at ``pos`` ends, and its unescaped text."""
    depth = 0
    text = []
    while True:
        m = _COMMENT_SPECIAL.search(value, pos)
        if m is None:
            text.append(value[pos:])
            return len(value), b"".join(text)[1:]
        at = m.start()
        text.append(value[pos:at])
        c = value[at]
        if c == 0x5C:  # backslash: quoted-pair
            text.append(value[at + 1 : at + 2])
            pos = at + 2
            continue
        depth += 1 if c == 0x28 else -1
        if depth == 0:
            return at + 1, b"".join(text)[1:]
        text.append(value[at : at + 1])
        pos = at + 1


_MEDIA_TYPE = re.compile(rb"\s*([^\s;/\"]+)\s*/\s*([^\s;\"]+)\s*")
_TOKEN = re.compile(rb"\s*([^\s;\"]+)\s*")
_PARAM = re.compile(
    rb'\s*([^\s;=\"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"?|([^;\s\"]*))\s*', re.S
)
_TO_SEMICOLON = re.compile(rb'(?:[^;"]+|"(?:[^"\\]|\\.)*"?)*', re.S)
_RFC2231_KEY = re.compile(rb"(.*?)\*(?:([0-9]+)(\*?))?")
_ATTRIBUTE_CHAR = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$&+-.^_`{|}~"
)


def _parse_params(value: bytes, pos: int) -> list[tuple[bytes, bytes]]:
    """The ``; key=value`` parameters from ``pos`` on, RFC 2231 merged.

    Unquoted values may hold ``=`` and other tspecials (``boundary=--=_x``
    is common); a parameter without a value is dropped.
    """
    params: list[tuple[bytes, bytes]] = []
    n = len(value)
    while pos < n:
        pos = _TO_SEMICOLON.match(value, pos).end() + 1
        m = _PARAM.match(value, pos)
        if m is None:
            continue
        key, quoted, bare = m.groups()
        params.append(
            (key, _UNESCAPE.sub(rb"\1", quoted) if quoted is not None else bare)
        )
        pos = m.end()
    if any(b"*" in key for key, _ in params):
        return _merge_rfc2231(params)
    return params


def _merge_rfc2231(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Join RFC 2231 continuations into one ``name*`` (or ``name``) parameter.

    As Dovecot does: plain parameters keep their order, merged ones follow
    sorted by name, and an extended value keeps its ``charset'lang'`` prefix
    and its %-encoding (RFC 3501 does not ask the server to decode them).
    A set with a missing section number is passed on unmerged.
    """
    plain: list[tuple[bytes, bytes]] = []
    groups: dict[bytes, list[tuple[int, bool, bytes, bytes]]] = {}
    for key, value in params:
        m = _RFC2231_KEY.fullmatch(key)
        if m is None or not m.group(1):
            plain.append((key, value))
            continue
        name, number, star = m.groups()
        index = int(number) if number is not None else 0
        extended = number is None or star == b"*"
        groups.setdefault(name.lower(), []).append((index, extended, name, value))
    for lname in sorted(groups):
        pieces = sorted(groups[lname], key=lambda piece: piece[0])
        name = pieces[0][2]
        if [piece[0] for piece in pieces] != list(range(len(pieces))):
            for index, extended, _, value in pieces:
                plain.append(
                    (b"%s*%d%s" % (name, index, b"*" if extended else b""), value)
                )
            continue
        if not any(piece[1] for piece in pieces):
            plain.append((name, b"".join(piece[3] for piece in pieces)))
            continue
        joined = b"" if pieces[0][1] else b"''"
        for _, extended, _, value in pieces:
            joined += value if extended else _percent_encode(value)
        plain.append((name + b"*", joined))
    return plain


def _percent_encode(value: bytes) -> bytes:
    """RFC 2231 %-encoding of a plain piece joined to an extended value."""
    return b"".join(
        bytes((c,)) if c in _ATTRIBUTE_CHAR else b"%%%02X" % c for c in value
    )


class _ContentType:
    """A parsed Content-Type: type and subtype as written, and parameters."""

    __slots__ = ("type", "subtype", "params")

    def __init__(self, type_: bytes, subtype: bytes, params: list[tuple[bytes, bytes]]):
        self.type = type_
        self.subtype = subtype
        self.params = params

    def param(self, name: bytes) -> bytes | None:
        """The first parameter called ``name`` (case-insensitive), if any."""
        for key, value in self.params:
            if key.lower() == name:
                return value
        return None


def _parse_content_type(value: bytes) -> _ContentType | None:
    """Parse a Content-Type value; None when it is not ``type/subtype``.

    RFC 2045 5.2: a syntactically invalid Content-Type is taken as the
    default, text/plain in US-ASCII.
    """
    value = _strip_comments(value)
    m = _MEDIA_TYPE.match(value)
    if m is None:
        return None
    return _ContentType(m.group(1), m.group(2), _parse_params(value, m.end()))


def _parse_disposition(value: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """Parse Content-Disposition into its type and parameters."""
    value = _strip_comments(value)
    m = _TOKEN.match(value)
    if m is None:
        return None
    return m.group(1), _parse_params(value, m.end())


def _parse_token(value: bytes) -> bytes | None:
    """The single token of a field such as Content-Transfer-Encoding."""
    m = _TOKEN.fullmatch(_strip_comments(value))
    return m.group(1) if m else None


# -- addresses (RFC 5322 3.4, as RFC 3501 7.4.2 wants them) ----------------

_ATOM, _QUOTED, _LITERAL, _SPECIAL, _COMMENT = range(5)
_ADDRESS_LEX = re.compile(
    rb'([ \t\r\n]+)|"((?:[^"\\]|\\.)*)"?|(\[(?:[^\]\\]|\\.)*\]?)'
    rb'|([^\x00-\x20()<>\[\]:;@\\,."]+)|(.)',
    re.S,
)
_GROUP_END = (None, None, None, None)

# An envelope address: (name, route, mailbox, host), each bytes or None.
_Address = tuple[bytes | None, bytes | None, bytes | None, bytes | None]
_Token = tuple[int, bytes, bool]


def _lex_address(value: bytes) -> list[_Token]:
    """Tokens of an address list: (kind, text, preceded by white space)."""
    tokens: list[_Token] = []
    pos = 0
    n = len(value)
    space = False
    while pos < n:
        if value[pos] == 0x28:
            pos, text = _comment_end(value, pos)
            tokens.append((_COMMENT, text, space))
            space = True
            continue
        m = _ADDRESS_LEX.match(value, pos)
        pos = m.end()
        group = m.lastindex
        if group == 1:
            space = True
            continue
        if group == 2:
            tokens.append((_QUOTED, _UNESCAPE.sub(rb"\1", m.group(2)), space))
        elif group == 3:
            tokens.append((_LITERAL, m.group(3), space))
        elif group == 4:
            tokens.append((_ATOM, m.group(4), space))
        else:
            tokens.append((_SPECIAL, m.group(5), space))
        space = False
    return tokens


def _phrase(tokens: list[_Token]) -> bytes:
    """A display name: its words joined by one space where there was any."""
    out = bytearray()
    for kind, text, space in tokens:
        if kind in (_ATOM, _QUOTED) or (kind == _SPECIAL and text == b"."):
            if out and space:
                out += b" "
            out += text
    return bytes(out)


def _joined(tokens: list[_Token]) -> bytes:
    """A local part or domain: its words and dots run together."""
    return b"".join(
        text
        for kind, text, _ in tokens
        if kind in (_ATOM, _QUOTED, _LITERAL) or (kind == _SPECIAL and text == b".")
    )


def _last_comment(tokens: list[_Token]) -> bytes | None:
    """The text of the last comment, used as the name ``a@b (Name)``."""
    for kind, text, _ in reversed(tokens):
        if kind == _COMMENT:
            return text.strip() or None
    return None


def _is_special(token: _Token, chars: bytes) -> bool:
    return token[0] == _SPECIAL and token[1] in chars


def _parse_mailbox(tokens: list[_Token], i: int) -> tuple[_Address | None, int]:
    """One mailbox starting at ``i``; returns it and the index of its end."""
    n = len(tokens)
    j = i
    while j < n and not _is_special(tokens[j], b"<@,;"):
        j += 1
    name: bytes | None
    route = None
    if j < n and tokens[j][1] == b"<":
        name = _phrase(tokens[i:j]) or None
        k = j + 1
        if k < n and _is_special(tokens[k], b"@"):
            colon = k
            while colon < n and not _is_special(tokens[colon], b":>"):
                colon += 1
            if colon < n and tokens[colon][1] == b":":
                route = b"".join(
                    text for kind, text, _ in tokens[k:colon] if kind != _COMMENT
                )
                k = colon + 1
        local_start = k
        while k < n and not _is_special(tokens[k], b"@>"):
            k += 1
        local = _joined(tokens[local_start:k])
        domain = b""
        if k < n and tokens[k][1] == b"@":
            domain_start = k + 1
            k = domain_start
            while k < n and not _is_special(tokens[k], b">"):
                k += 1
            domain = _joined(tokens[domain_start:k])
        end = k
        while end < n and not _is_special(tokens[end], b",;"):
            end += 1
        if name is None:
            name = _last_comment(tokens[i:end])
    else:
        local = _joined(tokens[i:j])
        domain = b""
        end = j
        if j < n and tokens[j][1] == b"@":
            end = j + 1
            while end < n and not _is_special(tokens[end], b",;"):
                end += 1
            domain = _joined(tokens[j + 1 : end])
        name = _last_comment(tokens[i:end])
        if not local and not domain and name is None:
            return None, max(end, i + 1)
    # Dovecot's placeholders: a NIL host would read as group syntax.
    address = (name, route, local or b"MISSING_MAILBOX", domain or b"MISSING_DOMAIN")
    return address, max(end, i + 1)


_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\xff]"
_DOT_ATOM = rb"(?:%s+(?:\.%s+)*)" % (_ATEXT, _ATEXT)
# The common forms (``a@b``, ``Name <a@b>``, ``"Name" <a@b>``) in one step.
_SIMPLE_ADDRESS = re.compile(
    rb'[ \t]*(?:(?:"([^"\\\r\n]*)"|((?:%s|[ \t.])*?))[ \t]*<(%s)@(%s)>|(%s)@(%s))[ \t]*(?:,|$)'
    % (_ATEXT, _DOT_ATOM, _DOT_ATOM, _DOT_ATOM, _DOT_ATOM)
)


def _parse_addresses(value: bytes) -> list[_Address]:
    """An address list as envelope addresses, groups included; never raises."""
    addresses: list[_Address] = []
    pos = 0
    n = len(value)
    while pos < n:
        m = _SIMPLE_ADDRESS.match(value, pos)
        if m is None:
            return _parse_address_tokens(value)
        quoted, bare, mailbox, host, lone_mailbox, lone_host = m.groups()
        if mailbox is None:
            addresses.append((None, None, lone_mailbox, lone_host))
        else:
            name = quoted if quoted is not None else b" ".join(bare.split())
            addresses.append((name or None, None, mailbox, host))
        pos = m.end()
    return addresses


def _parse_address_tokens(value: bytes) -> list[_Address]:
    """The full RFC 5322 address-list parser, groups, routes and comments."""
    tokens = _lex_address(value)
    addresses: list[_Address] = []
    n = len(tokens)
    i = 0
    while i < n:
        if _is_special(tokens[i], b",;>"):
            i += 1
            continue
        j = i
        while j < n and not _is_special(tokens[j], b"<:,;@"):
            j += 1
        if j < n and tokens[j][1] == b":":
            addresses.append((None, None, _phrase(tokens[i:j]), None))
            i = j + 1
            while i < n:
                if _is_special(tokens[i], b";"):
                    i += 1
                    break
                if _is_special(tokens[i], b",:>"):
                    i += 1
                    continue
                address, i = _parse_mailbox(tokens, i)
                if address is not None:
                    addresses.append(address)
            addresses.append(_GROUP_END)
            continue
        address, i = _parse_mailbox(tokens, i)
        if address is not None:
            addresses.append(address)
    return addresses


def _address_list(addresses: list[_Address]) -> bytes:
    """The parenthesised envelope form of an address list, NIL if empty."""
    if not addresses:
        return b"NIL"
    return (
        b"("
        + b"".join(
            b"(%s %s %s %s)"
            % (nstring(name), nstring(route), nstring(mailbox), nstring(host))
            for name, route, mailbox, host in addresses
        )
        + b")"
    )


# The header fields of an ENVELOPE, in its order (RFC 3501 7.4.2).
_ENVELOPE_FIELDS = {
    name: index
    for index, name in enumerate(
        (
            "date",
            "subject",
            "from",
            "sender",
            "reply-to",
            "to",
            "cc",
            "bcc",
            "in-reply-to",
            "message-id",
        )
    )
}
_ADDRESS_SLOTS = frozenset(range(2, 8))


def _envelope(data: bytes, fields: list[tuple[str, int, int, int]]) -> bytes:
    """The ENVELOPE of the header ``fields`` (RFC 3501 7.4.2).

    The first of repeated fields counts.  Sender and Reply-To default to
    From when absent or empty.
    """
    values: list[bytes | None] = [None] * 10
    for field in fields:
        index = _ENVELOPE_FIELDS.get(field[0])
        if index is not None and values[index] is None:
            values[index] = _field_value(data, field)
    out = []
    for index, value in enumerate(values):
        if index not in _ADDRESS_SLOTS:
            out.append(nstring(value))
        elif value is None:
            out.append(b"NIL")
        else:
            out.append(_address_list(_parse_addresses(value)))
    if out[3] == b"NIL":
        out[3] = out[2]
    if out[4] == b"NIL":
        out[4] = out[2]
    return b"(" + b" ".join(out) + b")"


# -- decoding for SEARCH ---------------------------------------------------

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _decode_text(data: bytes, charset: str | None) -> str:
    """``data`` in ``charset``; unknown or absent charsets read as UTF-8."""
    if charset and charset not in ("us-ascii", "ascii", "utf-8", "utf8"):
        try:
            return data.decode(charset, "replace")
        except (LookupError, ValueError, TypeError):
            pass
    return data.decode("utf-8", "replace")


def _decode_base64(data: bytes) -> bytes:
    """Base64 that tolerates line breaks, junk and a missing or odd tail."""
    data = _NOT_BASE64.sub(b"", data)
    data = data[: len(data) - len(data) % 4] if len(data) % 4 == 1 else data
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return b""


def _decode_header(raw: bytes) -> str:
    """A header value as text: RFC 2047 encoded-words decoded, tolerantly.

    Adjacent encoded-words in one charset are decoded together, so a
    character split across two words survives; white space between them
    is dropped (RFC 2047 6.2).  Raw 8-bit octets are read as UTF-8.
    """
    if b"=?" not in raw:
        return raw.decode("utf-8", "replace")
    out: list[str] = []
    charset: str | None = None
    pending = b""
    pos = 0
    after_word = False
    for m in _ENCODED_WORD.finditer(raw):
        gap = raw[pos : m.start()]
        if gap and not (after_word and not gap.strip(b" \t\r\n")):
            if charset is not None:
                out.append(_decode_text(pending, charset))
                charset, pending = None, b""
            out.append(gap.decode("utf-8", "replace"))
        word_charset = m.group(1).split(b"*")[0].decode("ascii", "replace").lower()
        encoded = m.group(3)
        if m.group(2) in b"Bb":
            decoded = _decode_base64(encoded)
        else:
            decoded = binascii.a2b_qp(encoded, header=True)
        if word_charset != charset and charset is not None:
            out.append(_decode_text(pending, charset))
            pending = b""
        charset = word_charset
        pending += decoded
        pos = m.end()
        after_word = True
    if charset is not None:
        out.append(_decode_text(pending, charset))
    out.append(raw[pos:].decode("utf-8", "replace"))
    return "".join(out)


def _folded(text: str) -> str:
    """Text as SEARCH compares it: casefolded, white space runs as one space."""
    return " ".join(text.split()).casefold()


# -- the MIME tree ---------------------------------------------------------

_LEAF, _MULTIPART, _MESSAGE = range(3)


class _Part:
    """One node of the MIME tree, as offsets into the message's bytes.

    ``data[start:header_end]`` is the part's header (for a body part, its
    MIME header; the blank line included), ``data[header_end:end]`` its
    body.  A message/rfc822 part has one child, the encapsulated message;
    a multipart has its body parts.
    """

    __slots__ = (
        "start",
        "header_end",
        "end",
        "fields",
        "content_type",
        "is_mime",
        "kind",
        "children",
        "depth",
    )

    def __init__(
        self, data: bytes, start: int, header_end: int, depth: int, *, mime: bool
    ):
        self.start = start
        self.header_end = header_end
        self.end = len(data)
        self.fields = _parse_fields(data, start, header_end)
        self.depth = depth
        self.children: list[_Part] = []
        self.is_mime = mime
        self.content_type: _ContentType | None = None
        self.kind = _LEAF

    def read_mime(self, data: bytes) -> None:
        """Read the Content-Type; until then the part is a plain leaf."""
        # Content-* fields count only in a MIME entity (Dovecot: a
        # MIME-Version or a Content-Type makes one; body parts always are).
        seen = False
        for field in self.fields:
            if field[0] == "content-type":
                # Only the first counts, even when it cannot be parsed.
                if not seen:
                    self.content_type = _parse_content_type(_field_value(data, field))
                    seen = True
                self.is_mime = True
            elif field[0] == "mime-version":
                self.is_mime = True

    def first(self, data: bytes, name: str) -> bytes | None:
        """The value of the part's first ``name`` field, if it is MIME."""
        if not self.is_mime:
            return None
        for field in self.fields:
            if field[0] == name:
                return _field_value(data, field)
        return None

    def is_text(self) -> bool:
        """Whether this is a text/* leaf (the default type included)."""
        if self.kind != _LEAF:
            return False
        return self.content_type is None or self.content_type.type.lower() == b"text"


class _Stop:
    """A boundary line that ended a part.

    ``line`` is where the line starts, ``index`` whose boundary it is (an
    index into the active boundaries, outermost first), ``close`` whether
    it is a close delimiter, and ``exact`` whether nothing but white space
    follows the boundary (else the line merely starts with it).
    """

    __slots__ = ("line", "index", "close", "exact")

    def __init__(self, line: int, index: int, close: bool, exact: bool):
        self.line = line
        self.index = index
        self.close = close
        self.exact = exact


def _boundary_at(data: bytes, line: int, boundaries: tuple[bytes, ...]) -> _Stop | None:
    """The boundary of ``boundaries`` that the line at ``line`` delimits.

    An exact delimiter (``--b`` or ``--b--``, then only white space) wins;
    otherwise, like Dovecot, a line that merely starts with ``--b`` counts,
    the innermost boundary first.
    """
    prefix: _Stop | None = None
    for index in range(len(boundaries) - 1, -1, -1):
        boundary = boundaries[index]
        if not data.startswith(boundary, line + 2):
            continue
        after = line + 2 + len(boundary)
        close = data.startswith(b"--", after)
        if close:
            after += 2
        eol = data.find(b"\n", after)
        if not data[after : len(data) if eol < 0 else eol].strip(b" \t\r"):
            return _Stop(line, index, close, True)
        if prefix is None:
            prefix = _Stop(line, index, close, False)
    return prefix


def _next_boundary(
    data: bytes, pos: int, boundaries: tuple[bytes, ...], limit: int | None = None
) -> _Stop | None:
    """The first boundary line starting at or after ``pos`` and before ``limit``."""
    if not boundaries:
        return None
    if limit is None:
        limit = len(data)
    if (
        (pos == 0 or data[pos - 1] == 0x0A)
        and data.startswith(b"--", pos)
        and pos < limit
    ):
        stop = _boundary_at(data, pos, boundaries)
        if stop is not None:
            return stop
    while True:
        nl = data.find(b"\n--", pos, limit + 2)
        if nl < 0 or nl + 1 >= limit:
            return None
        stop = _boundary_at(data, nl + 1, boundaries)
        if stop is not None:
            return stop
        pos = nl + 1


def _before_line_end(data: bytes, floor: int, line: int) -> int:
    """Where a part ends when the boundary line at ``line`` follows it.

    The line end before a delimiter belongs to the delimiter (RFC 2046
    5.1.1), unless it already ends something of the part (``floor``).
    """
    if line >= 2 and data[line - 2 : line] == b"\r\n":
        line -= 2
    elif line >= 1 and data[line - 1] == 0x0A:
        line -= 1
    return max(floor, line)


def _line_after(data: bytes, pos: int) -> int:
    """The start of the line after the one holding ``pos``."""
    nl = data.find(b"\n", pos)
    return len(data) if nl < 0 else nl + 1


class _Parser:
    """Builds the MIME tree of one message; counts parts against MAX_PARTS."""

    __slots__ = ("data", "parts")

    def __init__(self, data: bytes):
        self.data = data
        self.parts = 0

    def part(
        self,
        start: int,
        boundaries: tuple[bytes, ...],
        depth: int,
        *,
        digest: bool,
        mime: bool,
    ) -> tuple[_Part, _Stop | None]:
        """Parse the part at ``start``; return it and the boundary ending it."""
        data = self.data
        self.parts += 1
        stop = _next_boundary(data, start, boundaries)
        limit = len(data) if stop is None else stop.line
        header_end = _blank_line_end(data, start, limit)
        # A delimiter inside the header ends it, and one right after it takes
        # the blank line as its own CRLF; but only an exact one there:
        # ``--bb`` after the header of a multipart with boundary ``bb``
        # nested in one with ``b`` is the nested multipart's.
        if header_end < 0:
            header_end = _before_line_end(data, start, limit) if stop else limit
        elif stop is not None and header_end == limit and stop.exact:
            header_end = _before_line_end(data, start, limit)
        part = _Part(data, start, header_end, depth, mime=mime)
        part.read_mime(data)
        return part, self.body(part, stop, boundaries, digest=digest)

    def body(
        self,
        part: _Part,
        stop: _Stop | None,
        boundaries: tuple[bytes, ...],
        *,
        digest: bool,
    ) -> _Stop | None:
        """Find the end of ``part``'s body and its children; return the stop."""
        data = self.data
        content_type = part.content_type
        container = part.depth < MAX_DEPTH and self.parts < MAX_PARTS
        if content_type is None:
            if digest and container:
                part.kind = _MESSAGE
        elif container:
            media = content_type.type.lower()
            if media == b"multipart":
                part.kind = _MULTIPART
            elif media == b"message" and content_type.subtype.lower() == b"rfc822":
                part.kind = _MESSAGE

        if part.kind == _LEAF:
            if stop is None:
                stop = _next_boundary(data, part.header_end, boundaries)
            if stop is not None:
                part.end = _before_line_end(data, part.header_end, stop.line)
            return stop

        if part.kind == _MESSAGE:
            child, stop = self.part(
                part.header_end, boundaries, part.depth + 1, digest=False, mime=False
            )
            part.children.append(child)
            part.end = child.end
            return stop
        return self.multipart(part, boundaries)

    def multipart(self, part: _Part, boundaries: tuple[bytes, ...]) -> _Stop | None:
        """Split a multipart's body at its delimiters (RFC 2046 5.1.1)."""
        data = self.data
        boundary = part.content_type.param(b"boundary") if part.content_type else None
        if not boundary:
            # No boundary: a multipart with no parts, as Dovecot reports it.
            stop = _next_boundary(data, part.header_end, boundaries)
            part.end = (
                len(data)
                if stop is None
                else _before_line_end(data, part.header_end, stop.line)
            )
            return stop
        own = len(boundaries)
        inner = (*boundaries, boundary)
        digest = part.content_type.subtype.lower() == b"digest"
        stop = _next_boundary(data, part.header_end, inner)
        while stop is not None and stop.index == own:
            after = _line_after(data, stop.line)
            if stop.close:
                stop = _next_boundary(data, after, boundaries)
                part.end = (
                    len(data)
                    if stop is None
                    else _before_line_end(data, after, stop.line)
                )
                return stop
            if self.parts >= MAX_PARTS:
                stop = _next_boundary(data, after, inner)
                continue
            child, stop = self.part(
                after, inner, part.depth + 1, digest=digest, mime=True
            )
            part.children.append(child)
        if stop is None:
            part.end = len(data)
        else:
            floor = part.children[-1].end if part.children else part.header_end
            part.end = _before_line_end(data, floor, stop.line)
        return stop


# -- BODYSTRUCTURE ---------------------------------------------------------


def _params(params: list[tuple[bytes, bytes]], *, default_charset: bool) -> bytes:
    """A body parameter list; text parts get charset us-ascii if they lack one."""
    items = [string(key) + b" " + string(value) for key, value in params]
    if default_charset and not any(key.lower() == b"charset" for key, _ in params):
        items.append(b'"charset" "us-ascii"')
    if not items:
        return b"NIL"
    return b"(" + b" ".join(items) + b")"


def _extension(data: bytes, part: _Part) -> bytes:
    """Disposition, language and location, shared by every body type."""
    disposition = None
    raw = part.first(data, "content-disposition")
    if raw is not None:
        disposition = _parse_disposition(raw)
    if disposition is None:
        written_disposition = b"NIL"
    else:
        kind, params = disposition
        written_disposition = b"(%s %s)" % (
            string(kind),
            _params(params, default_charset=False),
        )
    language = b"NIL"
    raw = part.first(data, "content-language")
    if raw is not None:
        tags = [tag.strip() for tag in _strip_comments(raw).split(b",") if tag.strip()]
        if tags:
            language = b"(" + b" ".join(string(tag) for tag in tags) + b")"
    location = nstring(part.first(data, "content-location"))
    return b" ".join((written_disposition, language, location))


def _body(data: bytes, part: _Part, extended: bool) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY of one part, as Dovecot writes it."""
    if part.kind == _MULTIPART:
        children = b"".join(_body(data, child, extended) for child in part.children)
        if not children:
            children = _EMPTY_BODYSTRUCTURE if extended else _EMPTY_BODY
        content_type = part.content_type
        out = children + b" " + string(content_type.subtype)
        if extended:
            out += b" " + _params(content_type.params, default_charset=False)
            out += b" " + _extension(data, part)
        return b"(" + out + b")"

    content_type = part.content_type
    params = content_type.params if content_type is not None else []
    text = False
    if part.kind == _MESSAGE:
        media = b'"message" "rfc822"'
    elif content_type is None:
        media = b'"text" "plain"'
        text = True
    elif content_type.type.lower() == b"multipart" or (
        content_type.type.lower() == b"message"
        and content_type.subtype.lower() == b"rfc822"
    ):
        # Nested too deep to open: an opaque leaf, as Dovecot does.
        media = b'"application" "octet-stream"'
    else:
        media = string(content_type.type) + b" " + string(content_type.subtype)
        text = content_type.type.lower() == b"text"

    encoding = _parse_token(part.first(data, "content-transfer-encoding") or b"")
    fields = [
        media,
        _params(params, default_charset=text),
        nstring(part.first(data, "content-id")),
        nstring(part.first(data, "content-description")),
        string(encoding) if encoding else b'"7bit"',
        b"%d" % (part.end - part.header_end),
    ]
    if text:
        fields.append(b"%d" % data.count(b"\n", part.header_end, part.end))
    elif part.kind == _MESSAGE:
        child = part.children[0]
        fields.append(_envelope(data, child.fields))
        fields.append(_body(data, child, extended))
        fields.append(b"%d" % data.count(b"\n", part.header_end, part.end))
    if extended:
        fields.append(nstring(part.first(data, "content-md5")))
        fields.append(_extension(data, part))
    return b"(" + b" ".join(fields) + b")"


# -- the message -----------------------------------------------------------


class Message:
    """One stored message, read the way IMAP FETCH and SEARCH need it.

    ``data`` must be the whole message with CRLF line ends (see
    :func:`to_crlf`); nothing is parsed until a method needs it.
    """

    __slots__ = ("data", "size", "_root", "_tree_built")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self._root: _Part | None = None
        self._tree_built = False

    def _top(self) -> _Part:
        """The root part with its header parsed (and no more)."""
        if self._root is None:
            end = _blank_line_end(self.data, 0, len(self.data))
            if end < 0:
                end = len(self.data)
            self._root = _Part(self.data, 0, end, 0, mime=False)
        return self._root

    def _tree(self) -> _Part:
        """The root part with the whole MIME tree below it, built once."""
        root = self._top()
        if not self._tree_built:
            self._tree_built = True
            root.read_mime(self.data)
            parser = _Parser(self.data)
            parser.parts = 1
            parser.body(root, None, (), digest=False)
        return root

    # FETCH

    def envelope(self) -> bytes:
        """The parenthesised ENVELOPE (RFC 3501 7.4.2).

        Values are the raw header values, unfolded and not decoded; Sender
        and Reply-To default to From; groups use the RFC 3501 group form.
        An address without a mailbox or host gets Dovecot's
        ``MISSING_MAILBOX`` / ``MISSING_DOMAIN`` (a NIL host means a group).
        """
        return _envelope(self.data, self._top().fields)

    def bodystructure(self, *, extended: bool = True) -> bytes:
        """BODYSTRUCTURE, or BODY when ``extended`` is false (RFC 3501 7.4.2)."""
        return _body(self.data, self._tree(), extended)

    def section(
        self, part: tuple[int, ...], kind: str = "", fields: tuple[str, ...] = ()
    ) -> bytes:
        """The octets of ``BODY[section]`` (RFC 3501 6.4.5).

        ``part`` is the part number (``()`` for the message itself) and
        ``kind`` one of ``""``, ``"HEADER"``, ``"HEADER.FIELDS"``,
        ``"HEADER.FIELDS.NOT"`` (with ``fields``), ``"TEXT"`` and
        ``"MIME"``.  A part that does not exist gives ``b""``, as Dovecot
        answers.
        """
        data = self.data
        if not part and kind == "HEADER" and self._root is None:
            # The usual FETCH of a folder listing: no need to split fields.
            end = _blank_line_end(data, 0, len(data))
            return data if end < 0 else data[:end]
        if not part:
            node = self._top()
            if kind == "":
                return data
            if kind == "MIME":
                return b""
            return self._header_or_text(node, kind, fields)

        node = self._find(part)
        if node is None:
            return b""
        if kind == "":
            return data[node.header_end : node.end]
        if kind == "MIME":
            return data[node.start : node.header_end]
        # HEADER and TEXT of a part name the message it encapsulates.
        if node.kind != _MESSAGE:
            return b""
        return self._header_or_text(node.children[0], kind, fields)

    def _find(self, numbers: tuple[int, ...]) -> _Part | None:
        """The part a section number names, walking the way Dovecot does."""
        node = self._tree()
        last = len(numbers) - 1
        for position, number in enumerate(numbers):
            more = position < last
            if node.kind == _MULTIPART:
                if not 1 <= number <= len(node.children):
                    return None
                node = node.children[number - 1]
            elif number != 1 or (more and node.kind != _MESSAGE):
                return None
            if more and node.kind == _MESSAGE:
                node = node.children[0]
        return node

    def _header_or_text(self, node: _Part, kind: str, fields: tuple[str, ...]) -> bytes:
        """HEADER, HEADER.FIELDS[.NOT] or TEXT of the message ``node``."""
        data = self.data
        if kind == "HEADER":
            return data[node.start : node.header_end]
        if kind == "TEXT":
            return data[node.header_end : node.end]
        if kind not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return b""
        wanted = {name.lower() for name in fields}
        keep = kind == "HEADER.FIELDS"
        out = []
        for name, start, colon, end in node.fields:
            if (colon >= 0 and name in wanted) == keep:
                line = data[start:end]
                out.append(line if line.endswith(b"\n") else line + b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    # Header values

    def header_values(self, name: str) -> list[str]:
        """The unfolded raw values of every top-level ``name`` field."""
        name = name.lower()
        data = self.data
        return [
            _field_value(data, field).decode("utf-8", "replace")
            for field in self._top().fields
            if field[0] == name and field[2] >= 0
        ]

    def sent_date(self) -> datetime.date | None:
        """The date of the Date: header, in the header's own time zone.

        SENTBEFORE, SENTON and SENTSINCE compare dates only (RFC 3501
        6.4.4); None when there is no parsable Date.
        """
        values = self.header_values("date")
        if not values:
            return None
        try:
            return parsedate_to_datetime(values[0].strip()).date()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None

    # SEARCH

    def header_contains(self, name: str, needle: str) -> bool:
        """Whether a top-level ``name`` field (any field for ``""``) holds ``needle``.

        Values are compared decoded (RFC 2047), casefolded and with white
        space runs as one space; address fields also match on the decoded
        ``Name <mailbox@host>`` form of each address.
        """
        needle = _folded(needle)
        name = name.lower()
        data = self.data
        if name and self._root is None:
            # One field looked for (SEARCH SUBJECT): find just those.
            end = _blank_line_end(data, 0, len(data))
            fields = _named_fields(data, len(data) if end < 0 else end, name)
        else:
            fields = self._top().fields
        for field in fields:
            if field[2] < 0 or (name and field[0] != name):
                continue
            raw = _field_value(data, field)
            if needle in _folded(_decode_header(raw)):
                return True
            if field[0] in _ADDRESS_HEADERS:
                for display in _display_forms(raw):
                    if needle in _folded(display):
                        return True
        return False

    def body_contains(self, needle: str) -> bool:
        """Whether any text part's decoded content holds ``needle``.

        Content-Transfer-Encoding (base64, quoted-printable) and the
        charset are undone; encapsulated messages are searched too.
        """
        needle = _folded(needle)
        data = self.data
        return any(
            needle in _folded(_decoded_body(data, leaf))
            for leaf in _text_leaves(self._tree())
        )

    def text_contains(self, needle: str) -> bool:
        """SEARCH TEXT: ``needle`` in the header or the body."""
        return self.header_contains("", needle) or self.body_contains(needle)


def _display_forms(raw: bytes) -> list[str]:
    """Each address of a field as ``Name <mailbox@host>``, name decoded."""
    forms = []
    for name, _, mailbox, host in _parse_addresses(raw):
        if mailbox is None or host is None:
            continue
        address = (mailbox + b"@" + host).decode("utf-8", "replace")
        if name:
            forms.append(f"{_decode_header(name)} <{address}>")
        else:
            forms.append(address)
    return forms


def _text_leaves(part: _Part) -> Iterator[_Part]:
    """Every text leaf below ``part``, through multiparts and messages."""
    if part.is_text():
        yield part
    for child in part.children:
        yield from _text_leaves(child)


def _decoded_body(data: bytes, part: _Part) -> str:
    """A text part's body as text: transfer encoding and charset undone."""
    body = data[part.header_end : part.end]
    encoding = (
        _parse_token(part.first(data, "content-transfer-encoding") or b"") or b""
    ).lower()
    if encoding == b"base64":
        body = _decode_base64(body)
    elif encoding == b"quoted-printable":
        body = binascii.a2b_qp(body)
    charset = None
    if part.content_type is not None:
        value = part.content_type.param(b"charset")
        if value is None:
            extended = part.content_type.param(b"charset*")
            value = extended.split(b"'")[0] if extended else None
        if value:
            charset = value.strip().decode("ascii", "replace").lower()
    return _decode_text(body, charset)
