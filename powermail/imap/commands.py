"""What each IMAP command does (RFC 3501 section 6 and the extensions).

One ``Commands`` object per connection holds the session state (not
authenticated, authenticated, selected) and one ``do_*`` coroutine per
command.  A handler reads its arguments with the parser's Cursor, does its
work (file system work in worker threads) and returns the text of its
tagged OK; a refusal is raised (ParseError for BAD, ImapError or the
store's FolderError for NO) and ``_reply_for`` turns it into the tagged
reply.  In the selected state every command first syncs the folder, so a
file dropped into ``new/`` is seen by the very next command.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.cred import credentials, error
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from powermail import __version__
from powermail.imap.auth import IMailUser, MailUser
from powermail.imap.fetch import ResponseTooLargeError, fetch_response, sets_seen
from powermail.imap.parser import Cursor, FetchItem, Literal, ParseError
from powermail.imap.search import search
from powermail.imap.selected import SelectedMailbox, format_flags
from powermail.storage.files import create_private
from powermail.storage.maildir import maildir_name
from powermail.storage.maildirpp import (
    SEPARATOR,
    SPECIAL_USE,
    SYSTEM_FLAGS,
    FolderError,
)

if TYPE_CHECKING:
    from powermail.imap.protocol import ImapServerProtocol

__all__ = ["Commands", "ImapError"]

_log = Logger()

NOT_AUTHENTICATED = "not authenticated"
AUTHENTICATED = "authenticated"
SELECTED = "selected"
_ANY = (NOT_AUTHENTICATED, AUTHENTICATED, SELECTED)
_AUTHED = (AUTHENTICATED, SELECTED)

# FETCH responses are made in a worker thread, at most this many messages
# or (after the message that passes it) this many octets at a time; the next
# batch waits until the client has read the last.
FETCH_BATCH = 100
FETCH_BATCH_OCTETS = 1024 * 1024
# One message's response is made whole, so its size is bounded by the
# number of content items a FETCH may ask for (repeats count once).
MAX_FETCH_SECTIONS = 20
_NO_CONTENT = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"}
_SYSTEM = {flag.upper(): flag for flag in SYSTEM_FLAGS}
_UID_COMMANDS = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"}
# RFC 3501 7.4.1: no EXPUNGE while answering these (their UID forms may).
# COPY and MOVE are held too: their message numbers must mean what the
# client meant when it sent them, not what an expunge just renumbered.
_NO_EXPUNGE_DURING = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE"}
_CHARSETS = {"UTF-8": "utf-8", "US-ASCII": "ascii", "ISO-8859-1": "latin-1"}
_ATOM_SAFE = re.compile(r"[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+\Z")
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


class ImapError(Exception):
    """A refusal with its status (NO or BAD), response code and text."""

    def __init__(self, text: str, *, code: str | None = None, status: str = "NO"):
        super().__init__(text)
        self.text = text
        self.code = code
        self.status = status


def quote_mailbox(name: str) -> str:
    """A mailbox name as an astring: an atom when it can be, else quoted."""
    if _ATOM_SAFE.match(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def printable(text: str) -> str:
    """``text`` for a log line: control characters shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def compact_set(numbers: Iterable[int]) -> str:
    """``1:3,5,7:8``: a sequence set naming ``numbers`` in their order."""
    out: list[str] = []
    run: list[int] = []
    for n in numbers:
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
        run = [n]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}:{run[-1]}")
    return ",".join(out)


class ListPattern:
    """A LIST pattern: ``*`` matches anything, ``%`` anything but ``.``.

    Matching keeps the set of pattern positions reached as the bits of one
    integer (a shift-and automaton), so it takes time in proportion to the
    name's length, whatever the wildcards; a backtracking regular
    expression could take seconds on ``*a*a*a*a*ab``.
    """

    def __init__(self, pattern: str) -> None:
        # A run of wildcards means "*" if it holds one, else "%".
        compact: list[str] = []
        for char in pattern:
            if compact and char in "*%" and compact[-1] in "*%":
                if char == "*":
                    compact[-1] = "*"
                continue
            compact.append(char)
        self.pattern = "".join(compact)
        self._star = self._percent = 0
        self._literal: dict[str, int] = {}
        for i, char in enumerate(compact):
            if char == "*":
                self._star |= 1 << i
            elif char == "%":
                self._percent |= 1 << i
            else:
                self._literal[char] = self._literal.get(char, 0) | 1 << i
        self._wild = self._star | self._percent
        self._accept = 1 << len(compact)

    def fullmatch(self, name: str) -> bool:
        wild = self._wild
        states = 1
        states |= (states & wild) << 1
        for char in name:
            stay = states & (self._star if char == SEPARATOR else wild)
            states = stay | (states & self._literal.get(char, 0)) << 1
            # A wildcard may also match nothing: the next position is live.
            states |= (states & wild) << 1
            if not states:
                return False
        return bool(states & self._accept)


def list_pattern(pattern: str) -> ListPattern:
    return ListPattern(pattern)


class Commands:
    """The state and command handlers of one IMAP session."""

    def __init__(self, proto: ImapServerProtocol) -> None:
        self.proto = proto
        self.state = NOT_AUTHENTICATED
        self.user: MailUser | None = None
        self.selected: SelectedMailbox | None = None
        self.errors = 0
        self.login_failures = 0
        self._idling = False
        self.run_blocking = proto.factory.run_blocking

    # -- state --------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    def plaintext_allowed(self) -> bool:
        """LOGIN and AUTHENTICATE PLAIN: over TLS, or loopback if allowed."""
        from powermail.imap.protocol import is_loopback

        if self.proto.tls:
            return True
        return self.proto.limits.loopback_plaintext and is_loopback(self.proto.peer_ip)

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == NOT_AUTHENTICATED:
            if not self.proto.tls and self.proto.factory.tls_options is not None:
                caps.append("STARTTLS")
            if self.plaintext_allowed():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
            return " ".join(caps)
        caps += ["NAMESPACE", "UIDPLUS", "MOVE", "SPECIAL-USE", "CHILDREN"]
        caps += ["UNSELECT", f"APPENDLIMIT={self.proto.limits.max_literal_size}"]
        return " ".join(caps)

    def spool_path(self):
        """Where a large APPEND literal is written while it arrives."""
        assert self.user is not None
        return self.user.mail.root / "tmp" / f"{maildir_name()}.append"

    def count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.proto.limits.max_errors:
            _log.warn("too many bad IMAP commands from {peer}", peer=self.proto.peer)
            self.proto.close(b"* BYE Too many invalid commands\r\n")

    def connection_lost(self) -> None:
        self._deselect()

    def _deselect(self) -> None:
        if self.selected is not None:
            self.proto.factory.notifier.unwatch(
                self.selected.folder, self.proto.session_id
            )
        self.selected = None
        if self.state == SELECTED:
            self.state = AUTHENTICATED

    # -- dispatch -------------------------------------------------------------

    def run(self, text: bytes, literals: list[Literal]) -> defer.Deferred | None:
        """Run one complete command; its Deferred fires after the tagged reply."""
        cursor = Cursor(text, literals)
        try:
            tag = cursor.tag()
        except ParseError as exc:
            self.proto.send(b"* BAD Error in IMAP command: %s\r\n" % str(exc).encode())
            self.count_error()
            return None
        try:
            cursor.space()
            name = cursor.atom("a command name").upper()
        except ParseError as exc:
            return self._tagged_bad(tag, f"Error in IMAP command: {exc}")
        uid = False
        if name == "UID":
            try:
                cursor.space()
                name = cursor.atom("a command after UID").upper()
            except ParseError as exc:
                return self._tagged_bad(tag, str(exc))
            if name not in _UID_COMMANDS:
                return self._tagged_bad(tag, f"UID {name} is not a command")
            uid = True
        handler = getattr(self, f"do_{name}", None) if name.isalpha() else None
        if handler is None:
            return self._tagged_bad(tag, f"Unknown command {name[:40]}")
        states = _STATES.get(name, _AUTHED)
        if self.state not in states:
            if self.state == NOT_AUTHENTICATED:
                return self._tagged_bad(tag, "Log in first")
            if states == (SELECTED,):
                return self._tagged_bad(tag, "No mailbox selected")
            return self._tagged_bad(tag, f"{name} is not valid in this state")
        coroutine = self._execute(tag, name, uid, handler, cursor)
        return defer.Deferred.fromCoroutine(coroutine)

    def _tagged_bad(self, tag: str, text: str) -> None:
        self.proto.send(f"{tag} BAD {text}\r\n".encode())
        self.count_error()
        return None

    async def _execute(self, tag: str, name: str, uid: bool, handler, cursor) -> None:
        view = self.selected if self.state == SELECTED else None
        allow_expunge = uid or name not in _NO_EXPUNGE_DURING
        try:
            if view is not None:
                try:
                    await self._catch_up(view, allow_expunge=allow_expunge, sync=True)
                except FolderError as exc:
                    if exc.code != "NONEXISTENT":
                        raise
                    # Another session deleted or renamed the folder: there
                    # is no way to tell the client its messages are gone.
                    self._deselect()
                    self.proto.close(
                        b"* BYE The selected mailbox was deleted or renamed\r\n"
                    )
                    return
            text = (
                await handler(tag, cursor, uid) if uid else await handler(tag, cursor)
            )
            if self.selected is not None and self.selected is view:
                await self._catch_up(view, allow_expunge=allow_expunge, sync=False)
        except Exception as exc:  # noqa: BLE001 - every failure gets its reply
            self._reply_for(tag, name, exc)
            return
        if text is not None and not self.proto.closed:
            self.proto.send(f"{tag} {text}\r\n".encode())
        # The budget is for a client that sends nothing but garbage: a
        # command that went through starts it again.
        self.errors = 0

    async def _catch_up(
        self, view: SelectedMailbox, *, allow_expunge: bool, sync: bool
    ) -> None:
        if sync:
            snapshot = await self.run_blocking(
                view.folder.sync, move_new=not view.readonly
            )
        else:
            snapshot = view.folder.snapshot
        if snapshot.uidvalidity != view.uidvalidity:
            self._uidvalidity_changed(view)
        for line in view.catch_up(snapshot, allow_expunge=allow_expunge):
            self.proto.send(line)

    def _uidvalidity_changed(self, view: SelectedMailbox) -> None:
        """The folder's UIDs were given anew (its uidlist was lost): a
        client holding the old ones must not go on (RFC 3501 2.3.1.1)."""
        _log.warn(
            "UIDVALIDITY of {mailbox} changed under a session",
            mailbox=view.folder.name,
        )
        self._deselect()
        self.proto.close(b"* BYE The mailbox's UIDs changed; please reconnect\r\n")
        raise ConnectionError("UIDVALIDITY changed")

    def _reply_for(self, tag: str, name: str, exc: Exception) -> None:
        """The one place a failure becomes a tagged reply."""
        if isinstance(exc, ParseError):
            self._tagged_bad(tag, f"Error in IMAP command {name}: {exc}")
            return
        if isinstance(exc, ImapError):
            code = f"[{exc.code}] " if exc.code else ""
            self.proto.send(f"{tag} {exc.status} {code}{exc.text}\r\n".encode())
            if exc.status == "BAD":
                self.count_error()
            return
        if isinstance(exc, FolderError):
            code = f"[{exc.code}] " if exc.code else ""
            self.proto.send(f"{tag} NO {code}{exc.text}\r\n".encode())
            return
        if isinstance(exc, ConnectionError) and self.proto.closed:
            return
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _log.error(
                "disk full for {mailbox}: {error}", mailbox=self._who(), error=exc
            )
            self.proto.send(f"{tag} NO [OVERQUOTA] Out of disk space\r\n".encode())
            return
        _log.failure(
            "IMAP {command} failed for {mailbox} from {peer}",
            Failure(exc),
            command=name,
            mailbox=self._who(),
            peer=self.proto.peer,
        )
        self.proto.send(
            f"{tag} NO [SERVERBUG] Internal error; the server's log has the "
            f"details\r\n".encode()
        )

    def _who(self) -> str | None:
        return self.user.address if self.user is not None else None

    def _mail(self):
        assert self.user is not None
        return self.user.mail

    # -- any state ----------------------------------------------------------

    async def do_CAPABILITY(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        self.proto.send(f"* CAPABILITY {self.capabilities()}\r\n".encode())
        return "OK Capability completed."

    async def do_NOOP(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        return "OK NOOP completed."

    async def do_LOGOUT(self, tag: str, cursor: Cursor) -> None:  # noqa: N802
        cursor.expect_end()
        self.proto.send(b"* BYE Logging out\r\n")
        self.proto.send(f"{tag} OK Logout completed.\r\n".encode())
        self.proto.close()
        return None

    async def do_ID(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        params = cursor.id_params()
        cursor.expect_end()
        if params:
            _log.debug(
                "IMAP client from {peer} says it is {client}",
                peer=self.proto.peer,
                client=dict(params),
            )
        self.proto.send(
            f'* ID ("name" "PowerMail" "version" "{__version__}")\r\n'.encode()
        )
        return "OK ID completed."

    # -- not authenticated --------------------------------------------------

    async def do_STARTTLS(self, tag: str, cursor: Cursor) -> str | None:  # noqa: N802
        cursor.expect_end()
        if self.proto.tls:
            raise ImapError("TLS is already active", status="BAD")
        if self.proto.factory.tls_options is None:
            raise ImapError("TLS is not available here")
        self.proto.send(f"{tag} OK Begin TLS negotiation now.\r\n".encode())
        self.proto.discard_pending_input()
        self.proto.transport.startTLS(self.proto.factory.tls_options)
        self.proto.tls = True
        return None

    async def do_LOGIN(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        login = cursor.astring("a user name")
        cursor.space()
        password = cursor.astring("a password")
        cursor.expect_end()
        if not self.plaintext_allowed():
            raise ImapError(
                "Plaintext login is disabled: use STARTTLS or the IMAPS port first",
                code="PRIVACYREQUIRED",
            )
        return await self._login(login, password)

    async def do_AUTHENTICATE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        mechanism = cursor.atom("a SASL mechanism").upper()
        initial = None
        if cursor.maybe_space():
            initial = cursor.atom("an initial response").encode()
        cursor.expect_end()
        if mechanism != "PLAIN":
            raise ImapError(f"Unsupported mechanism {mechanism[:20]}")
        if not self.plaintext_allowed():
            raise ImapError(
                "Plaintext authentication is disabled: use STARTTLS or the IMAPS port",
                code="PRIVACYREQUIRED",
            )
        if initial is None:
            self.proto.send(b"+ \r\n")
            initial = await self.proto.wait_for_line()
        if initial == b"*":
            raise ImapError("Authentication cancelled", status="BAD")
        if initial == b"=":
            initial = b""
        try:
            decoded = base64.b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            raise ImapError("Invalid base64 in SASL response", status="BAD") from None
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            raise ImapError("Invalid SASL PLAIN response", status="BAD")
        authzid, login, password = parts
        if authzid and authzid != login:
            return await self._login_failed(login, "authorization identity")
        return await self._login(login, password)

    async def _login(self, login: bytes, password: bytes) -> str:
        text = login.decode("utf-8", "replace")
        creds = credentials.UsernamePassword(text, password.decode("utf-8", "replace"))
        try:
            _, avatar, _ = await self.proto.factory.portal.login(creds, None, IMailUser)
        except error.UnauthorizedLogin:
            return await self._login_failed(login, "bad credentials")
        await self.run_blocking(avatar.mail.prepare)
        self.user = avatar
        self.state = AUTHENTICATED
        self.proto.logged_in()
        _log.info(
            "IMAP login {mailbox} from {peer}",
            mailbox=avatar.address,
            peer=self.proto.peer,
        )
        return f"OK [CAPABILITY {self.capabilities()}] Logged in"

    async def _login_failed(self, login: bytes, why: str) -> str:
        self.login_failures += 1
        _log.warn(
            "failed IMAP login for {login} from {peer}: {why}",
            login=printable(login.decode("utf-8", "replace")[:100]),
            peer=self.proto.peer,
            why=why,
        )
        delay = self.proto.limits.login_failure_delay
        if delay:
            await task.deferLater(self.proto.factory.clock, delay, lambda: None)
        if self.login_failures >= self.proto.limits.max_login_failures:
            self.proto.send(b"* BYE Too many failed logins\r\n")
            self.proto.close()
            return None
        raise ImapError("Authentication failed.", code="AUTHENTICATIONFAILED")

    # -- authenticated ------------------------------------------------------

    async def do_ENABLE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        cursor.atom("a capability")
        while cursor.maybe_space():
            cursor.atom("a capability")
        cursor.expect_end()
        # None of the extensions ENABLE can switch on (CONDSTORE, QRESYNC,
        # UTF8=ACCEPT) is offered, so none is enabled.
        self.proto.send(b"* ENABLED\r\n")
        return "OK Enabled."

    async def do_NAMESPACE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        self.proto.send(f'* NAMESPACE (("" "{SEPARATOR}")) NIL NIL\r\n'.encode())
        return "OK Namespace completed."

    async def do_SELECT(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        return await self._select(cursor, readonly=False)

    async def do_EXAMINE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        return await self._select(cursor, readonly=True)

    async def _select(self, cursor: Cursor, *, readonly: bool) -> str:
        cursor.space()
        name = cursor.mailbox()
        cursor.expect_end()
        self._deselect()
        mail = self._mail()
        folder = await self.run_blocking(mail.folder, name)
        snapshot = await self.run_blocking(folder.sync, move_new=not readonly)
        view = SelectedMailbox(folder, snapshot, readonly=readonly)
        keywords = sorted(
            {f for e in snapshot.entries for f in e.flags if not f.startswith("\\")}
        )
        flags = " ".join(list(SYSTEM_FLAGS) + keywords)
        send = self.proto.send
        send(f"* FLAGS ({flags})\r\n".encode())
        permanent = "" if readonly else f"{flags} \\*"
        send(f"* OK [PERMANENTFLAGS ({permanent})] Flags permitted.\r\n".encode())
        send(b"* %d EXISTS\r\n" % view.exists)
        send(b"* %d RECENT\r\n" % len(view.recent))
        for seq, entry in enumerate(snapshot.entries, start=1):
            if "\\Seen" not in entry.flags:
                send(b"* OK [UNSEEN %d] First unseen.\r\n" % seq)
                break
        send(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % snapshot.uidvalidity)
        send(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % snapshot.next_uid)
        self.selected = view
        self.state = SELECTED
        if readonly:
            return "OK [READ-ONLY] Examine completed."
        return "OK [READ-WRITE] Select completed."

    async def do_CREATE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        name = cursor.mailbox()
        cursor.expect_end()
        # A trailing separator only says inferiors will follow (RFC 3501 6.3.3).
        if name.endswith(SEPARATOR) and len(name) > 1:
            name = name[:-1]
        if name == "INBOX" or name.upper() == "INBOX":
            raise ImapError("INBOX always exists", code="ALREADYEXISTS")
        await self.run_blocking(self._mail().create, name)
        return "OK Create completed."

    async def do_DELETE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        name = cursor.mailbox()
        cursor.expect_end()
        if self.selected is not None and self.selected.folder.name == name:
            raise ImapError("Cannot delete the selected mailbox", code="INUSE")
        await self.run_blocking(self._mail().delete, name)
        return "OK Delete completed."

    async def do_RENAME(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        old = cursor.mailbox()
        cursor.space()
        new = cursor.mailbox()
        cursor.expect_end()
        if self.selected is not None and self.selected.folder.name == old:
            raise ImapError("Cannot rename the selected mailbox", code="INUSE")
        await self.run_blocking(self._mail().rename, old, new)
        return "OK Rename completed."

    async def do_SUBSCRIBE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        name = cursor.mailbox()
        cursor.expect_end()
        await self.run_blocking(self._mail().subscribe, name)
        return "OK Subscribe completed."

    async def do_UNSUBSCRIBE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        name = cursor.mailbox()
        cursor.expect_end()
        await self.run_blocking(self._mail().unsubscribe, name)
        return "OK Unsubscribe completed."

    async def do_LIST(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        reference, pattern = self._list_arguments(cursor)
        if pattern == "":
            self.proto.send(f'* LIST (\\Noselect) "{SEPARATOR}" ""\r\n'.encode())
            return "OK List completed."
        mail = self._mail()
        names = await self.run_blocking(mail.folder_names)
        for line in _list_lines("LIST", names, names, reference + pattern):
            self.proto.send(line)
        return "OK List completed."

    async def do_LSUB(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        reference, pattern = self._list_arguments(cursor)
        mail = self._mail()
        names = await self.run_blocking(mail.folder_names)
        subscribed = await self.run_blocking(mail.subscriptions)
        for line in _list_lines(
            "LSUB", subscribed, names, reference + pattern, lsub=True
        ):
            self.proto.send(line)
        return "OK Lsub completed."

    def _list_arguments(self, cursor: Cursor) -> tuple[str, str]:
        cursor.space()
        if cursor.peek() == ord("("):
            raise ParseError("LIST selection options are not supported")
        reference = cursor.list_mailbox()
        cursor.space()
        pattern = cursor.list_mailbox()
        cursor.expect_end()
        return reference, pattern

    async def do_STATUS(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        name = cursor.mailbox()
        cursor.space()
        items = [i.upper() for i in cursor.paren_list(lambda: cursor.atom("an item"))]
        cursor.expect_end()
        if not items:
            raise ParseError("Empty status item list")
        for item in items:
            if item not in _STATUS_ITEMS:
                raise ParseError(f"Unknown status item {item[:20]}")
        mail = self._mail()

        def status() -> dict:
            return mail.folder(name).status()

        counts = await self.run_blocking(status)
        shown = " ".join(f"{item} {counts[item]}" for item in items)
        self.proto.send(f"* STATUS {quote_mailbox(name)} ({shown})\r\n".encode())
        return "OK Status completed."

    async def do_APPEND(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.space()
        name = cursor.mailbox()
        cursor.space()
        flags: list[str] = []
        date = None
        if cursor.peek() == ord("("):
            flags = cursor.flag_list()
            cursor.space()
        if cursor.peek() == ord('"'):
            date = cursor.date_time()
            cursor.space()
        literal = cursor.literal()
        cursor.expect_end()
        stored = _stored_flags(flags)
        if literal.size == 0:
            raise ImapError("An empty message cannot be appended")
        mail = self._mail()
        try:
            folder = await self.run_blocking(mail.folder, name)
        except FolderError as exc:
            if exc.code == "NONEXISTENT":
                raise ImapError(
                    "Mailbox does not exist; create it first", code="TRYCREATE"
                ) from None
            raise

        def append() -> int:
            if literal.spool is not None:
                spooled = literal.finish_blocking()
                # It arrived before the folder was known: move it into the
                # folder's own tmp/ (one file system, so a rename).
                path = folder.tmp_path()
                os.rename(spooled, path)
            else:
                path = folder.tmp_path()
                with create_private(path) as file:
                    file.write(literal.bytes())
            return folder.append(path, flags=stored, internaldate=date)

        new_uid = await self.run_blocking(append)
        self.proto.factory.notifier.changed(folder)
        validity = folder.snapshot.uidvalidity
        return f"OK [APPENDUID {validity} {new_uid}] Append completed."

    async def do_IDLE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        view = self.selected
        self.proto.send(b"+ idling\r\n")
        notifier = self.proto.factory.notifier
        if view is not None:

            def tell(snapshot) -> None:
                if self.selected is not view or self.proto.closed:
                    return
                if snapshot is None:
                    self._deselect()
                    self.proto.close(
                        b"* BYE The selected mailbox was deleted or renamed\r\n"
                    )
                    return
                if snapshot.uidvalidity != view.uidvalidity:
                    try:
                        self._uidvalidity_changed(view)
                    except ConnectionError:
                        return
                for line in view.catch_up(snapshot, allow_expunge=True):
                    self.proto.send(line)

            notifier.watch(view.folder, self.proto.session_id, tell)
        try:
            line = await self.proto.wait_for_line()
        finally:
            if view is not None:
                notifier.unwatch(view.folder, self.proto.session_id)
        if line.strip().upper() != b"DONE":
            raise ImapError("Expected DONE to end IDLE", status="BAD")
        return "OK Idle completed."

    # -- selected -------------------------------------------------------------

    def _view(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    def _writable_view(self) -> SelectedMailbox:
        view = self._view()
        if view.readonly:
            raise ImapError("Mailbox is read-only (EXAMINE)", code="READ-ONLY")
        return view

    async def do_CHECK(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        return "OK Check completed."

    async def do_CLOSE(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        view = self._view()
        if not view.readonly:
            deleted = _deleted(view, None)
            if deleted:
                await self.run_blocking(view.folder.expunge, deleted)
                self.proto.factory.notifier.changed(view.folder)
        self._deselect()
        return "OK Close completed."

    async def do_UNSELECT(self, tag: str, cursor: Cursor) -> str:  # noqa: N802
        cursor.expect_end()
        self._deselect()
        return "OK Unselect completed."

    async def do_EXPUNGE(self, tag: str, cursor: Cursor, uid: bool = False) -> str:  # noqa: N802
        only = None
        if uid:
            cursor.space()
            only = set(self._view().resolve(cursor.sequence_set(), uid=True))
        cursor.expect_end()
        view = self._writable_view()
        deleted = _deleted(view, only)
        if deleted:
            removed = await self.run_blocking(view.folder.expunge, deleted)
            for line in view.forget(removed):
                self.proto.send(line)
            self.proto.factory.notifier.changed(view.folder)
        return "OK Expunge completed."

    def _numbers(self, cursor: Cursor, uid: bool) -> list[int]:
        numbers = cursor.sequence_set()
        view = self._view()
        if not uid and not view.valid_numbers(numbers):
            raise ParseError("Invalid messageset (no such message number)")
        return view.resolve(numbers, uid=uid)

    async def do_SEARCH(self, tag: str, cursor: Cursor, uid: bool = False) -> str:  # noqa: N802
        cursor.space()
        codec = "utf-8"
        if cursor.text[cursor.pos : cursor.pos + 8].upper() == b"CHARSET ":
            cursor.pos += 8
            charset = cursor.astring("a charset").decode("ascii", "replace").upper()
            if charset not in _CHARSETS:
                raise ImapError(
                    f"Unsupported charset {charset[:30]}",
                    code="BADCHARSET (" + " ".join(_CHARSETS) + ")",
                )
            codec = _CHARSETS[charset]
            cursor.space()

        def decode(raw: bytes) -> str:
            try:
                return raw.decode(codec)
            except UnicodeDecodeError:
                raise ParseError(f"Search string is not valid {codec}") from None

        keys = cursor.search_keys(decode)
        view = self._view()
        found = await self.run_blocking(search, view, keys)
        numbers = [u if uid else s for s, u in found]
        line = "* SEARCH" + "".join(f" {n}" for n in numbers)
        self.proto.send(line.encode() + b"\r\n")
        return "OK Search completed."

    async def do_FETCH(self, tag: str, cursor: Cursor, uid: bool = False) -> str:  # noqa: N802
        cursor.space()
        uids = self._numbers(cursor, uid)
        cursor.space()
        items = _distinct(cursor.fetch_items())
        cursor.expect_end()
        if sum(1 for i in items if i.name not in _NO_CONTENT) > MAX_FETCH_SECTIONS:
            raise ImapError(
                f"At most {MAX_FETCH_SECTIONS} sections in one FETCH", code="LIMIT"
            )
        view = self._view()
        set_seen = not view.readonly and any(sets_seen(i) for i in items)
        missing = False
        seen_now: set[int] = set()
        too_big: set[int] = set()
        start = 0
        while start < len(uids):
            batch = uids[start : start + FETCH_BATCH]
            lines, told, gone, done = await self.run_blocking(
                _fetch_batch, view, batch, items, set_seen, uid, seen_now, too_big
            )
            start += done
            missing = missing or gone
            for uid_told, flags in told:
                view.note_flags(uid_told, flags)
            for line in lines:
                self.proto.send(line)
            if told:
                self.proto.factory.notifier.changed(view.folder)
            await self.proto.writable()
        if too_big:
            return (
                "NO [LIMIT] Some messages were left out: the sections asked for"
                " add up to far more than the message; ask for fewer at once"
            )
        if missing:
            return "NO [EXPUNGEISSUED] Some of the requested messages no longer exist"
        return "OK Fetch completed."

    async def do_STORE(self, tag: str, cursor: Cursor, uid: bool = False) -> str:  # noqa: N802
        cursor.space()
        uids = self._numbers(cursor, uid)
        cursor.space()
        item = cursor.atom("FLAGS, +FLAGS or -FLAGS").upper()
        silent = item.endswith(".SILENT")
        mode = item.removesuffix(".SILENT")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise ParseError(f"Invalid STORE item {item[:20]}")
        cursor.space()
        flags = _stored_flags(cursor.flag_list(bare_allowed=True))
        cursor.expect_end()
        view = self._writable_view()
        folded = {f.casefold() for f in flags}

        def update(have: frozenset[str]) -> frozenset[str]:
            if mode == "FLAGS":
                return flags
            if mode == "+FLAGS":
                return have | _missing(have, flags)
            # Keywords compare without case, as the store keeps them.
            return frozenset(f for f in have if f.casefold() not in folded)

        snapshot, changed = await self.run_blocking(
            view.folder.update_flags, uids, update
        )
        if changed:
            self.proto.factory.notifier.changed(view.folder)
        now = snapshot.by_uid()
        for u in uids:
            entry = now.get(u)
            if entry is None:
                continue
            if silent:
                # The client takes its own change as done; what another
                # session changed at the same moment it is still told of,
                # by the catch-up after this command.
                view.note_flags(u, update(view.flags.get(u, entry.flags)))
                continue
            view.note_flags(u, entry.flags)
            seq = view.seq_of(u)
            shown = format_flags(entry.flags, recent=view.is_recent(u))
            uid_part = f"UID {u} " if uid else ""
            self.proto.send(f"* {seq} FETCH ({uid_part}FLAGS {shown})\r\n".encode())
        return "OK Store completed."

    async def do_COPY(self, tag: str, cursor: Cursor, uid: bool = False) -> str:  # noqa: N802
        return await self._copy(cursor, uid, move=False)

    async def do_MOVE(self, tag: str, cursor: Cursor, uid: bool = False) -> str:  # noqa: N802
        return await self._copy(cursor, uid, move=True)

    async def _copy(self, cursor: Cursor, uid: bool, *, move: bool) -> str:
        cursor.space()
        uids = self._numbers(cursor, uid)
        cursor.space()
        name = cursor.mailbox()
        cursor.expect_end()
        view = self._writable_view() if move else self._view()
        mail = self._mail()
        try:
            target = await self.run_blocking(mail.folder, name)
        except FolderError as exc:
            if exc.code == "NONEXISTENT":
                raise ImapError(
                    "Mailbox does not exist; create it first", code="TRYCREATE"
                ) from None
            raise
        present = view.folder.snapshot.by_uid()
        uids = [u for u in uids if u in present]
        verb = "Move" if move else "Copy"
        if not uids:
            return f"OK No messages to {verb.lower()}."
        transfer = view.folder.move_to if move else view.folder.copy_to
        pairs = await self.run_blocking(transfer, uids, target)
        self.proto.factory.notifier.changed(target)
        code = ""
        if pairs:
            code = (
                f"[COPYUID {target.snapshot.uidvalidity} "
                f"{compact_set(s for s, _ in pairs)} "
                f"{compact_set(d for _, d in pairs)}] "
            )
        if not move:
            return f"OK {code}Copy completed."
        self.proto.send(f"* OK {code}Moved.\r\n".encode())
        for line in view.forget(s for s, _ in pairs):
            self.proto.send(line)
        self.proto.factory.notifier.changed(view.folder)
        return "OK Move completed."


_STATES: dict[str, tuple[str, ...]] = {
    "CAPABILITY": _ANY,
    "NOOP": _ANY,
    "LOGOUT": _ANY,
    "ID": _ANY,
    "STARTTLS": (NOT_AUTHENTICATED,),
    "LOGIN": (NOT_AUTHENTICATED,),
    "AUTHENTICATE": (NOT_AUTHENTICATED,),
    "ENABLE": (AUTHENTICATED,),
    "CHECK": (SELECTED,),
    "CLOSE": (SELECTED,),
    "UNSELECT": (SELECTED,),
    "EXPUNGE": (SELECTED,),
    "SEARCH": (SELECTED,),
    "FETCH": (SELECTED,),
    "STORE": (SELECTED,),
    "COPY": (SELECTED,),
    "MOVE": (SELECTED,),
}


def _distinct(items: list[FetchItem]) -> list[FetchItem]:
    """The fetch items with repeats left out (each is answered once)."""
    seen: set[tuple] = set()
    out = []
    for item in items:
        key = (item.name, item.peek, item.label)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _stored_flags(flags: list[str]) -> frozenset[str]:
    """Flags a client may set: system flags spelled canonically, keywords."""
    out = set()
    for flag in flags:
        if flag.startswith("\\"):
            canonical = _SYSTEM.get(flag.upper())
            if canonical is None:
                if flag.upper() == "\\RECENT":
                    continue
                raise ParseError(f"Unknown system flag {flag[:30]}")
            out.add(canonical)
        else:
            out.add(flag)
    return frozenset(out)


def _missing(have: frozenset[str], wanted: frozenset[str]) -> frozenset[str]:
    """The flags of ``wanted`` not yet in ``have``, keywords without case."""
    folded = {f.casefold() for f in have}
    return frozenset(f for f in wanted if f.casefold() not in folded)


def _deleted(view: SelectedMailbox, only: set[int] | None) -> list[int]:
    current = view.folder.snapshot.by_uid()
    return [
        u
        for u in view.uids
        if (only is None or u in only)
        and (e := current.get(u)) is not None
        and "\\Deleted" in e.flags
    ]


def _fetch_batch(
    view: SelectedMailbox,
    uids: list[int],
    items: list[FetchItem],
    set_seen: bool,
    with_uid: bool,
    seen_now: set[int],
    too_big: set[int],
) -> tuple[list[bytes], list[tuple[int, frozenset[str]]], bool, int]:
    """FETCH responses for the first of ``uids``, made in a worker thread.

    Returns the lines, the flags each message was shown with, whether some
    message had gone from the disk, and how many of ``uids`` were done.
    ``seen_now`` collects the messages this FETCH has set \\Seen on (their
    responses include FLAGS, RFC 3501 6.4.5), across batches.
    """
    folder = view.folder
    current = folder.snapshot.by_uid()
    if set_seen:
        snapshot, changed = folder.update_flags(uids, lambda have: have | {"\\Seen"})
        current = snapshot.by_uid()
        seen_now.update(changed)
    lines: list[bytes] = []
    told: list[tuple[int, frozenset[str]]] = []
    gone = False
    done = 0
    octets = 0
    for u in uids:
        if octets >= FETCH_BATCH_OCTETS:
            # Enough for the client to read before the next batch is made.
            break
        done += 1
        entry = current.get(u)
        seq = view.seq_of(u)
        if entry is None or seq is None:
            gone = True
            continue
        try:
            lines.append(
                line := fetch_response(
                    folder,
                    entry,
                    seq,
                    items,
                    recent=view.is_recent(u),
                    with_uid=with_uid,
                    with_flags=u in seen_now,
                )
            )
        except FolderError:
            gone = True
            continue
        except ResponseTooLargeError:
            too_big.add(u)
            continue
        octets += len(line)
        if u in seen_now or any(i.name == "FLAGS" for i in items):
            told.append((u, entry.flags))
    return lines, told, gone, done


def _list_lines(
    verb: str,
    shown: Iterable[str],
    existing: Iterable[str],
    pattern: str,
    *,
    lsub: bool = False,
) -> list[bytes]:
    """LIST or LSUB responses for the names matching ``pattern``.

    A name "a.b" implies its parent "a": LIST shows an absent parent as
    \\Noselect, LSUB shows an unsubscribed one only to a ``%`` pattern
    (RFC 3501 6.3.8 and 6.3.9).
    """
    regex = list_pattern(pattern)
    inbox_regex = list_pattern(pattern.upper())
    shown_set = set(shown)
    existing_set = set(existing)
    candidates = set(shown_set)
    if not lsub or "%" in pattern:
        for name in shown_set:
            parts = name.split(SEPARATOR)
            for depth in range(1, len(parts)):
                candidates.add(SEPARATOR.join(parts[:depth]))
    parents = {n.rsplit(SEPARATOR, 1)[0] for n in existing_set if SEPARATOR in n}
    lines = []
    for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
        if not regex.fullmatch(name) and not (
            name == "INBOX" and inbox_regex.fullmatch(name)
        ):
            continue
        attributes = []
        if name not in (shown_set if lsub else existing_set):
            attributes.append("\\Noselect")
        if not lsub:
            attributes.append("\\HasChildren" if name in parents else "\\HasNoChildren")
            if name in SPECIAL_USE and name in existing_set:
                attributes.append(SPECIAL_USE[name])
        quoted = quote_mailbox(name)
        lines.append(
            f'* {verb} ({" ".join(attributes)}) "{SEPARATOR}" {quoted}\r\n'.encode()
        )
    return lines
