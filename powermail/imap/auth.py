"""Who may read which Maildir: a twisted.cred portal over the directory.

The checker verifies a full address and its password against the current
directory (argon2id, in a worker thread: a hash costs tens of milliseconds).
The realm hands out the mailbox's :class:`~powermail.storage.maildirpp.UserMail`,
so a session can only ever reach the Maildir of the address it logged in as.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from zope.interface import Interface, implementer

from powermail.directory import Directory
from powermail.passwords import hash_password, verify_password
from powermail.storage.maildirpp import UserMail

__all__ = ["IMailUser", "MailUser", "make_portal"]


class IMailUser(Interface):
    """The avatar of an IMAP login: one mailbox's address and its mail."""


@implementer(IMailUser)
@dataclass
class MailUser:
    """A logged-in mailbox: ``address`` its key, ``mail`` its folders."""

    address: str
    mail: UserMail


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    """A hash no password matches, with the cost of a real one."""
    if not _DUMMY:
        _DUMMY.append(hash_password(os.urandom(24).hex()))
    return _DUMMY[0]


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """Checks a login (full address) and password against the directory.

    Only local mailboxes with a password may log in: a redirect mailbox has
    no mail here.  Every refusal is the same UnauthorizedLogin, so a client
    cannot learn which addresses exist.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)  # noqa: N815 (cred's name)

    def __init__(
        self,
        directory: Callable[[], Directory],
        run_blocking: Callable[..., defer.Deferred] = deferToThread,
    ) -> None:
        self._directory = directory
        self._run_blocking = run_blocking

    def requestAvatarId(self, creds):  # noqa: N802 (cred's name)
        login = creds.username
        password = creds.password
        if isinstance(login, bytes):
            login = login.decode("utf-8", "replace")
        if isinstance(password, str):
            password = password.encode("utf-8")
        mailbox = self._directory().lookup_login(login)
        known = (
            mailbox is not None
            and mailbox.mode == "local"
            and bool(mailbox.password_hash)
        )
        # An unknown login costs a hash too, so the time of the answer does
        # not tell which addresses exist.
        stored = mailbox.password_hash if known else _dummy_hash()

        def check() -> bool:
            return verify_password(stored, password.decode("utf-8", "replace"))

        def decide(ok: bool):
            if not ok or not known:
                raise error.UnauthorizedLogin()
            return mailbox.key

        return self._run_blocking(check).addCallback(decide)


@implementer(portal.IRealm)
class MailRealm:
    """Gives the mailbox whose key was checked its UserMail."""

    def __init__(self, maildir_for: Callable[[str], object]) -> None:
        self._maildir_for = maildir_for

    def requestAvatar(self, avatar_id, mind, *interfaces):  # noqa: N802
        if IMailUser not in interfaces:
            raise NotImplementedError("PowerMail's realm serves IMailUser only")
        key = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        user = MailUser(key, UserMail(self._maildir_for(key)))
        return IMailUser, user, lambda: None


def make_portal(
    directory: Callable[[], Directory],
    maildir_for: Callable[[str], object],
    *,
    run_blocking: Callable[..., defer.Deferred] = deferToThread,
) -> portal.Portal:
    """The portal IMAP logins go through."""
    checker = DirectoryChecker(directory, run_blocking)
    return portal.Portal(MailRealm(maildir_for), [checker])
