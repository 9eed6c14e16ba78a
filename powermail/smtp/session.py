"""Per-connection and per-transaction state of an SMTP session.

One Session per connection; one Envelope per mail transaction, replaced by
RSET, EHLO/HELO, STARTTLS and after every DATA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from powermail.address import Address

__all__ = ["Envelope", "Forward", "Recipient", "Session"]


@dataclass
class Session:
    """What is known of the client on this connection."""

    peer_ip: str
    peer_port: int
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_description: str | None = None
    errors: int = 0
    messages: int = 0

    @property
    def peer(self) -> str:
        return f"[{self.peer_ip}]:{self.peer_port}"


@dataclass(frozen=True)
class Forward:
    """A copy to send on: to ``recipient`` through ``next_hop``."""

    recipient: str
    next_hop: str
    tls: str = "opportunistic"


@dataclass(frozen=True)
class Recipient:
    """An accepted recipient and what the policy decided to do with it.

    ``maildirs`` are the folders a local delivery writes into; ``forwards``
    the copies that go into the outbound queue.
    """

    address: Address
    maildirs: tuple = ()
    forwards: tuple[Forward, ...] = ()


@dataclass
class Envelope:
    """One mail transaction: sender, parameters and accepted recipients."""

    sender: Address | None
    smtputf8: bool = False
    body: str = "7BIT"
    declared_size: int | None = None
    recipients: list[Recipient] = field(default_factory=list)
    refused_recipients: int = 0
