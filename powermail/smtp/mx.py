"""The MX policy: which recipients port 25 accepts, and where their mail goes.

The protocol (``smtp.protocol``) owns syntax and sequence; this handler owns
the decisions, one hook per stage.  No client is trusted by its address:
loopback relays no more than anyone else.
"""

from __future__ import annotations

from collections.abc import Callable

from powermail.address import Address
from powermail.directory import Directory
from powermail.smtp import replies
from powermail.smtp.replies import SmtpError
from powermail.smtp.session import Envelope, Recipient, Session
from powermail.storage.maildir import MaildirDelivery, MaildirStore

__all__ = ["MxPolicy"]

# Local parts that ask a later hop to route the mail on (the percent hack,
# bang paths, an address hidden in a quoted local part).
_ROUTING_CHARACTERS = ("%", "!", "@")


class MxPolicy:
    """Accepts mail for hosted domains only, and stores it in Maildirs.

    ``directory`` is called for every recipient, so that a reloaded
    configuration applies to the next RCPT without a restart.
    """

    def __init__(self, *, directory: Callable[[], Directory], store: MaildirStore):
        self._directory = directory
        self._store = store

    def check_sender(self, session: Session, envelope: Envelope) -> None:
        """Any envelope sender is accepted on the MX, our own domains too.

        The antispam issue scores forged senders; refusing them here would
        refuse legitimate forwarding.
        """

    def check_recipient(
        self, session: Session, envelope: Envelope, address: Address
    ) -> Recipient:
        """Accept ``address`` or raise SmtpError with the refusal."""
        directory = self._directory()
        if address.domain is not None:
            if address.literal or not directory.is_hosted(address.domain):
                raise SmtpError(replies.RELAY_DENIED.format(address=address))
            if any(ch in address.local for ch in _ROUTING_CHARACTERS):
                raise SmtpError(replies.RELAY_DENIED.format(address=address))
        mailboxes = directory.resolve(address)
        if not mailboxes:
            raise SmtpError(replies.UNKNOWN_USER.format(address=address))
        maildirs = tuple(
            self._store.maildir_for(m.address.domain, m.address.local_key)
            for m in mailboxes
        )
        return Recipient(address, maildirs)

    def begin_message(self, session: Session, envelope: Envelope) -> MaildirDelivery:
        """Open the delivery that will receive the message's bytes."""
        maildirs = [d for r in envelope.recipients for d in r.maildirs]
        return self._store.begin(maildirs)
