"""Recipient verification for a redirect catch-all: ask the next hop first.

Before the MX accepts a recipient that only a catch-all would take, it asks
the catch-all's next hop (an SMTP callout: MAIL FROM:<>, RCPT TO, QUIT) and
refuses at RCPT time what the next hop refuses, so that the company's own
server, not PowerMail, decides which addresses exist, and no bounce is ever
made for a message PowerMail accepted.  A next hop that does not answer, or
answers 4xx, makes a temporary refusal (450), never a 550.  Answers are
cached: a yes for a day, a no for an hour; "don't know" is never cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from powermail.queue.client import RecipientOutcome, verify
from powermail.queue.nexthop import NextHopError, NextHopResolver

__all__ = ["RecipientVerifier"]

_log = Logger()
POSITIVE_TTL = 86400
NEGATIVE_TTL = 3600
CACHE_SIZE = 10_000


class RecipientVerifier:
    """Asks next hops whether recipients exist, and remembers the answers."""

    def __init__(
        self,
        *,
        resolver: NextHopResolver,
        settings: Callable[[], Any],
        reactor: Any,
        trust_root: Any = None,
        probe: Callable[..., defer.Deferred] = verify,
    ) -> None:
        self.resolver = resolver
        self.settings = settings
        self.reactor = reactor
        self.trust_root = trust_root
        self.probe = probe
        self._cache: OrderedDict[tuple[str, str], tuple[float, RecipientOutcome]] = (
            OrderedDict()
        )

    def check(self, next_hop: str, tls: str, recipient: str) -> defer.Deferred:
        """Fires with the next hop's RecipientOutcome for ``recipient``."""
        key = (next_hop, recipient.lower())
        now = self.reactor.seconds()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return defer.succeed(cached[1])
        d = defer.Deferred.fromCoroutine(self._ask(next_hop, tls, recipient))
        d.addCallback(self._remember, key)
        return d

    def _remember(
        self, outcome: RecipientOutcome, key: tuple[str, str]
    ) -> RecipientOutcome:
        if outcome.delivered or outcome.permanent:
            ttl = POSITIVE_TTL if outcome.delivered else NEGATIVE_TTL
            self._cache[key] = (self.reactor.seconds() + ttl, outcome)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return outcome

    async def _ask(self, next_hop: str, tls: str, recipient: str) -> RecipientOutcome:
        config = self.settings()
        try:
            targets = await self.resolver.targets_for(
                next_hop, default_port=config.queue.smtp_port
            )
        except NextHopError as exc:
            return RecipientOutcome(
                recipient, 0, "4.4.3", f"next hop {next_hop}: {exc}"
            )
        outcome = RecipientOutcome(recipient, 0, "4.4.1", f"no address for {next_hop}")
        for target in targets:
            outcome = await self.probe(
                self.reactor,
                host=target.address,
                port=target.port,
                helo=config.server.hostname,
                recipient=recipient,
                tls=tls,
                tls_hostname=target.hostname,
                trust_root=self.trust_root,
                timeout=min(30, config.queue.command_timeout),
                connect_timeout=min(10, config.queue.connect_timeout),
            )
            if not outcome.temporary:
                break
        _log.info(
            "verified <{rcpt}> with {next_hop}: {code} {status} {text}",
            rcpt=recipient,
            next_hop=next_hop,
            code=outcome.code,
            status=outcome.status,
            text=outcome.text,
        )
        return outcome
