"""The MX policy: which recipients port 25 accepts, and where their mail goes.

The protocol (``smtp.protocol``) owns syntax and sequence; this handler owns
the decisions, one hook per stage.  No client is trusted by its address:
loopback relays no more than anyone else.  Each accepted recipient reaches
local mailboxes (stored in their Maildirs) and redirect mailboxes (queued
for their next hop); one message may do both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from powermail.address import Address
from powermail.directory import Directory
from powermail.queue.store import QueuedMessage, QueuedRecipient, QueueStore
from powermail.smtp import replies
from powermail.smtp.replies import SmtpError
from powermail.smtp.session import Envelope, Forward, Recipient, Session
from powermail.storage.maildir import MaildirStore

__all__ = ["MxPolicy"]

# Local parts that ask a later hop to route the mail on (the percent hack,
# bang paths, an address hidden in a quoted local part).
_ROUTING_CHARACTERS = ("%", "!", "@")


class MxPolicy:
    """Accepts mail for hosted domains only; stores or queues it.

    ``directory`` is called for every recipient, so that a reloaded
    configuration applies to the next RCPT without a restart.  ``queued``
    is told of every message committed to the queue, to try it at once.
    """

    def __init__(
        self,
        *,
        directory: Callable[[], Directory],
        store: MaildirStore,
        queue: QueueStore | None = None,
        queued: Callable[[QueuedMessage], None] = lambda entry: None,
        verifier: Any = None,
    ) -> None:
        self._directory = directory
        self._store = store
        self._queue = queue
        self._queued = queued
        self._verifier = verifier

    def check_sender(self, session: Session, envelope: Envelope) -> None:
        """Any envelope sender is accepted on the MX, our own domains too.

        The antispam issue scores forged senders; refusing them here would
        refuse legitimate forwarding.
        """

    def check_recipient(
        self, session: Session, envelope: Envelope, address: Address
    ) -> Recipient | defer.Deferred:
        """Accept ``address`` or raise SmtpError with the refusal.

        A recipient that only a catch-all with ``verify_recipients`` takes is
        first checked with the catch-all's next hop (``queue.callout``).
        """
        directory = self._directory()
        if address.domain is not None:
            if address.literal or not directory.is_hosted(address.domain):
                raise SmtpError(replies.RELAY_DENIED.format(address=address))
            if any(ch in address.local for ch in _ROUTING_CHARACTERS):
                raise SmtpError(replies.RELAY_DENIED.format(address=address))
        routes = directory.route(address)
        if not routes:
            raise SmtpError(replies.UNKNOWN_USER.format(address=address))
        first = routes[0]
        if first.catch_all and first.mailbox.verify_recipients and self._verifier:
            d = self._verifier.check(
                first.mailbox.next_hop, first.mailbox.next_hop_tls, str(first.recipient)
            )
            d.addCallback(self._verified, address, routes)
            return d
        return self._recipient(address, routes)

    def _verified(self, outcome: Any, address: Address, routes: tuple) -> Recipient:
        if outcome.permanent:
            raise SmtpError(replies.UNKNOWN_USER.format(address=address))
        if not outcome.delivered:
            raise SmtpError(replies.UNVERIFIED.format(address=address))
        return self._recipient(address, routes)

    def _recipient(self, address: Address, routes: tuple) -> Recipient:
        maildirs = []
        forwards = []
        for route in routes:
            mailbox = route.mailbox
            if mailbox.mode == "redirect" and mailbox.next_hop is not None:
                forwards.append(
                    Forward(
                        str(route.recipient), mailbox.next_hop, mailbox.next_hop_tls
                    )
                )
            else:
                maildirs.append(
                    self._store.maildir_for(
                        mailbox.address.domain, mailbox.address.local_key
                    )
                )
        if forwards and self._queue is None:
            raise SmtpError(replies.TEMPORARY_FAILURE)
        return Recipient(address, tuple(maildirs), tuple(forwards))

    def begin_message(
        self,
        session: Session,
        envelope: Envelope,
        *,
        msg_id: str,
        return_path: bytes,
        received: bytes,
    ) -> _Deliveries:
        """Open the deliveries that will receive the message's bytes.

        Local copies get a Return-Path (RFC 5321 4.4: the final delivery
        adds it); copies sent on get only the Received line.
        """
        maildirs = [d for r in envelope.recipients for d in r.maildirs]
        forwards = list(
            dict.fromkeys(f for r in envelope.recipients for f in r.forwards)
        )
        parts: list[Any] = []
        if maildirs:
            local = self._store.begin(maildirs)
            local.write(return_path + received)
            parts.append(local)
        if forwards:
            assert self._queue is not None
            entry = QueuedMessage(
                id=msg_id,
                sender=str(envelope.sender) if envelope.sender else "",
                created=time.time(),
                size=0,
                smtputf8=envelope.smtputf8,
                eight_bit=envelope.body == "8BITMIME" or envelope.smtputf8,
                recipients=[
                    QueuedRecipient(f.recipient, f.next_hop, f.tls) for f in forwards
                ],
            )
            queued = self._queue.begin(entry)
            queued.write(received)
            parts.append(queued)
        return _Deliveries(parts, self._queued)


class _Deliveries:
    """The local and queued copies of one message, written and committed together."""

    def __init__(self, parts: list[Any], queued: Callable[[QueuedMessage], None]):
        self._parts = parts
        self._queued = queued

    def write(self, data: bytes) -> None:
        for part in self._parts:
            part.write(data)

    def commit(self, *, long_lines: bool = False) -> defer.Deferred:
        """Fires once every copy is durable; fails if any copy failed.

        ``long_lines``: the message has lines over 998 octets, which the
        copies sent on must not carry as they are.
        """
        commits = [part.commit(long_lines=long_lines) for part in self._parts]
        if len(commits) == 1:
            # The usual case, one kind of copy: no need to gather.
            d = commits[0]
            d.addCallback(lambda result: self._committed([result]))
            return d
        d = defer.gatherResults(commits, consumeErrors=True)
        d.addCallback(self._committed)
        d.addErrback(lambda failure: failure.value.subFailure)
        return d

    def _committed(self, results: list[Any]) -> None:
        for result in results:
            if isinstance(result, QueuedMessage):
                self._queued(result)

    def abort(self) -> None:
        for part in self._parts:
            part.abort()
