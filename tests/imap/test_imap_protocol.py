"""The IMAP protocol over a StringTransport: the exact bytes of each reply.

File system work runs at once instead of in a thread, and time is a
task.Clock, so each exchange is deterministic.  The Maildir is real, in the
test's temporary folder.
"""

from __future__ import annotations

import pytest
from powermail_process import PASSWORD, write_config
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from powermail.config import load_config
from powermail.imap.auth import make_portal
from powermail.imap.notify import FolderNotifier
from powermail.imap.protocol import ImapFactory, ImapLimits
from powermail.storage.maildir import MaildirStore

GREETING_CAPS = b"IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE"


def run_now(function, *args, **kwargs):
    return defer.maybeDeferred(function, *args, **kwargs)


class TlsTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_started = False

    def startTLS(self, options):  # noqa: N802 (Twisted's name)
        self.tls_started = True


class Harness:
    """One protocol instance on a fake transport, over a real Maildir."""

    def __init__(self, tmp_path, *, peer="127.0.0.1", tls=False, **limits):
        config = load_config(write_config(tmp_path / "conf"))
        self.clock = task.Clock()
        self.store = MaildirStore(tmp_path / "mail")

        def maildir_for(key):
            local, _, domain = key.rpartition("@")
            return self.store.maildir_for(domain, local)

        settings = dict(
            loopback_plaintext=True,
            max_literal_size=1024 * 1024,
            max_command_line=8192,
            max_errors=20,
            max_login_failures=3,
            login_failure_delay=2,
            max_connections=10,
            max_connections_per_client=10,
            idle_timeout=1800,
        )
        settings.update(limits)
        self.factory = ImapFactory(
            portal=make_portal(
                lambda: config.directory, maildir_for, run_blocking=run_now
            ),
            limits=ImapLimits(**settings),
            clock=self.clock,
            tls_options=object(),
            notifier=FolderNotifier(self.clock, run_blocking=run_now),
            tls=tls,
            run_blocking=run_now,
        )
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        self.transport = TlsTransport()
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        self.clock.advance(0)
        return self.take()

    def login(self) -> None:
        reply = self.send(f'l LOGIN alice@example.test "{PASSWORD}"\r\n'.encode())
        assert reply.startswith(b"l OK [CAPABILITY IMAP4rev1"), reply

    def deliver(self, data: bytes, name: str) -> None:
        new = self.store.maildir_for("example.test", "alice") / "new"
        new.mkdir(parents=True, exist_ok=True)
        (new / name).write_bytes(data)


@pytest.fixture
def imap(tmp_path):
    return Harness(tmp_path)


def test_greeting_lists_capabilities_with_starttls_and_plain(imap):
    assert imap.greeting == (
        b"* OK [CAPABILITY " + GREETING_CAPS + b" STARTTLS AUTH=PLAIN]"
        b" PowerMail ready.\r\n"
    )


def test_logindisabled_away_from_loopback_and_login_refused(tmp_path):
    remote = Harness(tmp_path, peer="192.0.2.7")
    assert remote.greeting == (
        b"* OK [CAPABILITY " + GREETING_CAPS + b" STARTTLS LOGINDISABLED]"
        b" PowerMail ready.\r\n"
    )
    assert remote.send(b'a LOGIN alice@example.test "x"\r\n') == (
        b"a NO [PRIVACYREQUIRED] Plaintext login is disabled:"
        b" use STARTTLS or the IMAPS port first\r\n"
    )
    assert remote.send(b"b AUTHENTICATE PLAIN AGFsaWNlAHg=\r\n") == (
        b"b NO [PRIVACYREQUIRED] Plaintext authentication is disabled:"
        b" use STARTTLS or the IMAPS port\r\n"
    )


def test_starttls_discards_what_was_pipelined_behind_it(imap):
    reply = imap.send(b"a STARTTLS\r\nb LOGIN alice@example.test x\r\n")
    assert reply == b"a OK Begin TLS negotiation now.\r\n"
    assert imap.transport.tls_started
    assert imap.send(b"c CAPABILITY\r\n") == (
        b"* CAPABILITY " + GREETING_CAPS + b" AUTH=PLAIN\r\n"
        b"c OK Capability completed.\r\n"
    )


def test_over_tls_there_is_no_starttls(tmp_path):
    secure = Harness(tmp_path, peer="192.0.2.7", tls=True)
    assert secure.greeting == (
        b"* OK [CAPABILITY " + GREETING_CAPS + b" AUTH=PLAIN] PowerMail ready.\r\n"
    )
    assert secure.send(b"a STARTTLS\r\n") == b"a BAD TLS is already active\r\n"


def test_bad_syntax_and_unknown_commands(imap):
    assert imap.send(b"\r\n") == (
        b"* BAD Error in IMAP command: Missing or invalid tag\r\n"
    )
    assert imap.send(b"a FROB\r\n") == b"a BAD Unknown command FROB\r\n"
    assert imap.send(b"a SELECT INBOX\r\n") == b"a BAD Log in first\r\n"
    assert imap.send(b"a LOGIN\r\n") == (
        b"a BAD Error in IMAP command LOGIN: Missing arguments\r\n"
    )
    assert imap.send(b'a LOGIN "unterminated\r\n') == (
        b"a BAD Error in IMAP command LOGIN: Unterminated quoted string\r\n"
    )


def test_too_many_bad_commands_hang_up(tmp_path):
    imap = Harness(tmp_path, max_errors=3)
    imap.send(b"a FROB\r\nb FROB\r\n")
    assert imap.send(b"c FROB\r\n") == (
        b"c BAD Unknown command FROB\r\n* BYE Too many invalid commands\r\n"
    )
    assert imap.transport.disconnecting


def test_login_with_a_synchronising_literal(imap):
    assert imap.send(b"a LOGIN {18}\r\n") == b"+ Ready for literal data\r\n"
    reply = imap.send(f'alice@example.test "{PASSWORD}"\r\n'.encode())
    assert reply.startswith(b"a OK [CAPABILITY IMAP4rev1 LITERAL+")
    assert reply.endswith(b"] Logged in\r\n")


def test_literal_plus_needs_no_continuation(imap):
    reply = imap.send(
        b"a LOGIN {18+}\r\nalice@example.test {%d+}\r\n%s\r\n"
        % (len(PASSWORD), PASSWORD.encode())
    )
    assert reply.startswith(b"a OK [CAPABILITY")


def test_failed_login_waits_and_the_third_hangs_up(imap):
    assert imap.send(b"a LOGIN alice@example.test wrong\r\n") == b""
    imap.clock.advance(2)
    assert imap.take() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    imap.send(b"b LOGIN nobody@example.test wrong\r\n")
    imap.clock.advance(2)
    assert imap.take() == b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    imap.send(b"c LOGIN alice@example.test wrong\r\n")
    imap.clock.advance(2)
    assert imap.take() == b"* BYE Too many failed logins\r\n"
    assert imap.transport.disconnecting


def test_authenticate_plain_with_continuation_and_cancel(imap):
    assert imap.send(b"a AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
    assert imap.send(b"*\r\n") == b"a BAD Authentication cancelled\r\n"
    import base64

    token = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode())
    reply = imap.send(b"b AUTHENTICATE PLAIN " + token + b"\r\n")
    assert reply.startswith(b"b OK [CAPABILITY IMAP4rev1")


def test_preauth_literal_limit(imap):
    assert imap.send(b"a LOGIN {100000}\r\n") == (
        b"a NO [TOOBIG] Literal of 100000 octets is over the limit of 8192\r\n"
    )
    assert imap.send(b"b LOGIN {100000+}\r\n") == b"* BYE Literal too large\r\n"
    assert imap.transport.disconnecting


def test_select_reports_the_mailbox(imap):
    imap.deliver(b"Subject: one\r\n\r\nbody\r\n", "1700000000.a.host")
    imap.login()
    reply = imap.send(b"s SELECT INBOX\r\n")
    lines = reply.split(b"\r\n")
    assert lines[0] == b"* FLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen)"
    assert lines[1] == (
        b"* OK [PERMANENTFLAGS (\\Answered \\Deleted \\Draft \\Flagged \\Seen \\*)]"
        b" Flags permitted."
    )
    assert lines[2:5] == [
        b"* 1 EXISTS",
        b"* 1 RECENT",
        b"* OK [UNSEEN 1] First unseen.",
    ]
    assert lines[5].startswith(b"* OK [UIDVALIDITY ")
    assert lines[6] == b"* OK [UIDNEXT 2] Predicted next UID"
    assert lines[7] == b"s OK [READ-WRITE] Select completed."


def test_fetch_exact_bytes_and_partial(imap):
    imap.deliver(b"Subject: one\nTo: a@b.test\n\nbody\n", "1700000000.a.host")
    imap.login()
    imap.send(b"s SELECT INBOX\r\n")
    assert imap.send(b"f FETCH 1 (UID RFC822.SIZE BODY.PEEK[TEXT])\r\n") == (
        b"* 1 FETCH (UID 1 RFC822.SIZE 36 BODY[TEXT] {6}\r\nbody\r\n)\r\n"
        b"f OK Fetch completed.\r\n"
    )
    assert imap.send(b"f FETCH 1 BODY.PEEK[HEADER.FIELDS (subject)]<2.5>\r\n") == (
        b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)]<2> {5}\r\nbject)\r\n"
        b"f OK Fetch completed.\r\n"
    )
    assert imap.send(b"f FETCH 1 (BODY[]<30.100>)\r\n") == (
        b"* 1 FETCH (BODY[]<30> {6}\r\nbody\r\n FLAGS (\\Seen \\Recent))\r\n"
        b"f OK Fetch completed.\r\n"
    )
    assert imap.send(b"f FETCH 2 FLAGS\r\n") == (
        b"f BAD Error in IMAP command FETCH:"
        b" Invalid messageset (no such message number)\r\n"
    )


def test_store_copy_and_expunge_replies(imap):
    imap.deliver(b"Subject: one\r\n\r\nbody\r\n", "1700000000.a.host")
    imap.deliver(b"Subject: two\r\n\r\nbody\r\n", "1700000001.b.host")
    imap.login()
    imap.send(b"s SELECT INBOX\r\n")
    assert imap.send(b"t STORE 1:2 +FLAGS (\\Deleted Work)\r\n") == (
        b"* 1 FETCH (FLAGS (\\Deleted Work \\Recent))\r\n"
        b"* 2 FETCH (FLAGS (\\Deleted Work \\Recent))\r\n"
        b"t OK Store completed.\r\n"
    )
    assert imap.send(b"u UID STORE 2 -FLAGS.SILENT (\\Deleted)\r\n") == (
        b"u OK Store completed.\r\n"
    )
    reply = imap.send(b"c UID COPY 1:* Trash\r\n")
    assert reply.startswith(b"c OK [COPYUID ")
    assert reply.endswith(b" 1:2 1:2] Copy completed.\r\n")
    assert imap.send(b"e EXPUNGE\r\n") == b"* 1 EXPUNGE\r\ne OK Expunge completed.\r\n"
    assert imap.send(b"c COPY 1 Nowhere\r\n") == (
        b"c NO [TRYCREATE] Mailbox does not exist; create it first\r\n"
    )


def test_idle_and_done(imap):
    imap.login()
    imap.send(b"s SELECT INBOX\r\n")
    assert imap.send(b"i IDLE\r\n") == b"+ idling\r\n"
    imap.deliver(b"Subject: new\r\n\r\nbody\r\n", "1700000002.c.host")
    imap.clock.advance(1)
    assert imap.take() == b"* 1 EXISTS\r\n* 1 RECENT\r\n"
    assert imap.send(b"DONE\r\n") == b"i OK Idle completed.\r\n"


def test_list_and_namespace(imap):
    imap.login()
    assert imap.send(b"n NAMESPACE\r\n") == (
        b'* NAMESPACE (("" ".")) NIL NIL\r\nn OK Namespace completed.\r\n'
    )
    assert imap.send(b'l LIST "" ""\r\n') == (
        b'* LIST (\\Noselect) "." ""\r\nl OK List completed.\r\n'
    )
    imap.send(b"c CREATE Archive.2024\r\n")
    assert imap.send(b'l LIST "" %\r\n') == (
        b'* LIST (\\HasNoChildren) "." INBOX\r\n'
        b'* LIST (\\Noselect \\HasChildren) "." Archive\r\n'
        b'* LIST (\\HasNoChildren \\Drafts) "." Drafts\r\n'
        b'* LIST (\\HasNoChildren \\Junk) "." Junk\r\n'
        b'* LIST (\\HasNoChildren \\Sent) "." Sent\r\n'
        b'* LIST (\\HasNoChildren \\Trash) "." Trash\r\n'
        b"l OK List completed.\r\n"
    )


def test_id_enable_and_unselect(imap):
    imap.login()
    assert imap.send(b'i ID ("name" "test")\r\n') == (
        b'* ID ("name" "PowerMail" "version" "'
        + __import__("powermail").__version__.encode()
        + b'")\r\ni OK ID completed.\r\n'
    )
    assert imap.send(b"e ENABLE CONDSTORE\r\n") == b"* ENABLED\r\ne OK Enabled.\r\n"
    assert imap.send(b"u UNSELECT\r\n") == b"u BAD No mailbox selected\r\n"


def test_a_connection_that_never_logs_in_is_closed(imap):
    imap.clock.advance(59)
    assert imap.take() == b""
    imap.clock.advance(1)
    assert imap.take() == b"* BYE Login timeout\r\n"
    assert imap.transport.disconnecting


def test_after_login_only_the_idle_timeout_applies(imap):
    imap.login()
    imap.clock.advance(61)
    assert imap.take() == b""
    assert not imap.transport.disconnecting


def test_a_good_command_starts_the_error_budget_again(tmp_path):
    imap = Harness(tmp_path, max_errors=2)
    for _ in range(5):
        assert imap.send(b"a FROB\r\n") == b"a BAD Unknown command FROB\r\n"
        assert imap.send(b"n NOOP\r\n") == b"n OK NOOP completed.\r\n"
    assert not imap.transport.disconnecting


def test_list_wildcards_match_in_linear_time():
    from powermail.imap.commands import list_pattern

    name = "a" * 200
    assert not list_pattern("*a*a*a*a*a*a*a*a*a*ab").fullmatch(name)
    assert list_pattern("*a*a*a*a*a*a*a*a*a*a").fullmatch(name)
    assert list_pattern("%").fullmatch("Sent")
    assert not list_pattern("%").fullmatch("Archive.2024")
    assert list_pattern("Archive.%").fullmatch("Archive.2024")
    assert list_pattern("*").fullmatch("Archive.2024")
    assert list_pattern("A*4").fullmatch("Archive.2024")
    assert not list_pattern("A%4").fullmatch("Archive.2024")


def test_status_counts_recent_messages_until_a_session_sees_them(imap):
    imap.deliver(b"Subject: one\r\n\r\nbody\r\n", "1700000000.a.host")
    imap.login()
    assert imap.send(b"s STATUS INBOX (MESSAGES RECENT UNSEEN)\r\n") == (
        b"* STATUS INBOX (MESSAGES 1 RECENT 1 UNSEEN 1)\r\ns OK Status completed.\r\n"
    )
    imap.send(b"e SELECT INBOX\r\n")
    assert imap.send(b"s STATUS INBOX (RECENT)\r\n") == (
        b"* STATUS INBOX (RECENT 0)\r\ns OK Status completed.\r\n"
    )


def test_examine_is_read_only(imap):
    imap.deliver(b"Subject: one\r\n\r\nbody\r\n", "1700000000.a.host")
    imap.login()
    reply = imap.send(b"x EXAMINE INBOX\r\n")
    assert b"* OK [PERMANENTFLAGS ()] Flags permitted.\r\n" in reply
    assert b"* 0 RECENT\r\n" in reply
    assert reply.endswith(b"x OK [READ-ONLY] Examine completed.\r\n")
    assert imap.send(b"s STORE 1 +FLAGS (\\Seen)\r\n") == (
        b"s NO [READ-ONLY] Mailbox is read-only (EXAMINE)\r\n"
    )
    assert imap.send(b"f FETCH 1 (BODY[TEXT])\r\n") == (
        b"* 1 FETCH (BODY[TEXT] {6}\r\nbody\r\n)\r\nf OK Fetch completed.\r\n"
    )
    new = imap.store.maildir_for("example.test", "alice") / "new"
    assert [p.name for p in new.iterdir()] == ["1700000000.a.host"]


def test_check_and_close_expunge_silently(imap):
    imap.deliver(b"Subject: one\r\n\r\nbody\r\n", "1700000000.a.host")
    imap.login()
    imap.send(b"s SELECT INBOX\r\n")
    assert imap.send(b"k CHECK\r\n") == b"k OK Check completed.\r\n"
    imap.send(b"t STORE 1 +FLAGS.SILENT (\\Deleted)\r\n")
    assert imap.send(b"c CLOSE\r\n") == b"c OK Close completed.\r\n"
    assert imap.send(b"f FETCH 1 FLAGS\r\n") == b"f BAD No mailbox selected\r\n"
    assert imap.send(b"s STATUS INBOX (MESSAGES)\r\n") == (
        b"* STATUS INBOX (MESSAGES 0)\r\ns OK Status completed.\r\n"
    )


def test_create_rename_delete_subscribe_and_lsub(imap):
    imap.login()
    assert imap.send(b"c CREATE Projects.\r\n") == b"c OK Create completed.\r\n"
    assert imap.send(b"c CREATE Projects\r\n") == (
        b"c NO [ALREADYEXISTS] The folder already exists.\r\n"
    )
    assert imap.send(b"c CREATE inbox\r\n") == (
        b"c NO [ALREADYEXISTS] INBOX always exists\r\n"
    )
    assert imap.send(b"r RENAME Projects Work\r\n") == b"r OK Rename completed.\r\n"
    assert imap.send(b"u SUBSCRIBE Work\r\n") == b"u OK Subscribe completed.\r\n"
    assert imap.send(b'l LSUB "" W*\r\n') == (
        b'* LSUB () "." Work\r\nl OK Lsub completed.\r\n'
    )
    assert imap.send(b"u UNSUBSCRIBE Work\r\n") == b"u OK Unsubscribe completed.\r\n"
    assert imap.send(b'l LSUB "" W*\r\n') == b"l OK Lsub completed.\r\n"
    assert imap.send(b"d DELETE Work\r\n") == b"d OK Delete completed.\r\n"
    assert imap.send(b"d DELETE Work\r\n") == (
        b"d NO [NONEXISTENT] The folder does not exist.\r\n"
    )
    assert imap.send(b"d DELETE INBOX\r\n").startswith(b"d NO [CANNOT] ")
    assert imap.send(b'c CREATE "a/b"\r\n') == (
        b"c NO [CANNOT] Invalid folder name: / and \\ are not allowed.\r\n"
    )
