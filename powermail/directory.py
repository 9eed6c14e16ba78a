"""Who is this address?  Domains, mailboxes, aliases and catch-alls.

The directory is built from the validated configuration and never changed in
place: a reload builds a new one and swaps it in, so a session that holds a
directory sees one consistent view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from powermail.address import Address, AddressError, parse_address

__all__ = ["Directory", "Domain", "Mailbox", "ResolveError", "Route"]

# Alias chains longer than this are refused by the configuration check.
MAX_ALIAS_DEPTH = 8


@dataclass(frozen=True)
class Domain:
    """A hosted domain; ``catch_all`` is the key of its catch-all mailbox."""

    name: str
    catch_all: str | None = None


@dataclass(frozen=True)
class Mailbox:
    """A mailbox: where its mail goes and how its owner logs in.

    A ``redirect`` mailbox sends its mail to ``next_hop`` (Postfix syntax,
    see ``queue.nexthop``) with the TLS policy ``next_hop_tls``.
    """

    address: Address
    mode: str = "local"
    password_hash: str | None = None
    next_hop: str | None = None
    next_hop_tls: str = "opportunistic"
    verify_recipients: bool = False

    @property
    def key(self) -> str:
        return self.address.key


@dataclass(frozen=True)
class Route:
    """One mailbox a recipient reaches, and the address to deliver it under.

    ``recipient`` is the address as given for a direct or catch-all match
    (the next hop of a redirect knows it), the mailbox's own address when an
    alias led there.  ``catch_all`` says the catch-all took it.
    """

    mailbox: Mailbox
    recipient: Address
    catch_all: bool = False


class ResolveError(Exception):
    """An alias that leads nowhere or loops; only a bad configuration has one."""


class Directory:
    """Answers, for an address, which mailboxes receive its mail.

    ``aliases`` maps an address key to the address keys it expands to; a
    target may itself be an alias.  Local parts compare case-insensitively;
    with a ``recipient_delimiter`` of ``+``, ``alice+news@`` reaches ``alice@``.
    """

    def __init__(
        self,
        *,
        domains: Mapping[str, Domain],
        mailboxes: Mapping[str, Mailbox],
        aliases: Mapping[str, tuple[str, ...]],
        recipient_delimiter: str = "",
        default_domain: str | None = None,
    ) -> None:
        self.domains = domains
        self.mailboxes = mailboxes
        self.aliases = aliases
        self.recipient_delimiter = recipient_delimiter
        self.default_domain = default_domain

    def is_hosted(self, domain: str | None) -> bool:
        """Whether mail for ``domain`` is ours to take."""
        return domain is not None and domain in self.domains

    def resolve(self, address: Address) -> tuple[Mailbox, ...] | None:
        """The mailboxes that receive mail for ``address``, or ``None``."""
        routes = self.route(address)
        return None if routes is None else tuple(r.mailbox for r in routes)

    def route(self, address: Address) -> tuple[Route, ...] | None:
        """Where mail for ``address`` goes, or ``None`` for no one here.

        The bare ``<postmaster>`` goes to the default domain's postmaster.
        An unknown local part of a hosted domain goes to its catch-all.
        """
        if address.domain is None:
            if self.default_domain is None:
                return None
            address = Address("postmaster", self.default_domain)
        if not self.is_hosted(address.domain):
            return None
        for key in self._candidate_keys(address):
            if key in self.mailboxes:
                return (Route(self.mailboxes[key], address),)
            found = self.expand(key)
            if found is not None:
                return tuple(Route(m, m.address) for m in found)
        catch_all = self.domains[address.domain].catch_all
        if catch_all is not None and catch_all in self.mailboxes:
            return (Route(self.mailboxes[catch_all], address, catch_all=True),)
        return None

    def _candidate_keys(self, address: Address) -> list[str]:
        keys = [address.key]
        delimiter = self.recipient_delimiter
        if delimiter and delimiter in address.local:
            base = address.local.split(delimiter, 1)[0]
            if base:
                keys.append(Address(base, address.domain).key)
        return keys

    def expand(self, key: str, _depth: int = 0) -> tuple[Mailbox, ...] | None:
        """Expand an address key through aliases into distinct mailboxes."""
        if key in self.mailboxes:
            return (self.mailboxes[key],)
        targets = self.aliases.get(key)
        if targets is None:
            return None
        if _depth >= MAX_ALIAS_DEPTH:
            raise ResolveError(f"alias chain from {key} is too long or loops")
        found: dict[str, Mailbox] = {}
        for target in targets:
            expanded = self.expand(target, _depth + 1)
            if expanded is None:
                raise ResolveError(f"alias target {target} is not a mailbox or alias")
            for mailbox in expanded:
                found.setdefault(mailbox.key, mailbox)
        return tuple(found.values())

    def lookup_login(self, login: str) -> Mailbox | None:
        """The mailbox whose full address is ``login``, for authentication."""
        try:
            address = parse_address(login)
        except AddressError:
            return None
        return self.mailboxes.get(address.key)
