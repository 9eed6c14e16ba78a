"""Email addresses as SMTP carries them: parsing, normalising and formatting.

The grammar is RFC 5321 section 4.1.2, widened by RFC 6531 for SMTPUTF8
(UTF-8 in local parts and domains).  Twisted's own parser refuses UTF-8 and
address literals and appends the host name to bare local parts, so PowerMail
parses paths itself.  The parser only judges syntax; whether an address is
ours, or an attempt to relay, is the directory's and the MX policy's question.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = [
    "Address",
    "AddressError",
    "normalise_domain",
    "parse_address",
    "parse_path",
]

# RFC 5322 atext, the characters of an unquoted local part.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+")
_LDH_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAX_LOCAL = 64
_MAX_DOMAIN = 255


class AddressError(ValueError):
    """An address that cannot be parsed.

    ``routing`` is true when the text looks like an attempt to route mail
    through us (several ``@``, a trailing ``@``): the MX answers those as a
    relay attempt rather than as a plain syntax error.
    """

    def __init__(self, reason: str, *, routing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.routing = routing


@dataclass(frozen=True)
class Address:
    """A parsed mailbox: ``local`` unquoted, ``domain`` in lower-case A-labels.

    ``domain`` is ``None`` only for the bare ``<postmaster>`` that RFC 5321
    section 4.1.1.3 requires a server to accept.  ``literal`` is true for an
    address literal such as ``[192.0.2.1]``.
    """

    local: str
    domain: str | None
    literal: bool = False

    @property
    def is_utf8(self) -> bool:
        """Whether the address needs SMTPUTF8 to travel."""
        return not self.local.isascii()

    @property
    def local_key(self) -> str:
        """The local part as PowerMail compares it: NFC, case-folded."""
        return unicodedata.normalize("NFC", self.local).casefold()

    @property
    def key(self) -> str:
        """The whole address as PowerMail compares it."""
        if self.domain is None:
            return self.local_key
        return f"{self.local_key}@{self.domain}"

    def __str__(self) -> str:
        local = self.local
        if not _is_dot_string(local):
            escaped = local.replace("\\", "\\\\").replace('"', '\\"')
            local = f'"{escaped}"'
        if self.domain is None:
            return local
        return f"{local}@{self.domain}"


def _is_dot_string(local: str) -> bool:
    return all(_ATEXT.fullmatch(atom) for atom in local.split("."))


def normalise_domain(domain: str) -> str:
    """Return ``domain`` in lower-case A-label form, or raise AddressError.

    U-labels are converted with IDNA 2008 (UTS 46 mapping), so that
    ``exämple.test`` and ``xn--exmple-cua.test`` compare equal.
    """
    if not domain:
        raise AddressError("empty domain")
    if domain.endswith("."):
        raise AddressError("domain ends with a dot")
    if len(domain) > _MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise AddressError(f"invalid internationalised domain: {exc}") from None
    labels = domain.lower().split(".")
    for label in labels:
        if not _LDH_LABEL.match(label):
            raise AddressError(f"invalid domain label {label!r}")
    return ".".join(labels)


def _parse_literal(text: str) -> str:
    inner = text[1:-1]
    # Python's parser takes a "%scope" suffix of any text; a literal has none.
    if "%" in inner:
        raise AddressError("invalid address literal")
    if inner.lower().startswith("ipv6:"):
        try:
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        except ValueError:
            raise AddressError("invalid IPv6 address literal") from None
    try:
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("invalid address literal") from None


def _split_local(text: str) -> tuple[str, str]:
    """Split ``local@domain`` at the ``@`` that ends the local part."""
    if text.startswith('"'):
        out = []
        i = 1
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                if i + 1 >= len(text) or not (" " <= text[i + 1] <= "~"):
                    raise AddressError("bad quoted pair in local part")
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                break
            if ch < " " or ch == "\x7f":
                raise AddressError("control character in quoted local part")
            out.append(ch)
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        rest = text[i + 1 :]
        if not rest.startswith("@") and rest:
            raise AddressError("text after quoted local part")
        return "".join(out), rest
    at = text.find("@")
    if at < 0:
        return text, ""
    local = text[:at]
    if not local:
        raise AddressError("empty local part")
    for atom in local.split("."):
        if not _ATEXT.fullmatch(atom):
            raise AddressError("invalid character or dot in local part")
    return local, text[at:]


def parse_address(text: str, *, allow_utf8: bool = True) -> Address:
    """Parse a mailbox (``local@domain``, no angle brackets)."""
    if not allow_utf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    local, rest = _split_local(text)
    if not rest:
        if local.lower() == "postmaster":
            return Address("postmaster", None)
        raise AddressError("address has no domain")
    domain_text = rest[1:]
    if "@" in domain_text or not domain_text:
        raise AddressError("address has more than one @", routing=True)
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise AddressError("local part longer than 64 octets")
    if domain_text.startswith("[") and domain_text.endswith("]"):
        return Address(local, _parse_literal(domain_text), literal=True)
    return Address(local, normalise_domain(domain_text))


def parse_path(text: str, *, allow_utf8: bool, allow_null: bool) -> Address | None:
    """Parse an SMTP path in angle brackets; ``None`` stands for ``<>``.

    A source route (``<@relay.example:user@domain>``) is accepted and its
    hops ignored, as RFC 5321 section 4.1.1.3 asks of a receiver.
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return None
        raise AddressError("null address not allowed here")
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("source route without a colon", routing=True)
        for hop in inner[:colon].split(","):
            if not hop.startswith("@") or len(hop) < 2:
                raise AddressError("malformed source route", routing=True)
            if not hop.startswith("@["):
                normalise_domain(hop[1:])
        inner = inner[colon + 1 :]
    return parse_address(inner, allow_utf8=allow_utf8)
