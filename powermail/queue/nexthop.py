"""Next hops: where the queue sends a message, and which addresses to try.

A next hop is written the way Postfix writes a relay host: a domain, whose
MX records are looked up; ``[name]``, whose own addresses are used and no MX;
or an IP address, used as it is; each optionally followed by ``:port``.
The resolver turns a next hop into the ordered list of addresses that
RFC 5321 section 5.1 describes, or into a NextHopError that says whether
trying again later can help.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import (
    AuthoritativeDomainError,
    DNSNameError,
    DNSQueryRefusedError,
    DNSServerError,
)

from powermail.address import AddressError, normalise_domain

__all__ = [
    "NextHop",
    "NextHopError",
    "NextHopResolver",
    "Target",
    "make_resolver",
    "parse_next_hop",
]

_log = Logger()

_PORT = re.compile(r"[0-9]{1,5}")
_NUMERIC_LABELS = re.compile(r"[0-9.]+")


@dataclass(frozen=True)
class NextHop:
    """A destination: ``host`` with MX lookup, or as it is when ``mx`` is false.

    ``host`` is a lower-case A-label name or an IP address (no brackets).
    An IP address is always used as it is, whatever ``mx`` says.
    """

    host: str
    port: int = 25
    mx: bool = True

    @property
    def is_ip(self) -> bool:
        """Whether ``host`` is an IP address rather than a name."""
        return _ip_or_none(self.host) is not None

    def __str__(self) -> str:
        host = self.host if self.mx and not self.is_ip else f"[{self.host}]"
        return host if self.port == 25 else f"{host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """One address to connect to, in the order NextHopResolver gives them.

    ``hostname`` is the name a TLS certificate is checked against: the MX
    host, the ``[name]`` of the next hop, or the IP address of an IP hop.
    ``preference`` is the MX preference, 0 without MX.
    """

    address: str
    port: int
    hostname: str
    preference: int


class NextHopError(Exception):
    """A next hop that cannot be resolved.

    ``permanent`` says whether the message should bounce (no such domain, a
    null MX) or wait for a later attempt (a timeout, a failing DNS server).
    ``status`` is the enhanced status code for the report (RFC 3463).
    """

    def __init__(
        self, message: str, permanent: bool, *, status: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.status = status or ("5.4.4" if permanent else "4.4.3")


def parse_next_hop(text: str, *, default_port: int = 25) -> NextHop:
    """Parse a next hop in Postfix syntax; ValueError says what is wrong.

    A hop that names no port gets ``default_port`` (``queue.smtp_port``).

    ``example.com`` and ``example.com:2525`` look up MX records;
    ``[mail.example.com]`` and ``[mail.example.com]:2525`` use the name's
    A and AAAA records only; ``192.0.2.1``, ``[192.0.2.1]:25`` and
    ``[2001:db8::1]:2525`` (also ``[IPv6:2001:db8::1]``) are used as they
    are.  An IPv6 address needs brackets when a port follows it.
    """
    if not text:
        raise ValueError("empty next hop")
    if any(ch.isspace() for ch in text):
        raise ValueError(f"next hop {text!r} contains white space")

    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"next hop {text!r} has '[' without ']'")
        inner, rest = text[1:close], text[close + 1 :]
        port = _parse_port(text, rest, default_port)
        if not inner:
            raise ValueError(f"next hop {text!r} has nothing between the brackets")
        ip = _parse_ip(text, inner)
        if ip is not None:
            return NextHop(ip, port, mx=False)
        return NextHop(_parse_name(text, inner), port, mx=False)

    ip = _parse_ip(text, text)
    if ip is not None:
        return NextHop(ip, default_port, mx=False)
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = text, None
    if ":" in host:
        raise ValueError(f"next hop {text!r}: an IPv6 address needs [brackets]")
    port = default_port if port_text is None else _parse_port(text, ":" + port_text, 25)
    if not host:
        raise ValueError(f"next hop {text!r} has no host")
    ip = _parse_ip(text, host)
    if ip is not None:
        return NextHop(ip, port, mx=False)
    return NextHop(_parse_name(text, host), port, mx=True)


def _parse_port(text: str, rest: str, default: int) -> int:
    if not rest:
        return default
    if not rest.startswith(":"):
        raise ValueError(f"next hop {text!r} has text after ']'")
    digits = rest[1:]
    if not _PORT.fullmatch(digits) or not 0 < int(digits) < 65536:
        raise ValueError(f"next hop {text!r} has a bad port {digits!r}")
    return int(digits)


def _parse_ip(text: str, candidate: str) -> str | None:
    """The IP address in ``candidate`` in its usual spelling, or None."""
    if "%" in candidate:
        raise ValueError(f"next hop {text!r}: scoped IPv6 addresses are not allowed")
    if candidate[:5].lower() == "ipv6:":
        try:
            return ipaddress.IPv6Address(candidate[5:]).compressed
        except ValueError:
            raise ValueError(f"next hop {text!r} has a bad IPv6 address") from None
    return _ip_or_none(candidate)


def _ip_or_none(candidate: str) -> str | None:
    try:
        return ipaddress.ip_address(candidate).compressed
    except ValueError:
        return None


def _parse_name(text: str, name: str) -> str:
    # A fully qualified "name." is the same host; one trailing dot is allowed.
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]
    if _NUMERIC_LABELS.fullmatch(name):
        raise ValueError(f"next hop {text!r} is not a valid IP address")
    try:
        return normalise_domain(name)
    except AddressError as exc:
        raise ValueError(f"next hop {text!r} has a bad host name: {exc}") from None


class NextHopResolver:
    """Turn a NextHop into Targets with a twisted.names resolver.

    ``timeout`` is the resolver's retry schedule in seconds (its own default
    when None); ``rng`` shuffles MX hosts of equal preference, as RFC 5321
    section 5.1 asks, and can be seeded for tests.
    """

    def __init__(
        self,
        resolver: IResolver,
        *,
        timeout: Sequence[float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._resolver = resolver
        self._timeout = tuple(timeout) if timeout is not None else None
        self._rng = rng or random.Random()

    def targets_for(self, text: str, *, default_port: int) -> Deferred[list[Target]]:
        """Parse ``text`` and resolve it; a bad next hop is a permanent error."""
        try:
            hop = parse_next_hop(text, default_port=default_port)
        except ValueError as exc:
            return fail(NextHopError(str(exc), permanent=True))
        return self.targets(hop)

    def targets(self, hop: NextHop) -> Deferred[list[Target]]:
        """The addresses to try for ``hop``, best first, or a NextHopError.

        An IP hop gives itself without a DNS query.  For an MX hop the MX
        hosts come in preference order, each with its A then its AAAA
        addresses; a domain without MX records is its own MX (RFC 5321
        section 5.1); a null MX (RFC 7505) and a domain that does not exist
        are permanent errors, a DNS timeout or server failure temporary.
        """
        return Deferred.fromCoroutine(self._targets(hop))

    async def _targets(self, hop: NextHop) -> list[Target]:
        ip = _ip_or_none(hop.host)
        if ip is not None:
            return [Target(ip, hop.port, ip, 0)]
        if not hop.mx:
            addresses = await self._addresses(hop.host)
            return [Target(a, hop.port, hop.host, 0) for a in addresses]

        exchanges = await self._exchanges(hop.host)
        if not exchanges:
            addresses = await self._addresses(hop.host)
            return [Target(a, hop.port, hop.host, 0) for a in addresses]

        # TODO(RFC 5321 section 5.1): drop MX hosts that are this server and
        # those of lower preference, so a misconfigured domain cannot loop.
        settled = await gatherResults(
            [Deferred.fromCoroutine(self._settle(host)) for _, host in exchanges]
        )
        targets = []
        errors = []
        seen = set()
        for (preference, host), (addresses, error) in zip(
            exchanges, settled, strict=True
        ):
            if error is not None:
                errors.append(error)
            for address in addresses:
                if address not in seen:
                    seen.add(address)
                    targets.append(Target(address, hop.port, host, preference))
        if targets:
            _log.debug(
                "next hop {hop}: {count} targets", hop=str(hop), count=len(targets)
            )
            return targets
        reasons = "; ".join(error.message for error in errors)
        permanent = all(error.permanent for error in errors)
        raise NextHopError(
            f"{hop.host}: no MX host has an address ({reasons})", permanent
        )

    async def _exchanges(self, domain: str) -> list[tuple[int, str]]:
        """The MX hosts of ``domain`` in the order to try; [] when it has none."""
        try:
            answers, _, _ = await self._resolver.lookupMailExchange(
                domain, self._timeout
            )
        except Exception as exc:
            raise _lookup_error(domain, "MX", exc) from None

        records = [rr.payload for rr in answers if rr.type == dns.MX]
        if (
            len(records) == 1
            and records[0].preference == 0
            and records[0].name.name in (b"", b".")
        ):
            raise NextHopError(
                f"{domain} accepts no mail (null MX, RFC 7505)",
                permanent=True,
                status="5.1.10",
            )

        best: dict[str, int] = {}
        for record in records:
            host = record.name.name.decode("ascii", "replace").rstrip(".").lower()
            # A "." among other MX records is a broken null MX: skip it.
            if host and record.preference < best.get(host, 65536):
                best[host] = record.preference
        by_preference: dict[int, list[str]] = {}
        for host, preference in sorted(best.items()):
            by_preference.setdefault(preference, []).append(host)
        ordered = []
        for preference in sorted(by_preference):
            hosts = by_preference[preference]
            self._rng.shuffle(hosts)
            ordered.extend((preference, host) for host in hosts)
        return ordered

    async def _settle(self, host: str) -> tuple[list[str], NextHopError | None]:
        try:
            return await self._addresses(host), None
        except NextHopError as error:
            return [], error

    async def _addresses(self, host: str) -> list[str]:
        """The A then AAAA addresses of ``host``; NextHopError when none."""
        results = await DeferredList(
            [
                self._resolver.lookupAddress(host, self._timeout),
                self._resolver.lookupIPV6Address(host, self._timeout),
            ],
            consumeErrors=True,
        )
        addresses = []
        errors = []
        for (ok, value), kind in zip(results, ("A", "AAAA"), strict=True):
            if not ok:
                errors.append(_lookup_error(host, kind, value.value))
                continue
            for rr in value[0]:
                if rr.type == dns.A:
                    address = rr.payload.dottedQuad()
                elif rr.type == dns.AAAA:
                    address = socket.inet_ntop(socket.AF_INET6, rr.payload.address)
                else:
                    continue
                if address not in addresses:
                    addresses.append(address)
        if addresses:
            return addresses
        temporary = [error for error in errors if not error.permanent]
        if temporary:
            raise temporary[0]
        if errors:
            raise errors[0]
        raise NextHopError(f"{host} has no A or AAAA records", permanent=True)


def _lookup_error(name: str, kind: str, exc: BaseException) -> NextHopError:
    """Map a twisted.names failure to a permanent or temporary NextHopError."""
    if isinstance(exc, DNSNameError | AuthoritativeDomainError):
        return NextHopError(
            f"{name} does not exist ({kind} lookup: NXDOMAIN)",
            permanent=True,
            status="5.1.2" if kind == "MX" else "5.4.4",
        )
    # twisted.names raises its own TimeoutError, not the built-in one.
    if isinstance(exc, defer.TimeoutError | TimeoutError):
        reason = "timed out"
    elif isinstance(exc, DNSServerError):
        reason = "server failure (SERVFAIL)"
    elif isinstance(exc, DNSQueryRefusedError):
        reason = "refused"
    else:
        # Anything unexpected is worth another try later, not a bounce.
        reason = f"{type(exc).__name__}: {exc}"
    return NextHopError(f"{kind} lookup of {name} failed: {reason}", permanent=False)


def make_resolver(
    servers: Sequence[tuple[str, int]] | None, *, reactor: object | None = None
) -> IResolver:
    """A resolver that asks ``servers`` (IP, port) only, or the system's.

    With ``servers``, neither /etc/resolv.conf nor the hosts file is read:
    PowerMail's ``[dns] servers`` setting is then the whole truth.  Without,
    the system configuration is used as twisted.names reads it.
    """
    if not servers:
        return client.createResolver()
    checked = []
    for host, port in servers:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"DNS server {host!r} is not an IP address") from None
        if not 0 < port < 65536:
            raise ValueError(f"DNS server port {port} is out of range")
        checked.append((host, port))
    # resolv=None: client.Resolver then never opens a resolv.conf.
    return client.Resolver(resolv=None, servers=checked, reactor=reactor)
