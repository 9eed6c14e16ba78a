"""A hostile client against the real `twistd powermail` IMAP server.

Every test talks raw bytes over a socket (or imaplib where the exact bytes
do not matter) and asserts the reply RFC 3501 and its extensions call for.
The first group pins bugs that are still open: those tests fail until the
server is fixed.  The rest pin attacks that are handled, so they stay so.

A test that may leave the server spinning (a regular expression that never
ends, a reactor blocked by one command) runs on a server of its own that is
killed, not stopped, at the end, so a failure costs seconds, not the 10 s
grace of a SIGTERM.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import socket
import ssl
import statistics
import time
from pathlib import Path

import pytest
from powermail_process import PASSWORD, PowerMail, write_config

ALICE = "alice@example.test"
BOB = "bob@example.test"


# -- a raw IMAP connection ------------------------------------------------------


class Wire:
    """One IMAP connection spoken byte for byte."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.greeting = self.read_line()

    def read_line(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                break
            data += chunk
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until_tag(self, tag: bytes, timeout: float = 10.0) -> bytes:
        """Everything up to and including the tagged reply for ``tag``.

        Stops early, with what came, at end of stream or on the timeout.
        """
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            if re.search(rb"(?:\A|\r\n)" + re.escape(tag) + rb" [^\r\n]*\r\n\Z", data):
                return data
            left = deadline - time.monotonic()
            if left <= 0:
                return data
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return data
            if not chunk:
                return data
            data += chunk

    def command(self, line: bytes, timeout: float = 10.0) -> bytes:
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        return self.until_tag(tag, timeout)

    def drain(self, seconds: float) -> bytes:
        """What arrives within ``seconds``; ``b"<EOF>"`` marks a closed stream."""
        deadline = time.monotonic() + seconds
        data = b""
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return data + b"<EOF>"
            if not chunk:
                return data + b"<EOF>"
            data += chunk
        return data

    def login(self, user: str = ALICE) -> bytes:
        reply = self.command(f"L LOGIN {user} {PASSWORD}".encode())
        assert b"L OK " in reply, reply
        return reply

    def close(self) -> None:
        self.sock.close()


def wire(server: PowerMail, user: str | None = ALICE) -> Wire:
    connection = Wire(server.imap_port)
    if user is not None:
        connection.login(user)
    return connection


def append(connection: Wire, folder: bytes, message: bytes) -> bytes:
    """APPEND with a LITERAL+ literal; the tagged reply."""
    reply = connection.command(
        b"A APPEND %s {%d+}\r\n%s" % (folder, len(message), message)
    )
    assert b"A OK [APPENDUID " in reply, reply
    return reply


def message(subject: str, body: bytes = b"body\r\n") -> bytes:
    return b"Subject: %s\r\nFrom: carol@sender.test\r\n\r\n%s" % (
        subject.encode(),
        body,
    )


def subjects(connection: Wire, tag: bytes = b"S") -> list[tuple[int, str]]:
    """(UID, Subject) of every message of the selected folder."""
    reply = connection.command(
        tag + b" UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
    )
    return [
        (int(uid), subject.decode())
        for uid, subject in re.findall(
            rb"UID (\d+) BODY[^\n]*\n[Ss]ubject: (\S+)", reply
        )
    ]


def deliver(server: PowerMail, data: bytes, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("carol@sender.test", [rcpt], data)


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- servers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests that only read or work in folders of their own.

    Failed logins answer at once here, so that tests can make many.
    """
    config = write_config(
        tmp_path_factory.mktemp("abuse"),
        imap_extra="login_failure_delay = 0\nmax_login_failures = 100",
    )
    server = PowerMail(config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def disposable(tmp_path):
    """A server of the test's own, SIGKILLed afterwards (it may be stuck)."""
    server = PowerMail(write_config(tmp_path))
    server.start()
    yield server
    server.kill()


# ==============================================================================
# Open bugs: these tests fail until the server is fixed.
# ==============================================================================


def test_list_pattern_with_many_wildcards_does_not_stall_the_server(disposable):
    """LIST wildcards become a backtracking regular expression, run on the
    reactor: "*a*a*a*a*ab" against one 200-octet folder name takes ~15 s,
    and each more "*a" multiplies that, while no session, IMAP or SMTP,
    gets an answer.  RFC 3501 6.3.8 wildcards must be matched in time linear
    in the name (or at least off the reactor)."""
    attacker = wire(disposable)
    assert attacker.command(b"c CREATE " + b"a" * 200) == b"c OK Create completed.\r\n"
    bystander = wire(disposable)

    attacker.send(b'l LIST "" "*a*a*a*a*ab"\r\n')
    time.sleep(0.2)
    started = time.monotonic()
    noop = bystander.command(b"n NOOP", timeout=1.5)
    waited = time.monotonic() - started
    listed = attacker.until_tag(b"l", timeout=0.5)

    assert noop == b"n OK NOOP completed.\r\n"
    assert waited < 1.0, f"another session waited {waited:.1f} s for a NOOP"
    assert listed == b"l OK List completed.\r\n"


def test_move_and_copy_act_on_the_message_numbers_the_client_sent(disposable):
    """Another session expunged message 2.  A session that still numbers
    1, 2, 3 sends MOVE 2 (or COPY 3): the server first sends "* 2 EXPUNGE",
    then reads "2" in the new numbering and moves the client's message 3
    (and refuses COPY 3 as an invalid message set).  Sequence numbers in a
    command name the messages as the client knew them when it sent it
    (RFC 3501 2.3.1.2, 7.4.1; RFC 6851 3.3): MOVE 2 must move nothing (or
    say NO), COPY 3 must copy UID 3."""
    mover, copier, expunger = wire(disposable), wire(disposable), wire(disposable)
    assert mover.command(b"c CREATE Work") == b"c OK Create completed.\r\n"
    for name in ("m1", "m2", "m3"):
        append(mover, b"Work", message(name))
    for session in (mover, copier, expunger):
        assert b"s OK [READ-WRITE]" in session.command(b"s SELECT Work")
    expunger.command(b"d STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert expunger.command(b"e EXPUNGE") == (
        b"* 2 EXPUNGE\r\ne OK Expunge completed.\r\n"
    )

    moved = mover.command(b"m MOVE 2 Trash")
    copied = copier.command(b"c COPY 3 Junk")

    assert subjects(mover) == [(1, "m1"), (3, "m3")], moved
    assert b"* 0 EXISTS\r\n" in mover.command(b"x EXAMINE Trash"), moved
    assert re.search(rb"^c OK \[COPYUID \d+ 3 1\] ", copied, re.MULTILINE), copied
    copier.command(b"j EXAMINE Junk")
    assert subjects(copier) == [(1, "m3")]


def test_large_append_to_a_folder_other_than_inbox_is_stored(shared):
    """An APPEND literal over 64 KiB is spooled to INBOX's tmp/, and
    Folder.append refuses any file outside the target folder's own tmp/:
    saving a large sent message to Sent answers NO [SERVERBUG] (a
    ValueError in the log).  RFC 3501 6.3.11: the message is appended."""
    connection = wire(shared)
    body = b"x" * 76 + b"\r\n"
    data = message("big-to-sent", body * 1000)
    connection.send(b"a APPEND Sent {%d+}\r\n%s\r\n" % (len(data), data))
    reply = connection.until_tag(b"a")
    assert re.fullmatch(rb"a OK \[APPENDUID \d+ \d+\] Append completed.\r\n", reply)
    connection.command(b"s EXAMINE Sent")
    fetched = connection.command(b"f FETCH * BODY.PEEK[]")
    assert b"{%d}\r\n%s)" % (len(data), data) in fetched


def test_fetch_to_a_client_that_does_not_read_keeps_memory_bounded(disposable):
    """FETCH makes 100 messages at a time and writes them all before it
    waits for the client: a client that asks for 40 messages of 1 MB and
    never reads grows the server by ~80 MB (2x what it asked for), and
    with 50 MiB messages one session pins gigabytes.  Memory must stay
    within a message or so of what the socket holds."""
    server = disposable
    connection = wire(server)
    inbox = server.maildir("alice")
    line = b"y" * 76 + b"\r\n"
    for i in range(40):
        data = message(f"big{i}", line * 13000)
        staged = inbox / "tmp" / f"big{i}"
        staged.write_bytes(data)
        size = len(data)
        os.rename(
            staged, inbox / "new" / f"17000000{i:02d}.M{i}P1.host,S={size},W={size}"
        )
    assert b"* 40 EXISTS" in connection.command(b"s SELECT INBOX", timeout=30)
    # One message first, so that every code path is loaded before the
    # baseline is taken.
    assert b"f OK Fetch completed." in connection.command(b"f FETCH 1 BODY.PEEK[]")
    before = vm_rss_kib(server.process.pid)

    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.send(b"g FETCH 1:* BODY.PEEK[]\r\n")
    time.sleep(2)
    grown = vm_rss_kib(server.process.pid) - before
    assert grown < 16 * 1024, f"server grew by {grown // 1024} MiB"


def test_unknown_user_and_wrong_password_take_the_same_time(shared):
    """A wrong password costs an argon2 verification (~100 ms); an unknown
    address, or one without a password, is refused at once.  With the
    failure delay on top the replies are identical but the times differ by
    the hash: which addresses exist can be read off a stopwatch.  The two
    must be indistinguishable (verify against a dummy hash)."""
    connection = wire(shared, user=None)
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    for _ in range(6):
        for kind, login in (("known", ALICE), ("unknown", "nobody@example.test")):
            started = time.perf_counter()
            reply = connection.command(f"a LOGIN {login} wrong".encode())
            times[kind].append(time.perf_counter() - started)
            assert reply == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    known = statistics.median(times["known"])
    unknown = statistics.median(times["unknown"])
    assert unknown > 0.6 * known, (
        f"unknown user {unknown * 1000:.1f} ms, wrong password {known * 1000:.1f} ms"
    )


def test_a_large_sequence_set_does_not_block_the_server(disposable):
    """Sequence sets are resolved range by range without merging, on the
    reactor for FETCH (and once per message for SEARCH, in a worker
    thread): one 64 KB "1:*,1:*,..." FETCH over 4000 messages stops every
    session for most of a second, the SEARCH burns seconds of CPU, and
    both grow with the mailbox.  Both must cost about one pass over the
    mailbox."""
    connection = wire(disposable)
    inbox = disposable.maildir("alice")
    for i in range(4000):
        staged = inbox / "tmp" / f"m{i}"
        staged.write_bytes(b"Subject: s\r\n\r\nb\r\n")
        os.rename(staged, inbox / "new" / f"1600000000.M{i}P1.host,S=17,W=17")
    assert b"* 4000 EXISTS" in connection.command(b"s SELECT INBOX", timeout=30)
    bystander = wire(disposable)

    connection.send(b"f FETCH " + b",".join([b"1:*"] * 16000) + b" UID\r\n")
    time.sleep(0.1)
    started = time.monotonic()
    assert bystander.command(b"n NOOP", timeout=10) == b"n OK NOOP completed.\r\n"
    blocked = time.monotonic() - started
    assert connection.until_tag(b"f", timeout=20).endswith(b"f OK Fetch completed.\r\n")

    started = time.monotonic()
    found = connection.command(b"g SEARCH " + b",".join([b"1:*"] * 3000), timeout=30)
    searched = time.monotonic() - started
    assert found.endswith(b" 4000\r\ng OK Search completed.\r\n")
    assert blocked < 0.3, f"a NOOP of another session waited {blocked:.2f} s"
    assert searched < 0.5, f"SEARCH took {searched:.1f} s"


def test_occasional_bad_commands_do_not_end_a_long_session(shared):
    """max_errors counts every BAD of the session and is never reset by a
    good command, so a long-lived client that now and then sends something
    the server refuses (an extension it probes, FETCH 1:* in an empty
    folder) is thrown out after 20 in total, however many good commands
    came between.  The budget is for a client that only sends garbage:
    count consecutive refusals."""
    connection = wire(shared)
    for i in range(25):
        assert (
            connection.command(b"b%d XYZZY" % i)
            == b"b%d BAD Unknown command XYZZY\r\n" % i
        )
        assert connection.command(b"g%d NOOP" % i) == b"g%d OK NOOP completed.\r\n" % i


def test_header_field_names_are_echoed_as_valid_strings(shared):
    """A header name is an astring (RFC 3501 9: header-fld-name); the
    section in the FETCH response must name it the same way.  A quoted
    name "X)]" is echoed bare, so the response reads
    BODY[HEADER.FIELDS (X)] SUBJECT)] and no client can parse it."""
    connection = wire(shared)
    connection.command(b"c CREATE Headers")
    append(connection, b"Headers", message("hdr"))
    connection.command(b"s EXAMINE Headers")
    reply = connection.command(b'f FETCH 1 BODY.PEEK[HEADER.FIELDS ("X)]" SUBJECT)]')
    assert b'* 1 FETCH (BODY[HEADER.FIELDS ("X)]" SUBJECT)] {16}\r\n' in reply, reply


def test_control_characters_of_a_login_name_do_not_reach_the_log(shared):
    """The login name of a failed login is logged as the client sent it
    (up to 100 characters): a CR can make a forged line look like the
    start of a log line in a terminal, and ESC sequences are passed
    straight to whoever reads the log.  They must be escaped."""
    connection = wire(shared, user=None)
    name = b"evil\r[powermail.imap.commands#info] IMAP login bob@example.test \x1b[2K"
    connection.send(b"a LOGIN {%d+}\r\n%s wrong\r\n" % (len(name), name))
    assert connection.until_tag(b"a") == (
        b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )
    shared.wait_for_log("failed IMAP login for evil")
    # As bytes: reading text would turn the CR into a line end.
    log = shared.log_path.read_bytes()
    line = log[log.index(b"failed IMAP login for evil") :].split(b"\n", 1)[0]
    assert b"\x1b" not in line and b"\r" not in line, line


def test_stale_tmp_file_of_a_crashed_append_is_removed(shared):
    """A crash during a large APPEND leaves its spool file in tmp/ for
    ever (up to max_literal_size each).  Maildir readers remove files in
    tmp/ not touched for 36 hours (cr.yp.to/proto/maildir.html; Dovecot
    does so when it syncs the folder); a fresh one must stay."""
    connection = wire(shared)
    tmp = shared.maildir("alice") / "tmp"
    stale = tmp / "1600000000.M1P1.host.append"
    fresh = tmp / f"{int(time.time())}.M2P1.host.append"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"x" * 1000)
    three_days_ago = time.time() - 3 * 86400
    os.utime(stale, (three_days_ago, three_days_ago))
    connection.command(b"s SELECT INBOX")
    connection.command(b"n NOOP")
    connection.close()
    wire(shared).command(b"s SELECT INBOX")
    assert fresh.exists()
    assert not stale.exists()
    fresh.unlink()


def test_a_readable_tag_gets_a_tagged_bad(shared):
    """RFC 3501 7.1.3: the untagged BAD is for an error whose command
    cannot be determined.  "a  NOOP" (two spaces) and a bare "a" have a
    tag; they get "* BAD", and a client waiting for "a" waits for ever."""
    connection = wire(shared, user=None)
    for line in (b"a  NOOP", b"a", b"a "):
        connection.send(line + b"\r\n")
        reply = connection.read_line()
        assert reply.startswith(b"a BAD "), (line, reply)
    for line in (b"\xff\xfe NOOP", b"+ NOOP", b"* NOOP"):
        connection.send(line + b"\r\n")
        assert connection.read_line() == (
            b"* BAD Error in IMAP command: Missing or invalid tag\r\n"
        )


# ==============================================================================
# Attacks that are handled: these tests keep them handled.
# ==============================================================================

EVIL_NAMES = [
    b'"../bob"',
    b'"../../bob/Maildir"',
    b'"/etc"',
    b'"/"',
    b'"\\\\"',
    b'"a\\\\..\\\\b"',
    b'"."',
    b'".."',
    b'"..."',
    b'".hidden"',
    b'"INBOX/.."',
    b'"INBOX.."',
    b'"INBOX/../../bob"',
    b'"..DOVECOT-TRASHED"',
    b'"%"',
    b'"*"',
    b'"a%b"',
    b'"&Ly4u-"',  # "/.." as UTF-16 of odd length: invalid
    b'"&AC8-"',  # "/" written in base64: not the canonical form
    b'"&AC8-etc"',
    b'"&AFw-"',  # "\\"
    b'"&AC4ALg-"',  # ".."
    b'"&AAA-"',  # NUL
    b'"&AAo-"',  # LF
    b'"&"',
    b'"&-&"',
    b'"a&AGE-"',  # "a" in base64: not canonical
    b'"' + b"x" * 201 + b'"',
    b'"' + b".".join([b"d"] * 21) + b'"',
    b"{5+}\r\na\x00b/c",
    b"{6+}\r\n../bob",
]


def test_no_folder_name_reaches_outside_the_users_maildir(shared):
    """Every command that takes a folder name refuses names that could
    leave the Maildir: RFC 3501 5.1 leaves names to the server, and no
    name of a user may reach another user's mail, data_dir or /etc."""
    deliver(shared, message("for-bob"), BOB)
    mail = shared.data_dir / "mail"

    def outside_alice() -> set[str]:
        return {p for p in tree(mail) if not p.startswith("example.test/alice")}

    outside_before = outside_alice()
    alice_before = {p.name for p in shared.maildir("alice").iterdir()}
    connection = wire(shared)
    append(connection, b"INBOX", message("mine"))
    connection.command(b"s SELECT INBOX")
    refusals = 0

    for name in EVIL_NAMES:
        for command in (
            b"a COPY 1 %s",
            b"a MOVE 1 %s",
            b"a APPEND %s {4+}\r\nx\r\n",
            b"a CREATE %s",
            b"a DELETE %s",
            b"a RENAME %s Renamed",
            b"a RENAME Trash %s",
            b"a RENAME INBOX %s",
            b"a SUBSCRIBE %s",
            b"a UNSUBSCRIBE %s",
            b"a STATUS %s (MESSAGES)",
            b"a EXAMINE %s",
            b"a SELECT %s",
        ):
            # A fresh session before max_errors would end this one.
            if refusals >= 15:
                connection = wire(shared)
                refusals = 0
            if command.startswith((b"a COPY", b"a MOVE")):
                connection.command(b"s SELECT INBOX")
            reply = connection.command(command % name)
            assert re.fullmatch(rb"a (NO|BAD) [^\r\n]*\r\n", reply), (
                command,
                name,
                reply,
            )
            refusals += reply.startswith(b"a BAD")

    for reference in (b'"../"', b'"/"', b'"../bob/"', b'"~bob/"', b'"/etc/"', b'"."'):
        listed = connection.command(b'l LIST %s "*"' % reference)
        assert b"bob" not in listed and b"etc" not in listed, listed
        assert listed.endswith(b"l OK List completed.\r\n")
    lsub = connection.command(b'l LSUB "" "*"')
    assert set(re.findall(rb'\* LSUB \([^)]*\) "\." (\S+)\r\n', lsub)) <= {
        b"INBOX",
        b"Drafts",
        b"Junk",
        b"Sent",
        b"Trash",
    }, lsub

    connection.command(b"z LOGOUT")
    assert outside_alice() == outside_before
    assert {p.name for p in shared.maildir("alice").iterdir()} == alice_before


def test_odd_but_valid_names_stay_folders_inside_the_maildir(shared):
    """Names that decode to path characters ("&Ly4uLw-" is U+2F2E U+2E2F,
    "~bob") are ordinary folders: one directory ``.name`` in the root."""
    connection = wire(shared)
    root = shared.maildir("alice")
    for name in (b"&Ly4uLw-bob", b"~bob", b"&-"):
        assert connection.command(b"c CREATE " + name) == b"c OK Create completed.\r\n"
        assert (root / ("." + name.decode())).is_dir()
        assert connection.command(b"d DELETE " + name) == b"d OK Delete completed.\r\n"


PARSER_CASES = [
    (
        b"a FETCH 1:4294967296 FLAGS",
        b"a BAD Error in IMAP command FETCH: A message number is too large\r\n",
    ),
    (
        b"a FETCH 0 FLAGS",
        b"a BAD Error in IMAP command FETCH: A message number must not be 0\r\n",
    ),
    (
        b"a FETCH 1,,2 FLAGS",
        b"a BAD Error in IMAP command FETCH: Expected a message number\r\n",
    ),
    (
        b"a FETCH 1:4294967295 FLAGS",
        b"a BAD Error in IMAP command FETCH: Invalid messageset (no such message number)\r\n",
    ),
    (b"a FETCH *:* UID", b"* 1 FETCH (UID 1)\r\na OK Fetch completed.\r\n"),
    (
        b"a UID FETCH 1:4294967295 UID",
        b"* 1 FETCH (UID 1)\r\na OK Fetch completed.\r\n",
    ),
    (
        b"a UID FETCH 4294967295:* UID",
        b"* 1 FETCH (UID 1)\r\na OK Fetch completed.\r\n",
    ),
    (
        b"a UID SEARCH UID 4294967296",
        b"a BAD Error in IMAP command SEARCH: A message number is too large\r\n",
    ),
    (
        b"a FETCH 1 BODY.PEEK[]<4294967295.1>",
        b"* 1 FETCH (BODY[]<4294967295> {0}\r\n)\r\na OK Fetch completed.\r\n",
    ),
    (
        b"a FETCH 1 BODY.PEEK[]<0.4294967296>",
        b"a BAD Error in IMAP command FETCH: A partial length is too large\r\n",
    ),
    (
        b"a FETCH 1 BODY.PEEK[]<0.0>",
        b"a BAD Error in IMAP command FETCH: A partial length must not be 0\r\n",
    ),
    (b"a FETCH 1 BODY.PEEK[" + b".".join([b"1"] * 1000) + b"]", None),
    (
        b"a FETCH 1 BODY[0]",
        b"a BAD Error in IMAP command FETCH: A part number must not be 0\r\n",
    ),
    (
        b"a FETCH 1 BODY[HEADER.FIELDS ()]",
        b"a BAD Error in IMAP command FETCH: Empty header field list\r\n",
    ),
    (
        b"a FETCH 1 " + b"(" * 10000 + b")" * 10000,
        b"a BAD Error in IMAP command FETCH: Expected a fetch attribute\r\n",
    ),
    (
        b"a SEARCH " + b"NOT " * 10000 + b"ALL",
        b"a BAD Error in IMAP command SEARCH: Search keys nested too deeply\r\n",
    ),
    (
        b"a SEARCH " + b"OR ALL " * 5000 + b"ALL",
        b"a BAD Error in IMAP command SEARCH: Search keys nested too deeply\r\n",
    ),
    (
        b"a SEARCH " + b"(" * 10000 + b"ALL" + b")" * 10000,
        b"a BAD Error in IMAP command SEARCH: Search keys nested too deeply\r\n",
    ),
    (
        b'a SEARCH SUBJECT "a\\b"',
        b"a BAD Error in IMAP command SEARCH: Invalid escape in quoted string\r\n",
    ),
    (
        b'a SEARCH SUBJECT "a\xffb"',
        b"a BAD Error in IMAP command SEARCH: Search string is not valid utf-8\r\n",
    ),
    (
        b"a SEARCH LARGER 99999999999",
        b"a BAD Error in IMAP command SEARCH: A number is too large\r\n",
    ),
    (
        b'a SELECT "INB\xc3\xa4"',
        b"a BAD Error in IMAP command SELECT: Mailbox names must be 7-bit (modified UTF-7, RFC 3501 5.1.3)\r\n",
    ),
    (
        b"a SELECT IN\x00BOX",
        b"a BAD Error in IMAP command SELECT: Unexpected characters at the end of the command\r\n",
    ),
    (
        b"a STORE 1 +FLAGS (\\Foo)",
        b"a BAD Error in IMAP command STORE: Unknown system flag \\Foo\r\n",
    ),
    (b"a UID UID FETCH 1 FLAGS", b"a BAD UID UID is not a command\r\n"),
    (
        b"a NOOP ",
        b"a BAD Error in IMAP command NOOP: Unexpected characters at the end of the command\r\n",
    ),
    (b"a N\xffOOP", b"a BAD Unknown command N\r\n"),
]


def test_parser_edge_cases_get_exact_replies(shared):
    """Numbers past 2^32-1, zero, empty ranges, deep nesting, bad escapes
    and 8-bit octets are refused with BAD (RFC 3501 9); what is valid,
    however odd, is answered."""
    connection = wire(shared)
    connection.command(b"c CREATE Parser")
    append(connection, b"Parser", message("p"))
    connection.command(b"s SELECT Parser")
    for i, (line, expected) in enumerate(PARSER_CASES):
        if i and i % 15 == 0:
            connection = wire(shared)
            connection.command(b"s SELECT Parser")
        reply = connection.command(line)
        if expected is None:
            assert reply.endswith(b"a OK Fetch completed.\r\n"), (line[:60], reply)
        else:
            assert reply == expected, (line[:60], reply)


def test_bare_lf_line_ends_are_taken_and_bare_cr_is_not_a_line_end(shared):
    connection = wire(shared, user=None)
    connection.send(b"a NOOP\nb NOOP\n")
    assert (
        connection.until_tag(b"b")
        == b"a OK NOOP completed.\r\nb OK NOOP completed.\r\n"
    )
    connection.send(b"c NOOP\rd NOOP\r")
    assert connection.drain(0.3) == b""


def test_a_message_appended_to_a_folder_no_one_has_open_is_recent(shared):
    """RFC 3501 6.3.11: "In either case, the Recent flag is also set."
    The recent set lives in the Folder object; it must outlive the APPEND
    when no session has the folder open (it did not while the registry
    held folders only weakly)."""
    connection = wire(shared)
    assert connection.command(b"c CREATE Fresh") == b"c OK Create completed.\r\n"
    append(connection, b"Fresh", message("recent"))
    selected = connection.command(b"s SELECT Fresh")
    assert b"* 1 EXISTS\r\n* 1 RECENT\r\n" in selected, selected


def test_examine_changes_nothing(shared):
    """RFC 3501 6.3.2: EXAMINE is read-only: BODY[] does not set \\Seen,
    STORE, EXPUNGE and MOVE are refused, CLOSE expunges nothing, and the
    message stays in new/."""
    connection = wire(shared)
    assert connection.command(b"c CREATE ReadOnly") == b"c OK Create completed.\r\n"
    folder = shared.maildir("alice") / ".ReadOnly"
    data = b"Subject: ro\r\n\r\nx\r\n"
    (folder / "tmp" / "ro").write_bytes(data)
    os.rename(folder / "tmp" / "ro", folder / "new" / "1700000001.ro.host")
    assert b"e OK [READ-ONLY] Examine completed.\r\n" in connection.command(
        b"e EXAMINE ReadOnly"
    )
    assert connection.command(b"f FETCH 1 (BODY[] FLAGS)") == (
        b"* 1 FETCH (BODY[] {18}\r\n%s FLAGS ())\r\nf OK Fetch completed.\r\n" % data
    )
    refused = b" NO [READ-ONLY] Mailbox is read-only (EXAMINE)\r\n"
    assert connection.command(b"g STORE 1 +FLAGS (\\Deleted)") == b"g" + refused
    assert connection.command(b"x EXPUNGE") == b"x" + refused
    assert connection.command(b"m MOVE 1 INBOX") == b"m" + refused
    assert connection.command(b"l CLOSE") == b"l OK Close completed.\r\n"
    assert os.listdir(folder / "new") == ["1700000001.ro.host"]
    assert os.listdir(folder / "cur") == []


def test_literal_limits(shared):
    """Before login a literal may hold a user name or a password (8 KiB);
    a synchronizing literal over a limit gets NO [TOOBIG] and no "+", a
    LITERAL+ one, whose octets are already on their way, ends the session
    (RFC 7888 4); a line past max_command_line ends it too, however long
    the client goes on sending."""
    connection = wire(shared, user=None)
    assert connection.command(b"a LOGIN {8193}") == (
        b"a NO [TOOBIG] Literal of 8193 octets is over the limit of 8192\r\n"
    )
    assert connection.command(b"b LOGIN {99999999999999999999}") == (
        b"b NO [TOOBIG] Literal of 99999999999999999999 octets is over the limit of 8192\r\n"
    )
    connection.send(b"c LOGIN {9000+}\r\n")
    assert connection.drain(1) == b"* BYE Literal too large\r\n<EOF>"

    connection = wire(shared)
    assert connection.command(b"a SELECT {70000}") == (
        b"a NO [TOOBIG] Literal of 70000 octets is over the limit of 65518\r\n"
    )
    assert connection.command(b"b APPEND INBOX {60000000}") == (
        b"b NO [TOOBIG] Literal of 60000000 octets is over the limit of 52428800\r\n"
    )
    connection.send(b"c APPEND INBOX {60000000+}\r\n")
    assert connection.drain(1) == b"* BYE Literal too large\r\n<EOF>"

    connection = wire(shared, user=None)
    sent = 0
    with pytest.raises(OSError):
        while sent < 100 * 1024 * 1024:
            connection.send(b"x" * 65536)
            sent += 65536
    assert sent < 16 * 1024 * 1024

    # Pieces of one command (pre-auth literals) count against the limit too.
    connection = wire(shared, user=None)
    connection.send(
        b"a LOGIN {8000+}\r\n" + b"u" * 8000 + b" {8000+}\r\n" + b"p" * 8000
    )
    try:
        for _ in range(20):
            connection.send(b" {8000+}\r\n" + b"z" * 8000)
    except OSError:
        pass
    assert connection.drain(1).startswith(b"* BYE Command line too long\r\n")
    # A zero-length literal is a literal, not a hang.
    connection = wire(shared, user=None)
    connection.send(b"a LOGIN {0}\r\n")
    assert connection.read_line() == b"+ Ready for literal data\r\n"
    connection.send(b" {0+}\r\n\r\n")
    assert (
        connection.until_tag(b"a")
        == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )


def test_commands_out_of_state_are_refused(shared):
    connection = wire(shared, user=None)
    for line in (
        b"a SELECT INBOX",
        b'a LIST "" *',
        b"a APPEND INBOX {1+}\r\nx",
        b"a IDLE",
    ):
        assert connection.command(line) == b"a BAD Log in first\r\n"
    connection.login()
    assert connection.command(b"b FETCH 1 FLAGS") == b"b BAD No mailbox selected\r\n"
    assert (
        connection.command(b"c LOGIN a b")
        == b"c BAD LOGIN is not valid in this state\r\n"
    )
    assert (
        connection.command(b"d STARTTLS")
        == b"d BAD STARTTLS is not valid in this state\r\n"
    )
    connection.send(b"e LOGOUT\r\nf NOOP\r\ng NOOP\r\n")
    assert connection.drain(1) == (
        b"* BYE Logging out\r\ne OK Logout completed.\r\n<EOF>"
    )


def test_authenticate_plain_abuse(shared):
    """RFC 4616: authzid other than authcid is refused like a wrong
    password; broken base64 and a cancel are BAD; nothing logs in."""
    connection = wire(shared, user=None)

    def plain(raw: bytes) -> bytes:
        return b"a AUTHENTICATE PLAIN " + base64.b64encode(raw)

    assert connection.command(b"a AUTHENTICATE PLAIN !!!!") == (
        b"a BAD Invalid base64 in SASL response\r\n"
    )
    assert connection.command(plain(f"{BOB}\0{ALICE}\0{PASSWORD}".encode())) == (
        b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )
    assert connection.command(plain(f"\0{ALICE}\0{PASSWORD}\0x".encode())) == (
        b"a BAD Invalid SASL PLAIN response\r\n"
    )
    assert connection.command(plain(f"\0{ALICE}\0".encode())) == (
        b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )
    connection.send(b"b AUTHENTICATE PLAIN\r\n")
    assert connection.read_line() == b"+ \r\n"
    connection.send(b"*\r\n")
    assert connection.until_tag(b"b") == b"b BAD Authentication cancelled\r\n"
    assert (
        connection.command(b"c AUTHENTICATE LOGIN")
        == b"c NO Unsupported mechanism LOGIN\r\n"
    )
    assert connection.command(b"d SELECT INBOX") == b"d BAD Log in first\r\n"


def test_password_never_reaches_the_log(shared):
    connection = wire(shared, user=None)
    secret = "Hunter2-secret-Password"
    connection.command(f"a LOGIN {ALICE} {secret}".encode())
    raw = base64.b64encode(f"\0{ALICE}\0{secret}".encode())
    connection.command(b"b AUTHENTICATE PLAIN " + raw)
    connection.login()
    connection.command(b"z LOGOUT")
    log = shared.wait_for_log(f"IMAP login {ALICE}")
    assert secret not in log and PASSWORD not in log and raw.decode() not in log


def test_starttls_twice_and_on_the_tls_port_is_refused(shared):
    connection = wire(shared, user=None)
    assert connection.command(b"a STARTTLS") == b"a OK Begin TLS negotiation now.\r\n"
    tls = unverified().wrap_socket(connection.sock, server_hostname="mx.example.test")
    tls.sendall(b"b STARTTLS\r\n")
    assert tls.recv(4096) == b"b BAD TLS is already active\r\n"
    tls.close()
    raw = socket.create_connection(("127.0.0.1", shared.imaps_port), timeout=10)
    imaps = unverified().wrap_socket(raw, server_hostname="mx.example.test")
    assert imaps.recv(4096).startswith(b"* OK [CAPABILITY ")
    imaps.sendall(b"a STARTTLS\r\n")
    assert imaps.recv(4096) == b"a BAD TLS is already active\r\n"
    imaps.close()


def test_idle_abuse(shared):
    """RFC 2177: IDLE is valid unselected; anything but DONE ends it with
    BAD and the session goes on; an idler that vanishes leaves nothing
    behind."""
    connection = wire(shared)
    connection.send(b"i IDLE\r\n")
    assert connection.read_line() == b"+ idling\r\n"
    connection.send(b"DONE\r\n")
    assert connection.until_tag(b"i") == b"i OK Idle completed.\r\n"
    connection.command(b"s EXAMINE INBOX")
    connection.send(b"j IDLE\r\n")
    assert connection.read_line() == b"+ idling\r\n"
    # The line that is not DONE ends the IDLE; it is not run.
    connection.send(b"k NOOP\r\n")
    assert connection.until_tag(b"j") == b"j BAD Expected DONE to end IDLE\r\n"
    assert connection.command(b"l NOOP") == b"l OK NOOP completed.\r\n"
    connection.send(b"m IDLE\r\nDONE\r\nn NOOP\r\n")
    assert connection.until_tag(b"n") == (
        b"+ idling\r\nm OK Idle completed.\r\nn OK NOOP completed.\r\n"
    )
    for _ in range(5):
        gone = wire(shared)
        gone.command(b"s SELECT INBOX")
        gone.send(b"i IDLE\r\n")
        assert gone.read_line() == b"+ idling\r\n"
        gone.close()
    time.sleep(0.3)
    append(connection, b"INBOX", message("after-idlers-left"))
    assert connection.command(b"o NOOP").endswith(b"o OK NOOP completed.\r\n")


def test_fetch_of_a_message_expunged_elsewhere_sends_no_expunge(powermail):
    """RFC 3501 7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH;
    the data of the vanished message is refused (NO [EXPUNGEISSUED]),
    the EXPUNGE comes with the next NOOP."""
    first, second = wire(powermail), wire(powermail)
    for name in ("m1", "m2", "m3"):
        append(first, b"INBOX", message(name))
    first.command(b"s SELECT INBOX")
    second.command(b"s SELECT INBOX")
    second.command(b"d STORE 2 +FLAGS.SILENT (\\Deleted)")
    second.command(b"e EXPUNGE")

    assert first.command(b"f FETCH 1:3 UID") == (
        b"* 1 FETCH (UID 1)\r\n* 3 FETCH (UID 3)\r\n"
        b"f NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n"
    )
    assert (
        first.command(b"g SEARCH ALL") == b"* SEARCH 1 3\r\ng OK Search completed.\r\n"
    )
    # \\Recent or not is another matter (see the test on APPEND and \\Recent).
    stored = first.command(b"h STORE 3 +FLAGS (\\Flagged)")
    assert re.fullmatch(
        rb"\* 3 FETCH \(FLAGS \(\\Flagged( \\Recent)?\)\)\r\nh OK Store completed.\r\n",
        stored,
    ), stored
    noop = first.command(b"n NOOP")
    assert noop.startswith(b"* 2 EXPUNGE\r\n"), noop
    assert first.command(b"u UID FETCH 1:* UID") == (
        b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 3)\r\nu OK Fetch completed.\r\n"
    )

    # A flag set in one session is told to the other at its next command.
    second.command(b"t STORE 1 +FLAGS.SILENT (\\Answered)")
    told = first.command(b"v NOOP")
    assert re.fullmatch(
        rb"\* 1 FETCH \(UID 1 FLAGS \(\\Answered( \\Recent)?\)\)\r\nv OK NOOP completed.\r\n",
        told,
    ), told
    # An APPEND in one session reaches the other's IDLE at once.
    second.send(b"i IDLE\r\n")
    assert second.read_line() == b"+ idling\r\n"
    append(first, b"INBOX", message("m4"))
    assert second.read_line(timeout=3) == b"* 3 EXISTS\r\n"


def test_message_files_changed_by_hand(powermail):
    """A file removed by hand is NO [EXPUNGEISSUED] then EXPUNGE; a file
    with bare LF line ends has an RFC822.SIZE equal to the octets of its
    BODY[] (CRLF); flags renamed by hand are told at the next command."""
    connection = wire(powermail)
    append(connection, b"INBOX", message("rm-me"))
    connection.command(b"s SELECT INBOX")
    inbox = powermail.maildir("alice")
    (victim,) = list((inbox / "cur").iterdir())
    victim.unlink()
    assert connection.command(b"f FETCH 1 BODY.PEEK[]") == (
        b"f NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n"
    )
    assert connection.command(b"n NOOP") == b"* 1 EXPUNGE\r\nn OK NOOP completed.\r\n"

    data = b"Subject: lf\nFrom: x@y.test\n\nline one\nline two\n"
    staged = inbox / "tmp" / "lf"
    staged.write_bytes(data)
    os.rename(staged, inbox / "new" / "1700000000.lf.host")
    assert connection.command(b"n NOOP") == (
        b"* 1 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed.\r\n"
    )
    reply = connection.command(b"f FETCH 1 (RFC822.SIZE BODY.PEEK[])")
    crlf = data.replace(b"\n", b"\r\n")
    assert reply == (
        b"* 1 FETCH (RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\nf OK Fetch completed.\r\n"
        % (len(crlf), len(crlf), crlf)
    )
    assert connection.command(b"g FETCH 1 RFC822.SIZE") == (
        b"* 1 FETCH (RFC822.SIZE %d)\r\ng OK Fetch completed.\r\n" % len(crlf)
    )
    (moved,) = list((inbox / "cur").iterdir())
    os.rename(moved, moved.with_name(moved.name.split(":")[0] + ":2,S"))
    assert connection.command(b"h NOOP") == (
        b"* 1 FETCH (UID 2 FLAGS (\\Seen \\Recent))\r\nh OK NOOP completed.\r\n"
    )


def test_appended_message_survives_a_kill_right_after_its_ok(tmp_path):
    """APPEND's OK means durable (RFC 3501 6.3.11, RFC 4315 APPENDUID):
    after SIGKILL the message is there with its UID, flags and the same
    UIDVALIDITY.  A kill in the middle of a large literal leaves no
    message, whole or partial."""
    server = PowerMail(write_config(tmp_path))
    server.start()
    try:
        connection = wire(server)
        data = message("durable")
        reply = connection.command(
            b"a APPEND INBOX (\\Flagged) {%d+}\r\n%s" % (len(data), data)
        )
        validity, uid = re.fullmatch(
            rb"a OK \[APPENDUID (\d+) (\d+)\] Append completed.\r\n", reply
        ).groups()
        server.kill()
        server.start()

        connection = wire(server)
        selected = connection.command(b"s SELECT INBOX")
        assert b"* OK [UIDVALIDITY %s] UIDs valid\r\n" % validity in selected
        assert connection.command(b"f UID FETCH %s (FLAGS BODY.PEEK[])" % uid) == (
            b"* 1 FETCH (UID %s FLAGS (\\Flagged) BODY[] {%d}\r\n%s)\r\n"
            b"f OK Fetch completed.\r\n" % (uid, len(data), data)
        )

        connection.send(b"b APPEND INBOX {5000000+}\r\n" + b"x" * 3_000_000)
        time.sleep(0.5)
        server.kill()
        server.start()
        connection = wire(server)
        selected = connection.command(b"s SELECT INBOX")
        assert b"* 1 EXISTS\r\n" in selected
        assert b"* OK [UIDNEXT %d]" % (int(uid) + 1) in selected
    finally:
        server.kill()


def test_connection_limit_per_client_and_release(disposable):
    """max_connections_per_client (50): the 51st gets BYE; sessions that
    end any way at all (TLS garbage, a reset, a pending failed login) give
    their place back."""
    for _ in range(20):
        raw = socket.create_connection(("127.0.0.1", disposable.imaps_port))
        raw.sendall(b"not TLS at all\r\n")
        raw.close()
        reset = socket.create_connection(("127.0.0.1", disposable.imap_port))
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        reset.close()
        half = Wire(disposable.imap_port)
        half.send(b"a LOGIN x y\r\n")
        half.close()
    time.sleep(0.5)
    sockets = [
        socket.create_connection(("127.0.0.1", disposable.imap_port)) for _ in range(51)
    ]
    try:
        greetings = [s.recv(200) for s in sockets]
    finally:
        for s in sockets:
            s.close()
    assert sum(g.startswith(b"* OK [CAPABILITY ") for g in greetings) == 50
    assert greetings[-1] == b"* BYE Too many connections, try again later\r\n"
    time.sleep(0.5)
    assert wire(disposable).command(b"n NOOP") == b"n OK NOOP completed.\r\n"


def test_many_pipelined_commands_are_answered_in_order(shared):
    connection = wire(shared)
    connection.send(b"".join(b"n%d NOOP\r\n" % i for i in range(5000)))
    reply = connection.until_tag(b"n4999", timeout=30)
    tags = re.findall(rb"^(n\d+) OK NOOP completed\.\r$", reply, re.MULTILINE)
    assert tags == [b"n%d" % i for i in range(5000)]
