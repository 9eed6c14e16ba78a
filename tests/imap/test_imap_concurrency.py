"""Many clients at once, crashes and outside programs against the real server.

Several IMAP sessions, SMTP deliveries, SIGKILLs and programs that change
the Maildir behind the server's back (as Dovecot or a script would) run
against the real `twistd powermail`.  Each session keeps its own model of
the mailbox from the untagged responses it gets, as a client does (RFC
3501 2.3.1.2, 7.4.1), so a wrong EXISTS or EXPUNGE, a reused UID or a lost
message shows up as a difference between what the session was told and
what is on disk.

A test whose docstring says "Open bug" fails until the server is fixed;
"Found by this pass, fixed in <commit>" pins a fix made while this pass
ran; the others pin behaviour that holds, so that it stays so.  Loads are
small (a few hundred messages, a few seconds) but real.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from powermail_process import PASSWORD, PowerMail, write_config

ALICE = "alice@example.test"
# The folders the load works on; Trash exists from the first login.
FOLDERS = ("INBOX", "Trash", "Archive")
_SIZE_IN_NAME = re.compile(r",S=(\d+)")
# A flag change another session made, as a catch-up tells it.
_FLAGS_NEWS = re.compile(rb"\* \d+ FETCH \(UID \d+ FLAGS \([^)]*\)\)\r\n\Z")


# -- a client that keeps a model of its mailbox ---------------------------------


class Problems:
    """Inconsistencies found by any thread, kept in the order they were seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[str] = []

    def add(self, text: str) -> None:
        with self._lock:
            if len(self.items) < 200:
                self.items.append(text)


@dataclass
class Ledger:
    """What the clients were told, shared by every session of a run."""

    problems: Problems = field(default_factory=Problems)
    # Two FETCHes that named one UID of one folder with different messages.
    conflicts: Problems = field(default_factory=Problems)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (folder, UID) -> Message-ID, from every FETCH any session got.
    msgid: dict[tuple[str, int], str] = field(default_factory=dict)
    # (folder, UID) -> the sessions that were told it was expunged.
    expunged: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    # Source UID in INBOX -> destination UIDs, from COPYUID.
    moved: dict[int, list[int]] = field(default_factory=dict)
    copied: dict[int, list[int]] = field(default_factory=dict)
    # UIDs an EXPUNGE was asked for after a STORE +FLAGS (\\Deleted) said OK.
    deleted: set[int] = field(default_factory=set)
    # (keyword, UID) -> whether the last STORE that said OK set it.
    keyword: dict[tuple[str, int], bool] = field(default_factory=dict)
    # The messages the workers change together when they meet.
    meeting_uids: list[int] = field(default_factory=list)

    def choose_meeting_uid(self) -> None:
        with self.lock:
            inbox = [
                u
                for (f, u) in self.msgid
                if f == "INBOX"
                and u not in self.deleted
                and u not in self.moved
                and ("INBOX", u) not in self.expunged
            ]
            self.meeting_uids = sorted(inbox)[-10:]

    def saw_msgid(self, session: str, folder: str, uid: int, msgid: str) -> None:
        with self.lock:
            known = self.msgid.setdefault((folder, uid), msgid)
        if known != msgid:
            self.conflicts.add(
                f"{session}: {folder} UID {uid} is {msgid}, another FETCH said {known}"
            )

    def saw_expunge(self, session: str, folder: str, uid: int) -> None:
        with self.lock:
            self.expunged.setdefault((folder, uid), set()).add(session)


def expand(uid_set: bytes) -> list[int]:
    """The numbers of a COPYUID set such as ``3:5,9``, in its order."""
    out: list[int] = []
    for part in uid_set.split(b","):
        low, _, high = part.partition(b":")
        first, last = int(low), int(high or low)
        step = 1 if last >= first else -1
        out.extend(range(first, last + step, step))
    return out


class Session:
    """One IMAP connection that numbers its messages as a client must.

    ``uids[n - 1]`` is the UID of message ``n`` as far as this session was
    told: EXISTS adds unknown messages (None), EXPUNGE removes one by its
    number, a FETCH with UID names an unknown one and must agree with a
    known one.  Every disagreement is a problem in the ledger.
    """

    def __init__(self, server: PowerMail, name: str, ledger: Ledger) -> None:
        self.name = name
        self.ledger = ledger
        self.sock = socket.create_connection(("127.0.0.1", server.imap_port), 10)
        self.buffer = b""
        self.tags = itertools.count(1)
        self.folder: str | None = None
        self.uids: list[int | None] = []
        self.gone: set[int] = set()
        self.flags: dict[int, frozenset[str]] = {}
        self.uidnext: dict[str, int] = {}
        self.fetch_mark = 0
        self.read_response()
        tagged, _ = self.command(f"LOGIN {ALICE} {PASSWORD}".encode())
        assert b" OK " in tagged, tagged

    def problem(self, text: str) -> None:
        self.ledger.problems.add(f"{self.name}: {text}")

    # -- the wire ------------------------------------------------------------

    def _more(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"{self.name}: the server closed the connection")
        self.buffer += chunk

    def read_response(self, timeout: float = 15.0) -> bytes:
        """One response, its literals included; TimeoutError keeps the bytes."""
        deadline = time.monotonic() + timeout
        end = 0
        while True:
            newline = self.buffer.find(b"\r\n", end)
            if newline < 0:
                self._more(deadline)
                continue
            line_end = newline + 2
            literal = re.search(rb"\{(\d+)\}\r\n\Z", self.buffer[:line_end])
            if literal is None:
                response, self.buffer = self.buffer[:line_end], self.buffer[line_end:]
                return response
            need = line_end + int(literal.group(1))
            while len(self.buffer) < need:
                self._more(deadline)
            end = need

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: bytes, timeout: float = 15.0) -> tuple[bytes, list[bytes]]:
        """Send one command; (its tagged reply, the untagged ones before it)."""
        tag = b"t%d" % next(self.tags)
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tag(tag, timeout)

    def until_tag(self, tag: bytes, timeout: float = 15.0) -> tuple[bytes, list[bytes]]:
        untagged = []
        while True:
            response = self.read_response(timeout)
            if response.startswith(tag + b" "):
                return response, untagged
            self.handle(response)
            untagged.append(response)

    def close(self) -> None:
        self.sock.close()

    # -- the model -----------------------------------------------------------

    def handle(self, response: bytes) -> None:
        """Bring the model up to date with one untagged response."""
        match = re.match(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH)\b", response)
        if match is None:
            uidnext = re.match(rb"\* OK \[UIDNEXT (\d+)\]", response)
            if uidnext and self.folder is not None:
                self.uidnext[self.folder] = int(uidnext.group(1))
            return
        number, kind = int(match.group(1)), match.group(2)
        if kind == b"EXISTS":
            if number < len(self.uids):
                self.problem(f"EXISTS went down from {len(self.uids)} to {number}")
                del self.uids[number:]
            self.uids.extend([None] * (number - len(self.uids)))
        elif kind == b"EXPUNGE":
            if not 1 <= number <= len(self.uids):
                self.problem(f"EXPUNGE {number} of {len(self.uids)} messages")
                return
            uid = self.uids.pop(number - 1)
            if uid is not None:
                self.gone.add(uid)
                self.flags.pop(uid, None)
                self.ledger.saw_expunge(self.name, self.folder, uid)
        else:
            self._fetched(number, response)

    def _fetched(self, number: int, response: bytes) -> None:
        if not _FLAGS_NEWS.match(response):
            self.fetch_mark = len(self.uids)
        if not 1 <= number <= len(self.uids):
            self.problem(f"FETCH of message {number} of {len(self.uids)}")
            return
        head = response.split(b"{", 1)[0]
        uid_match = re.search(rb"\bUID (\d+)", head)
        if uid_match is None:
            return
        uid = int(uid_match.group(1))
        known = self.uids[number - 1]
        if known is None:
            if uid in self.gone:
                self.problem(f"UID {uid} is message {number} again after its EXPUNGE")
            below = [u for u in self.uids[: number - 1] if u is not None]
            above = [u for u in self.uids[number:] if u is not None]
            if (below and below[-1] >= uid) or (above and above[0] <= uid):
                self.problem(f"UID {uid} as message {number} breaks the UID order")
            self.uids[number - 1] = uid
        elif known != uid:
            self.problem(f"message {number} is UID {known}, a FETCH says UID {uid}")
            return
        flags = re.search(rb"FLAGS \(([^)]*)\)", head)
        if flags is not None:
            self.flags[uid] = frozenset(
                f for f in flags.group(1).decode().split() if f != "\\Recent"
            )
        msgid = re.search(rb"Message-ID: *<([^>\r\n]+)>", response, re.IGNORECASE)
        if msgid is not None:
            self.ledger.saw_msgid(self.name, self.folder, uid, msgid.group(1).decode())

    # -- commands with their checks -------------------------------------------

    def select(self, folder: str, verb: bytes = b"SELECT") -> None:
        self.folder = folder
        self.uids, self.gone, self.flags = [], set(), {}
        tagged, _ = self.command(verb + b" " + folder.encode())
        assert b" OK " in tagged, tagged
        self.learn()

    def known(self) -> list[int]:
        return [u for u in self.uids if u is not None]

    def learn(self) -> None:
        """FETCH the UIDs and Message-IDs of the messages not known yet.

        A message another session expunged meanwhile stays unknown until
        its EXPUNGE comes (the FETCH says NO [EXPUNGEISSUED] for it).
        """
        if None not in self.uids:
            return
        first = self.uids.index(None) + 1
        self.fetch_mark = 0
        tagged, _ = self.command(
            b"FETCH %d:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])" % first
        )
        self._fetch_done(tagged, f"FETCH {first}:*")

    def check(self) -> None:
        """The whole model against a FETCH of every UID."""
        if self.uids:
            self.fetch_mark = 0
            tagged, _ = self.command(b"FETCH 1:* (UID)")
            self._fetch_done(tagged, "FETCH 1:*")
        # Messages it named first get their flags now (never again: what
        # changes later the server must announce).
        flagless = [u for u in self.known() if u not in self.flags]
        if flagless:
            numbers = ",".join(map(str, flagless)).encode()
            self.command(b"UID FETCH %s (UID FLAGS)" % numbers)

    def _fetch_done(self, tagged: bytes, what: str) -> None:
        # Messages announced after the last FETCH response (the command's
        # closing catch-up) were not asked for.
        if b" OK " in tagged:
            if None in self.uids[: self.fetch_mark]:
                self.problem(f"{what} said OK, some messages have no UID yet")
        elif b" NO [EXPUNGEISSUED] " not in tagged:
            self.problem(f"{what} of {len(self.uids)}: {tagged!r}")

    def uid_search_all(self) -> list[int]:
        tagged, untagged = self.command(b"UID SEARCH ALL")
        assert b" OK " in tagged, tagged
        (line,) = [r for r in untagged if r.startswith(b"* SEARCH")]
        return [int(n) for n in line.split()[2:]]

    def stored(self, uid: int, flag: str, on: bool) -> None:
        """A .SILENT STORE of this session said OK: the client's own change.

        Only this session changes ``flag``, so whether the server told the
        message's flags before or after the change, this is what it knows.
        """
        if uid in self.flags:
            self.flags[uid] = (
                (self.flags[uid] | {flag}) if on else (self.flags[uid] - {flag})
            )

    def copyuid(self, reply: bytes) -> tuple[list[int], list[int]] | None:
        match = re.search(rb"\[COPYUID \d+ ([\d:,]+) ([\d:,]+)\]", reply)
        if match is None:
            return None
        return expand(match.group(1)), expand(match.group(2))


def message_bytes(msgid: str, *, extra: bytes = b"") -> bytes:
    """A message that says who it is and where it ends (for torn files)."""
    return (
        b"Message-ID: <%s>\r\nSubject: %s\r\nFrom: carol@sender.test\r\n"
        b"To: alice@example.test\r\n\r\nbody of %s\r\n%sEND %s\r\n"
        % (msgid.encode(), msgid.encode(), msgid.encode(), extra, msgid.encode())
    )


def listing(session: Session, folder: str) -> list[tuple[int, str, frozenset[str]]]:
    """(UID, Message-ID, flags) of every message of ``folder``, in order.

    The FETCH goes through the session's model, so the Message-IDs it
    shows are checked against what the other sessions were told.
    """
    session.folder = folder
    session.uids, session.gone, session.flags = [], set(), {}
    tagged, _ = session.command(b"EXAMINE " + folder.encode())
    assert b" OK " in tagged, tagged
    if not session.uids:
        return []
    tagged, untagged = session.command(
        b"FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"
    )
    assert b" OK " in tagged, tagged
    out = []
    for response in untagged:
        match = re.match(rb"\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\)", response)
        msgid = re.search(rb"Message-ID: *<([^>\r\n]+)>", response, re.IGNORECASE)
        if match:
            flags = frozenset(
                f for f in match.group(2).decode().split() if f != "\\Recent"
            )
            out.append(
                (int(match.group(1)), msgid.group(1).decode() if msgid else "", flags)
            )
    return out


def folder_path(server: PowerMail, folder: str) -> Path:
    root = server.maildir("alice")
    return root if folder == "INBOX" else root / f".{folder}"


def message_files(path: Path) -> dict[str, Path]:
    """The message files in cur/ and new/ by base name."""
    files = {}
    for sub in ("new", "cur"):
        if (path / sub).is_dir():
            for item in (path / sub).iterdir():
                files[item.name.split(":")[0]] = item
    return files


def parse_uidlist(path: Path) -> tuple[int, int, dict[int, str]]:
    """(UIDVALIDITY, next UID, UID -> base name) of a ``dovecot-uidlist``.

    Asserts the format Dovecot 2.3 reads: header ``3 V.. N.. G..``, then one
    ``<uid> [extensions] :<base>`` a line, UIDs unique and ascending.
    """
    lines = path.read_text("utf-8").split("\n")
    header = re.fullmatch(r"3 V(\d+) N(\d+) G([0-9a-f]+)( .*)?", lines[0])
    assert header, f"{path}: header {lines[0]!r}"
    assert lines[-1] == "", f"{path} does not end with a newline"
    records: dict[int, str] = {}
    for line in lines[1:-1]:
        record = re.fullmatch(r"(\d+)(?: [A-Z]\S*)* :([^\s/]+)", line)
        assert record, f"{path}: record {line!r}"
        uid = int(record.group(1))
        assert uid not in records, f"{path}: UID {uid} twice"
        assert not records or uid > max(records), f"{path}: UID {uid} out of order"
        records[uid] = record.group(2)
    return int(header.group(1)), int(header.group(2)), records


def traceback_free(server: PowerMail) -> list[str]:
    """The lines of the log that show a traceback or an unhandled error."""
    return [
        line
        for line in server.log_text().splitlines()
        if "Traceback" in line or "Unhandled" in line or "#critical]" in line
    ]


class SmtpDeliverer(threading.Thread):
    """Delivers ``count`` messages to alice over one SMTP session."""

    def __init__(self, server: PowerMail, prefix: str, count: int, stop=None):
        super().__init__(daemon=True)
        self.server, self.prefix, self.count = server, prefix, count
        self.stop = stop or threading.Event()
        self.accepted: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.server.port, timeout=15) as smtp:
                for i in range(self.count):
                    if self.stop.is_set():
                        return
                    msgid = f"{self.prefix}.{i}@sender.test"
                    smtp.sendmail("carol@sender.test", [ALICE], message_bytes(msgid))
                    # sendmail returning without an exception is a 250.
                    self.accepted.append(msgid)
        except (OSError, smtplib.SMTPException) as exc:
            self.error = exc


# -- servers --------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A server of the test's own, SIGKILLed afterwards (it may be stuck)."""
    powermail = PowerMail(write_config(tmp_path))
    powermail.start()
    yield powermail
    powermail.kill()


def wire_session(server: PowerMail, name: str = "s") -> Session:
    return Session(server, name, Ledger())


# -- 1. load: deliveries, four sessions, one of them idling ----------------------


@dataclass
class LoadRun:
    server: PowerMail
    ledger: Ledger
    accepted: list[str]
    sessions: list[Session]
    finals: dict[str, list[int]]
    listings: dict[str, list[tuple[int, str, frozenset[str]]]]
    worker_keywords: list[str]
    ops: dict[str, int]


class Worker(threading.Thread):
    """An INBOX session that changes flags and expunges, moves or copies.

    It owns one keyword, so the flags each message must end with are known
    whatever the other sessions do at the same time.  Its ``role`` is one of
    "expunge", "move" and "copy": only one session moves, so that two MOVEs
    of one message at once (a bug of its own, see
    test_two_sessions_moving_one_message_leave_one_copy) do not blur this.
    """

    def __init__(
        self,
        session: Session,
        keyword: str,
        role: str,
        seed: int,
        stop,
        meet: threading.Barrier,
    ) -> None:
        super().__init__(daemon=True)
        self.session, self.keyword, self.role = session, keyword, role
        self.stop, self.meet = stop, meet
        self.random = random.Random(seed)
        self.ops: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for steps in itertools.count(1):
                if self.stop.is_set():
                    break
                self.step()
                if steps % 3 == 0:
                    self.meet_the_others()
                time.sleep(self.random.uniform(0, 0.01))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        self.meet.abort()

    def step(self) -> None:
        s, ledger, rnd = self.session, self.session.ledger, self.random
        s.learn()
        with ledger.lock:
            known = [u for u in s.known() if ("INBOX", u) in ledger.msgid]
        op = rnd.choices(["keyword", self.role, "noop", "check"], [35, 30, 15, 20])[0]
        if op in ("expunge", "move") and len(known) < 15:
            op = "keyword"
        if not known and op not in ("noop", "check"):
            op = "noop"
        self.ops[op] = self.ops.get(op, 0) + 1
        if op == "noop":
            s.command(b"NOOP")
            return
        if op == "check":
            s.check()
            return
        # Most work goes to the newest messages, as a mail program's does:
        # sessions meet on the same message often.
        uid = rnd.choice(known[-6:] if rnd.random() < 0.7 else known)
        by_number = rnd.random() < 0.3
        target = b"%d" % (s.uids.index(uid) + 1) if by_number else b"%d" % uid
        prefix = b"" if by_number else b"UID "
        if op == "keyword":
            on = rnd.random() < 0.6
            tagged, _ = s.command(
                prefix
                + b"STORE %s %sFLAGS.SILENT (%s)"
                % (target, b"+" if on else b"-", self.keyword.encode())
            )
            if b" OK " in tagged:
                s.stored(uid, self.keyword, on)
                with ledger.lock:
                    ledger.keyword[(self.keyword, uid)] = on
            else:
                s.problem(f"STORE {target!r}: {tagged!r}")
        elif op == "expunge":
            tagged, _ = s.command(b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
            if b" OK " not in tagged:
                s.problem(f"STORE \\Deleted {uid}: {tagged!r}")
                return
            s.stored(uid, "\\Deleted", True)
            with ledger.lock:
                ledger.deleted.add(uid)
            tagged, _ = s.command(b"UID EXPUNGE %d" % uid)
            if b" OK " not in tagged:
                s.problem(f"UID EXPUNGE {uid}: {tagged!r}")
        else:
            verb, folder = (
                (b"MOVE", b"Trash") if op == "move" else (b"COPY", b"Archive")
            )
            tagged, untagged = s.command(prefix + verb + b" " + target + b" " + folder)
            if b" OK " not in tagged:
                s.problem(f"{verb!r} {target!r}: {tagged!r}")
                return
            pairs = s.copyuid(tagged) or next(
                (p for r in untagged if (p := s.copyuid(r))), None
            )
            if pairs is None:
                return  # expunged by another session meanwhile
            sources, targets = pairs
            if sources != [uid]:
                s.problem(f"{verb.decode()} {target!r} meant UID {uid}, did {sources}")
            book = ledger.moved if op == "move" else ledger.copied
            with ledger.lock:
                for source, dest in zip(sources, targets, strict=True):
                    book.setdefault(source, []).append(dest)

    def meet_the_others(self) -> None:
        """All workers STORE their keyword on one message at the same moment."""
        s = self.session
        s.learn()
        try:
            self.meet.wait()
        except threading.BrokenBarrierError:
            return
        uids = [u for u in s.ledger.meeting_uids if u in s.known()]
        self.ops["meeting"] = self.ops.get("meeting", 0) + 1
        for uid in uids:
            on = self.random.random() < 0.8
            tagged, _ = s.command(
                b"UID STORE %d %sFLAGS.SILENT (%s)"
                % (uid, b"+" if on else b"-", self.keyword.encode())
            )
            if b" OK " not in tagged:
                s.problem(f"STORE {uid}: {tagged!r}")
                return
            s.stored(uid, self.keyword, on)
            with s.ledger.lock:
                s.ledger.keyword[(self.keyword, uid)] = on


class Idler(threading.Thread):
    """An INBOX session that IDLEs in short stretches and checks in between.

    With ``idle`` False it only polls with NOOP (the EXAMINE session).
    """

    def __init__(self, session: Session, seed: int, stop, *, idle: bool = True) -> None:
        super().__init__(daemon=True)
        self.session, self.stop, self.idle = session, stop, idle
        self.random = random.Random(seed)
        self.error: BaseException | None = None
        self.told = 0

    def run(self) -> None:
        s = self.session
        try:
            while not self.stop.is_set():
                if not self.idle:
                    _, untagged = s.command(b"NOOP")
                    self.told += len(untagged)
                    s.learn()
                    s.check()
                    time.sleep(self.random.uniform(0.05, 0.3))
                    continue
                tag = b"t%d" % next(s.tags)
                s.send(tag + b" IDLE\r\n")
                # News found by the command's own sync may come first.
                while (response := s.read_response()) != b"+ idling\r\n":
                    s.handle(response)
                deadline = time.monotonic() + self.random.uniform(0.3, 1.2)
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        s.handle(s.read_response(timeout=left))
                        self.told += 1
                    except TimeoutError:
                        break
                s.send(b"DONE\r\n")
                tagged, _ = s.until_tag(tag)
                assert tagged == tag + b" OK Idle completed.\r\n", tagged
                s.learn()
                s.check()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """The load below, run once for the tests that check what it left."""
    server = PowerMail(write_config(tmp_path_factory.mktemp("load")))
    server.start()
    try:
        yield run_load(server)
    finally:
        server.kill()


def run_load(server: PowerMail) -> LoadRun:
    """4 SMTP deliverers, 3 working sessions, 1 idler and 1 EXAMINE session
    on alice's INBOX, for about four seconds."""
    ledger = Ledger()
    setup = Session(server, "setup", ledger)
    tagged, _ = setup.command(b"CREATE Archive")
    assert b" OK " in tagged
    # Some mail before the sessions start, so that they have work at once.
    for i in range(20):
        data = message_bytes(f"early.{i}@sender.test")
        tagged, _ = setup.command(b"APPEND INBOX {%d+}\r\n%s" % (len(data), data))
        assert b" OK [APPENDUID" in tagged, tagged
    setup.close()

    stop = threading.Event()
    keywords = ["$w0", "$w1", "$w2"]
    sessions = [Session(server, f"worker{i}", ledger) for i in range(3)]
    idle_session = Session(server, "idler", ledger)
    examine_session = Session(server, "examiner", ledger)
    for s in [*sessions, idle_session]:
        s.select("INBOX")
    examine_session.select("INBOX", b"EXAMINE")
    meet = threading.Barrier(3, action=ledger.choose_meeting_uid, timeout=10)
    workers = [
        Worker(s, k, role, seed, stop, meet)
        for seed, (s, k, role) in enumerate(
            zip(sessions, keywords, ["move", "expunge", "copy"], strict=True)
        )
    ]
    idler = Idler(idle_session, 7, stop)
    examiner = Idler(examine_session, 8, stop, idle=False)
    deliverers = [SmtpDeliverer(server, f"smtp{t}", 30) for t in range(4)]
    for thread in [*workers, idler, examiner, *deliverers]:
        thread.start()
    for thread in deliverers:
        thread.join(60)
    time.sleep(1.0)
    stop.set()
    for thread in [*workers, idler, examiner]:
        thread.join(30)
    errors = [
        f"{t.name}: {t.error!r}"
        for t in [*workers, idler, examiner, *deliverers]
        if t.error is not None
    ]
    assert not errors, errors

    # Settle: every session catches up and tells what it believes.
    all_sessions = [*sessions, idle_session, examine_session]
    finals = {}
    for s in all_sessions:
        s.command(b"NOOP")
        s.learn()
        finals[s.name] = s.uid_search_all()
    verifier = Session(server, "verifier", ledger)
    listings = {folder: listing(verifier, folder) for folder in FOLDERS}
    verifier.close()
    ops: dict[str, int] = {}
    for worker in workers:
        for op, n in worker.ops.items():
            ops[op] = ops.get(op, 0) + n
    ops["idle responses"] = idler.told
    print(
        f"\nload: {ops}, INBOX {len(listings['INBOX'])}, Trash "
        f"{len(listings['Trash'])}, Archive {len(listings['Archive'])}"
    )
    return LoadRun(
        server,
        ledger,
        [m for d in deliverers for m in d.accepted]
        + [f"early.{i}@sender.test" for i in range(20)],
        all_sessions,
        finals,
        listings,
        keywords,
        ops,
    )


def test_load_every_accepted_message_is_in_exactly_one_place(load):
    """Each message that got its 250 (or APPEND OK) has one INBOX UID and
    is now in INBOX or in Trash (MOVE, with the COPYUID's UID), or was
    expunged after a STORE \\Deleted said OK; Archive holds exactly the
    copies COPY reported.  Nothing else is in any folder."""
    ledger = load.ledger
    inbox_uids: dict[str, list[int]] = {}
    for (folder, uid), msgid in ledger.msgid.items():
        if folder == "INBOX":
            inbox_uids.setdefault(msgid, []).append(uid)
    final = {
        name: {uid: msgid for uid, msgid, _ in load.listings[name]} for name in FOLDERS
    }
    wrong = []
    for msgid in load.accepted:
        uids = sorted(inbox_uids.get(msgid, []))
        if len(uids) != 1:
            wrong.append(f"{msgid} had the INBOX UIDs {uids}")
            continue
        (uid,) = uids
        in_inbox = final["INBOX"].get(uid) == msgid
        trash = sorted(u for u, m in final["Trash"].items() if m == msgid)
        archive = sorted(u for u, m in final["Archive"].items() if m == msgid)
        if trash != sorted(ledger.moved.get(uid, [])):
            wrong.append(
                f"{msgid}: Trash UIDs {trash}, MOVE said {ledger.moved.get(uid)}"
            )
        if archive != sorted(ledger.copied.get(uid, [])):
            wrong.append(
                f"{msgid}: Archive UIDs {archive}, COPY said {ledger.copied.get(uid)}"
            )
        places = int(in_inbox) + len(trash)
        if places > 1 or (places == 0 and uid not in ledger.deleted):
            wrong.append(f"{msgid} (INBOX UID {uid}): INBOX {in_inbox}, Trash {trash}")
    accepted = set(load.accepted)
    for name in FOLDERS:
        strangers = [m for m in final[name].values() if m not in accepted]
        if strangers:
            wrong.append(f"{name} holds messages no one sent: {strangers[:5]}")
    assert not wrong, "\n".join(wrong[:30])
    assert len(accepted) == len(load.accepted) == 140


def test_load_uids_are_unique_increasing_and_never_name_two_messages(load):
    """Per folder, UIDs ascend with the message numbers; no two FETCHes (of
    any session, at any time) gave one UID to two messages; no COPYUID
    gave one target UID twice; UIDNEXT is above every UID handed out."""
    for name in FOLDERS:
        uids = [uid for uid, _, _ in load.listings[name]]
        assert uids == sorted(set(uids)), name
    assert not load.ledger.conflicts.items, load.ledger.conflicts.items[:10]
    for book, name in ((load.ledger.moved, "Trash"), (load.ledger.copied, "Archive")):
        targets = [t for dests in book.values() for t in dests]
        assert len(targets) == len(set(targets)), f"{name}: a COPYUID UID twice"
    session = Session(load.server, "status", Ledger())
    for name in FOLDERS:
        tagged, untagged = session.command(b"STATUS %s (UIDNEXT)" % name.encode())
        uidnext = int(re.search(rb"UIDNEXT (\d+)", untagged[0]).group(1))
        highest = max(
            [u for (f, u) in load.ledger.msgid if f == name]
            + [u for u, _, _ in load.listings[name]]
            + [0]
        )
        assert uidnext > highest, (name, uidnext, highest)
    session.close()


def test_load_each_session_numbering_matches_the_server(load):
    """Every session numbered its messages from EXISTS/EXPUNGE/FETCH alone
    without a contradiction, ends with exactly the UIDs of UID SEARCH ALL,
    and no UID still in INBOX was ever announced as expunged."""
    assert not load.ledger.problems.items, "\n".join(load.ledger.problems.items[:30])
    inbox = {uid for uid, _, _ in load.listings["INBOX"]}
    for s in load.sessions:
        assert s.uids == load.finals[s.name], s.name
        assert set(load.finals[s.name]) == inbox, s.name
    spurious = {
        uid: names
        for (folder, uid), names in load.ledger.expunged.items()
        if folder == "INBOX" and uid in inbox
    }
    assert not spurious, f"told expunged, still there: {spurious}"
    assert load.ops.get("move", 0) >= 3 and load.ops.get("expunge", 0) >= 3, load.ops


def test_load_flags_end_as_the_last_store_set_them(load):
    """Each session owns one keyword and +FLAGS/-FLAGS it on random
    messages while the others do the same with theirs: a message ends with
    exactly the keywords whose last STORE was +FLAGS, and \\Deleted where
    the STORE said OK (those left are not expunged yet).

    Found by this pass, fixed in 07c08f5: STORE +FLAGS/-FLAGS computed the new
    flag set in the reactor from the folder's last snapshot and
    Folder.store_flags writes it as a whole, so two sessions that change
    different flags of one message at the same time lose one change (two
    sessions, 60 messages, +FLAGS ($a) and +FLAGS ($b): about 10 end with only
    one of them).  RFC 3501 6.4.6: +FLAGS adds to the flags the message has,
    whatever another session did meanwhile."""
    wrong = []
    for uid, _, flags in load.listings["INBOX"]:
        for keyword in load.worker_keywords:
            wanted = load.ledger.keyword.get((keyword, uid), False)
            if (keyword in flags) != wanted:
                wrong.append(
                    f"UID {uid}: {keyword} should be {wanted}, flags {sorted(flags)}"
                )
        if uid in load.ledger.deleted and "\\Deleted" not in flags:
            wrong.append(f"UID {uid} lost its \\Deleted: {sorted(flags)}")
    assert not wrong, f"{len(wrong)} wrong:\n" + "\n".join(wrong[:20])


def test_load_every_session_was_told_every_flag_change(load):
    """What each session was told (FETCH FLAGS, its own silent STOREs) adds
    up to the flags every message has at the end: no change made by
    another session at the same moment went untold (RFC 3501 7.4.2)."""
    truth = {uid: flags for uid, _, flags in load.listings["INBOX"]}
    wrong = [
        f"{s.name}: UID {uid} known as {sorted(s.flags.get(uid, ()))}, is {sorted(flags)}"
        for s in load.sessions
        for uid, flags in truth.items()
        if s.flags.get(uid) != flags
    ]
    assert not wrong, f"{len(wrong)} wrong:\n" + "\n".join(wrong[:20])


def test_load_leaves_dovecot_uidlists_that_match_the_files(load):
    """Each folder's dovecot-uidlist parses as Dovecot's version 3, its N is
    above every UID, and it has one record for each message file (the
    UIDs the clients see)."""
    for name in FOLDERS:
        path = folder_path(load.server, name)
        _, next_uid, records = parse_uidlist(path / "dovecot-uidlist")
        assert not records or next_uid > max(records), name
        files = message_files(path)
        assert sorted(records.values()) == sorted(files), name
        assert sorted(records) == [uid for uid, _, _ in load.listings[name]], name
        assert not list((path / "tmp").iterdir()), f"{name}: tmp/ not empty"


def test_load_logs_no_traceback(load):
    assert traceback_free(load.server) == []


# -- the same message changed by two sessions at once ---------------------------


def fill_inbox(server: PowerMail, count: int, prefix: str = "m") -> None:
    """``count`` messages in INBOX, appended over IMAP (UIDs 1..count)."""
    setup = wire_session(server, "setup")
    for i in range(count):
        data = message_bytes(f"{prefix}.{i}@sender.test")
        tagged, _ = setup.command(b"APPEND INBOX {%d+}\r\n%s" % (len(data), data))
        assert b" OK [APPENDUID" in tagged, tagged
    setup.close()


def in_step(*jobs) -> None:
    """Run the jobs in threads started together; re-raise the first error."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(job) -> None:
        try:
            start.wait()
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]


def test_plus_flags_of_two_sessions_at_once_are_both_kept(server):
    """Two sessions add different keywords to the same 60 messages at the
    same time: each message must end with both.

    Found by this pass, fixed in 07c08f5: do_STORE computed ``entry.flags |
    wanted`` from the snapshot the session last saw and Folder.store_flags
    renames the file to exactly that set, so when the other session's STORE
    lands in between its flag is dropped (about 1 message in 6 here; -FLAGS
    likewise brings a removed flag back, and FETCH BODY[]'s implicit \\Seen can
    undo a STORE too). RFC 3501 6.4.6: +FLAGS adds to the flags the message has;
    the change belongs under the folder lock, computed from the file's current
    name."""
    fill_inbox(server, 60)
    first, second = wire_session(server, "a"), wire_session(server, "b")
    first.select("INBOX")
    second.select("INBOX")

    def add(session: Session, keyword: bytes):
        def job() -> None:
            for uid in range(1, 61):
                tagged, _ = session.command(
                    b"UID STORE %d +FLAGS.SILENT (%s)" % (uid, keyword)
                )
                assert b" OK " in tagged, tagged

        return job

    in_step(add(first, b"$a"), add(second, b"$b"))
    lost = [
        (uid, sorted(flags))
        for uid, _, flags in listing(wire_session(server, "check"), "INBOX")
        if not {"$a", "$b"} <= flags
    ]
    assert lost == [], f"{len(lost)} of 60 messages lost a keyword: {lost[:5]}"


def test_two_sessions_moving_one_message_leave_one_copy(server):
    """A phone and a desktop both MOVE the same 30 messages to Trash at the
    same moment: each message must end up in Trash once.

    Found by this pass, fixed in 464b86b: Folder.copy_to copied under the source
    folder's lock and releases it, then the expunge runs separately, so both
    MOVEs copy the message (each gets an OK with a COPYUID) and Trash holds it
    twice. RFC 6851 section 3.3: MOVE is atomic, the message is moved, not
    duplicated; the second MOVE should find it gone (OK with nothing moved, or
    NO [EXPUNGEISSUED])."""
    fill_inbox(server, 30)
    first, second = wire_session(server, "a"), wire_session(server, "b")
    first.select("INBOX")
    second.select("INBOX")

    def move(session: Session):
        def job() -> None:
            for uid in range(1, 31):
                tagged, _ = session.command(b"UID MOVE %d Trash" % uid)
                assert b" OK " in tagged, tagged

        return job

    in_step(move(first), move(second))
    check = wire_session(server, "check")
    assert listing(check, "INBOX") == []
    trash = [msgid for _, msgid, _ in listing(check, "Trash")]
    twice = sorted({m for m in trash if trash.count(m) > 1})
    assert twice == [], f"{len(twice)} of 30 messages are in Trash twice"
    assert sorted(trash) == sorted(f"m.{i}@sender.test" for i in range(30))


# -- 2. SIGKILL in the middle of the load ------------------------------------------


@dataclass
class CrashBook:
    """What the clients were promised before the crashes, over all rounds."""

    ledger: Ledger = field(default_factory=Ledger)
    accepted: list[str] = field(default_factory=list)
    # (folder, UIDVALIDITY, UID, Message-ID) of every APPEND that said OK.
    appended: list[tuple[str, int, int, str]] = field(default_factory=list)
    # INBOX UIDs a MOVE was sent for; those whose MOVE said OK -> Trash UID.
    move_sent: set[int] = field(default_factory=set)
    moved: dict[int, int] = field(default_factory=dict)
    # UID -> [(flags, whether the STORE said OK)], in the order sent.
    stores: dict[int, list[tuple[frozenset[str], bool]]] = field(default_factory=dict)
    uidvalidity: dict[str, int] = field(default_factory=dict)


def crash_load(server: PowerMail, book: CrashBook, rnd: random.Random, tag: str):
    """Start deliveries, APPENDs, MOVEs and STOREs; returns a function that
    stops them (call it after the kill) and records what they were told."""
    stop = threading.Event()
    deliverers = [SmtpDeliverer(server, f"{tag}s{t}", 10_000, stop) for t in range(2)]

    def appender() -> None:
        session = Session(server, f"{tag}-appender", book.ledger)
        for i in itertools.count():
            if stop.is_set():
                return
            folder = ("INBOX", "Sent")[i % 2]
            msgid = f"{tag}a{i}@sender.test"
            data = message_bytes(msgid, extra=b"x" * 70 + b"\r\n" * (i % 5))
            tagged, _ = session.command(
                b"APPEND %s {%d+}\r\n%s" % (folder.encode(), len(data), data)
            )
            match = re.match(rb"\S+ OK \[APPENDUID (\d+) (\d+)\]", tagged)
            assert match, tagged
            validity, uid = int(match.group(1)), int(match.group(2))
            book.appended.append((folder, validity, uid, msgid))
            book.ledger.saw_msgid("appender", folder, uid, msgid)

    def mover() -> None:
        session = Session(server, f"{tag}-mover", book.ledger)
        session.select("INBOX")
        while not stop.is_set():
            session.learn()
            candidates = [u for u in session.known() if u not in book.move_sent]
            if len(candidates) < 5:
                session.command(b"NOOP")
                continue
            uid = rnd.choice(candidates)
            if rnd.random() < 0.5:
                flags = frozenset(rnd.sample(["\\Seen", "\\Flagged", "$crash"], 2))
                entry = [flags, False]
                book.stores.setdefault(uid, []).append(entry)
                tagged, _ = session.command(
                    b"UID STORE %d FLAGS.SILENT (%s)" % (uid, " ".join(flags).encode())
                )
                assert b" OK " in tagged, tagged
                book.stores[uid][-1] = (flags, True)
                continue
            book.move_sent.add(uid)
            tagged, untagged = session.command(b"UID MOVE %d Trash" % uid)
            assert b" OK " in tagged, tagged
            pairs = next((p for r in untagged if (p := session.copyuid(r))), None)
            if pairs is not None:
                book.moved[uid] = pairs[1][0]
                msgid = book.ledger.msgid.get(("INBOX", uid))
                if msgid:
                    book.ledger.saw_msgid("mover", "Trash", pairs[1][0], msgid)

    def until_the_kill(job):
        def run() -> None:
            try:
                job()
            except (OSError, TimeoutError):
                pass  # the server was killed

        return run

    threads = [
        threading.Thread(target=until_the_kill(f), daemon=True)
        for f in (appender, mover)
    ]
    for thread in [*deliverers, *threads]:
        thread.start()

    def finish() -> None:
        stop.set()
        for thread in [*deliverers, *threads]:
            thread.join(20)
        for deliverer in deliverers:
            book.accepted.extend(deliverer.accepted)

    return finish


def check_files_whole(server: PowerMail) -> list[str]:
    """Every file in cur/ and new/ of every folder is a whole message."""
    wrong = []
    for folder in ("INBOX", "Sent", "Trash"):
        for base, path in message_files(folder_path(server, folder)).items():
            data = path.read_bytes()
            msgid = re.search(rb"Message-ID: <([^>]+)>", data)
            size = _SIZE_IN_NAME.search(base)
            if msgid is None or not data.endswith(b"END %s\r\n" % msgid.group(1)):
                wrong.append(f"{folder}: {path.name} is torn ({len(data)} octets)")
            elif size and int(size.group(1)) != len(data):
                wrong.append(f"{folder}: {path.name} holds {len(data)} octets")
    return wrong


def test_sigkill_during_load_loses_nothing_promised(tmp_path):
    """Three times, SIGKILL the server at a random moment of a load of SMTP
    deliveries, APPENDs, MOVEs and STOREs, start it again, and check what
    the clients were promised: every 250 and every APPEND OK is there, an
    APPENDUID's UID and every UID a client saw still names its message (no
    UID reused, UIDNEXT never lower), MOVEs that said OK are done, flags a
    STORE said OK for are kept, no torn file is in cur/ or new/ and tmp/
    leftovers are no messages.

    A dovecot-uidlist.lock left by the killed process is removed before
    the restart, as an administrator would: it blocks the folder for two
    minutes (test_a_uidlist_lock_left_by_a_crash_does_not_block_the_folder)."""
    server = PowerMail(write_config(tmp_path))
    server.start()
    book = CrashBook()
    rnd = random.Random(20261203)
    wrong: list[str] = []
    locks_left = 0
    try:
        for round_ in range(3):
            finish = crash_load(server, book, rnd, f"r{round_}")
            time.sleep(rnd.uniform(0.5, 1.1))
            server.kill()
            finish()
            wrong += check_files_whole(server)
            leftovers = {}
            for folder in ("INBOX", "Sent", "Trash"):
                path = folder_path(server, folder)
                for item in (path / "tmp").iterdir():
                    found = re.search(rb"Message-ID: <([^>]+)>", item.read_bytes())
                    if found:
                        leftovers[found.group(1).decode()] = folder
                for lock in path.glob("dovecot-uidlist.lock"):
                    lock.unlink()
                    locks_left += 1
            server.start()
            wrong += [
                f"round {round_}: {w}"
                for w in check_after_crash(server, book, leftovers)
            ]
    finally:
        server.kill()
    print(
        f"\ncrash: {len(book.accepted)} delivered, {len(book.appended)} appended, "
        f"{len(book.moved)} moved, {locks_left} uidlist locks left by the kills"
    )
    assert len(book.accepted) > 10 and len(book.appended) > 5 and book.moved
    assert not wrong, "\n".join(wrong[:30])


def check_after_crash(server: PowerMail, book: CrashBook, leftovers: dict[str, str]):
    verifier = Session(server, "verifier", Ledger())
    listings = {f: listing(verifier, f) for f in ("INBOX", "Sent", "Trash")}
    status = {}
    for folder in listings:
        _, untagged = verifier.command(
            b"STATUS %s (UIDNEXT UIDVALIDITY)" % folder.encode()
        )
        status[folder] = tuple(
            int(n)
            for n in re.search(
                rb"UIDNEXT (\d+) UIDVALIDITY (\d+)", untagged[0]
            ).groups()
        )
    verifier.close()
    by_uid = {f: {uid: (m, fl) for uid, m, fl in rows} for f, rows in listings.items()}
    everywhere = {m for rows in listings.values() for _, m, _ in rows}
    wrong = []
    for msgid in book.accepted:
        if msgid not in everywhere:
            wrong.append(f"{msgid} got its 250 and is gone")
    for folder, validity, uid, msgid in book.appended:
        if status[folder][1] != validity:
            wrong.append(f"{folder} UIDVALIDITY {status[folder][1]} after {validity}")
        moved = folder == "INBOX" and uid in book.move_sent
        if not moved and by_uid[folder].get(uid, ("",))[0] != msgid:
            wrong.append(
                f"APPENDUID {folder} {uid} ({msgid}) is {by_uid[folder].get(uid)}"
            )
    for (folder, uid), msgid in book.ledger.msgid.items():
        now = by_uid[folder].get(uid)
        if now is not None and now[0] != msgid:
            wrong.append(f"{folder} UID {uid} was {msgid}, is {now[0]} now")
        if now is None and folder == "INBOX" and uid not in book.move_sent:
            wrong.append(f"INBOX UID {uid} ({msgid}) vanished")
        if uid >= status[folder][0]:
            wrong.append(f"{folder} UIDNEXT {status[folder][0]}, UID {uid} was seen")
    for uid, dest in book.moved.items():
        if uid in by_uid["INBOX"]:
            wrong.append(f"INBOX UID {uid} is still there after its MOVE said OK")
        if dest not in by_uid["Trash"]:
            wrong.append(f"Trash UID {dest} of the MOVE of {uid} is missing")
    for uid, stores in book.stores.items():
        if uid in book.move_sent or uid not in by_uid["INBOX"]:
            continue
        # The messages come without flags; a STORE cut short may or may not
        # have been done.
        done = [frozenset(), *(flags for flags, ok in stores if ok)]
        allowed = set(done[-1:]) | ({stores[-1][0]} if not stores[-1][1] else set())
        if by_uid["INBOX"][uid][1] not in allowed:
            wrong.append(
                f"INBOX UID {uid} has {by_uid['INBOX'][uid][1]}, STOREd {stores}"
            )
    for folder, rows in listings.items():
        files = message_files(folder_path(server, folder))
        if len(rows) != len(files):
            wrong.append(f"{folder}: {len(rows)} messages, {len(files)} files")
        _, next_uid, records = parse_uidlist(
            folder_path(server, folder) / "dovecot-uidlist"
        )
        if records and next_uid <= max(records):
            wrong.append(f"{folder}: uidlist N{next_uid} with UID {max(records)}")
    for msgid, folder in leftovers.items():
        if msgid in {m for _, m, _ in listings[folder]} and msgid not in book.accepted:
            files = message_files(folder_path(server, folder)).values()
            if not any(msgid.encode() in p.read_bytes() for p in files):
                wrong.append(f"{folder}: {msgid} shows though it is only in tmp/")
    return wrong


def test_a_uidlist_lock_left_by_a_crash_does_not_block_the_folder(tmp_path):
    """SIGKILL while a worker thread holds INBOX's dovecot-uidlist.lock
    (most kills under load do: it is held across the fsyncs of every
    APPEND, MOVE and new-mail scan) leaves the lock file behind.

    Found by this pass, fixed in 464b86b: after the restart _DotLock waited for
    the lock to turn 120 s stale, so for two minutes APPEND answers NO [INUSE]
    after 20 s, SELECT takes 10 s and hides the mail that arrived since, and
    each of those waits holds one of the few worker threads of all users.  The
    lock is PowerMail's own (its data_dir lock proves no other PowerMail runs),
    so the restarted server must be usable at once: APPEND OK, new mail seen."""
    server = PowerMail(write_config(tmp_path))
    server.start()
    lock = server.maildir("alice") / "dovecot-uidlist.lock"
    rnd = random.Random(7)
    try:
        for attempt in range(10):
            finish = crash_load(server, CrashBook(), rnd, f"k{attempt}")
            time.sleep(rnd.uniform(0.5, 1.0))
            server.kill()
            finish()
            if lock.exists():
                break
            server.start()
        assert lock.exists(), "no kill left the lock: the test did not test"
        server.start()
        session = wire_session(server)
        data = message_bytes("after-the-crash@sender.test")
        started = time.monotonic()
        try:
            tagged, _ = session.command(
                b"APPEND INBOX {%d+}\r\n%s" % (len(data), data), timeout=5
            )
        except TimeoutError:
            tagged = b"(no answer in 5 s)"
        assert re.match(rb"t\d+ OK \[APPENDUID ", tagged), (
            f"APPEND after the restart: {tagged!r} in {time.monotonic() - started:.1f} s"
        )
        tagged, untagged = session.command(b"SELECT INBOX", timeout=5)
        exists = [r for r in untagged if r.endswith(b" EXISTS\r\n")]
        files = message_files(server.maildir("alice"))
        assert exists == [b"* %d EXISTS\r\n" % len(files)]
    finally:
        server.kill()


# -- 3. other programs change the Maildir under open sessions --------------------


def file_of(server: PowerMail, uid: int, folder: str = "INBOX") -> Path:
    """The message file of ``uid``, found through dovecot-uidlist."""
    path = folder_path(server, folder)
    _, _, records = parse_uidlist(path / "dovecot-uidlist")
    return message_files(path)[records[uid]]


def start_idle(session: Session) -> bytes:
    tag = b"t%d" % next(session.tags)
    session.send(tag + b" IDLE\r\n")
    assert session.read_response() == b"+ idling\r\n"
    return tag


def idle_news(session: Session, count: int, timeout: float = 4.0) -> list[bytes]:
    """The next ``count`` untagged responses of an idling session."""
    news = []
    deadline = time.monotonic() + timeout
    while len(news) < count:
        try:
            news.append(session.read_response(max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            break
    return news


def without_recent(responses: list[bytes]) -> list[bytes]:
    return [r.replace(b" \\Recent", b"").replace(b"\\Recent", b"") for r in responses]


def test_renames_deletions_and_dovecot_records_reach_open_sessions(server):
    """Another program changes flags by renaming (:2,S to :2,FS), deletes a
    file, and adds a message as Dovecot does (file in cur/, a line
    ``<uid> :<name>`` appended to dovecot-uidlist under its lock, a new
    keyword in dovecot-keywords): a session's next command and an idling
    session are told each change with the right number, UID and flags, and
    the next APPEND gets a UID above Dovecot's."""
    fill_inbox(server, 4)
    setup = wire_session(server, "setup")
    setup.select("INBOX")
    tagged, _ = setup.command(b"STORE 1:4 +FLAGS.SILENT (\\Seen)")
    assert b" OK " in tagged
    setup.close()
    plain, idler = wire_session(server, "plain"), wire_session(server, "idler")
    plain.select("INBOX")
    idler.select("INBOX")
    start_idle(idler)
    inbox = server.maildir("alice")

    # A flag added by a rename.
    path = file_of(server, 2)
    os.rename(path, path.with_name(path.name.replace(":2,S", ":2,FS")))
    tagged, untagged = plain.command(b"NOOP")
    assert without_recent(untagged) == [
        b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Seen))\r\n"
    ]
    assert idle_news(idler, 1) == [b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Seen))\r\n"]

    # A file removed.
    file_of(server, 3).unlink()
    tagged, untagged = plain.command(b"NOOP")
    assert untagged == [b"* 3 EXPUNGE\r\n"]
    assert idle_news(idler, 1) == [b"* 3 EXPUNGE\r\n"]

    # Dovecot delivers one and records it itself, with a UID above N.
    _, next_uid, _ = parse_uidlist(inbox / "dovecot-uidlist")
    dovecot_uid = next_uid + 2
    data = message_bytes("from-dovecot@sender.test")
    base = f"1800000000.M1P1.dovecot,S={len(data)},W={len(data)}"
    (inbox / "tmp" / base).write_bytes(data)
    os.rename(inbox / "tmp" / base, inbox / "cur" / f"{base}:2,S")
    lock = os.open(inbox / "dovecot-uidlist.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with open(inbox / "dovecot-uidlist", "a") as uidlist:
        uidlist.write(f"{dovecot_uid} :{base}\n")
    os.close(lock)
    os.unlink(inbox / "dovecot-uidlist.lock")
    tagged, untagged = plain.command(b"NOOP")
    assert untagged[0] == b"* 4 EXISTS\r\n", untagged
    assert idle_news(idler, 2)[0] == b"* 4 EXISTS\r\n"
    tagged, untagged = plain.command(b"FETCH 4 (UID FLAGS)")
    assert untagged == [b"* 4 FETCH (UID %d FLAGS (\\Seen))\r\n" % dovecot_uid]

    # Dovecot adds a keyword: dovecot-keywords first, then the rename.
    (inbox / "dovecot-keywords").write_text("0 $Label1\n")
    path = file_of(server, 1)
    os.rename(path, path.with_name(path.name.replace(":2,S", ":2,Sa")))
    tagged, untagged = plain.command(b"NOOP")
    assert without_recent(untagged) == [b"* 1 FETCH (UID 1 FLAGS (\\Seen $Label1))\r\n"]
    assert idle_news(idler, 1) == [b"* 1 FETCH (UID 1 FLAGS (\\Seen $Label1))\r\n"]

    data = message_bytes("after-dovecot@sender.test")
    tagged, _ = plain.command(b"APPEND INBOX {%d+}\r\n%s" % (len(data), data))
    assert re.search(rb"APPENDUID \d+ %d\]" % (dovecot_uid + 1), tagged), tagged
    assert idle_news(idler, 2)[0] == b"* 5 EXISTS\r\n"
    assert traceback_free(server) == []


def test_a_rewritten_dovecot_keywords_file_is_seen_and_kept(server):
    """An administrator's script renames a keyword in dovecot-keywords
    ("0 $Old" becomes "0 $New"; the files keep their letter a): the next
    command must show $New, and a later STORE must keep it.

    Found by this pass, fixed in 4eb17c1: Folder._sync_locked trusted its cached
    snapshot while cur/, new/ and dovecot-uidlist are unchanged, and
    dovecot-keywords is not in that stamp: the change stays unseen until
    something else changes, and STORE +FLAGS (\\Seen) then writes the stale set
    {$Old, \\Seen}: $Old gets letter b again ("1 $Old" is added to
    dovecot-keywords), the file becomes :2,Sb and the message has lost $New."""
    fill_inbox(server, 1)
    session = wire_session(server)
    session.select("INBOX")
    tagged, _ = session.command(b"STORE 1 +FLAGS.SILENT ($Old)")
    assert b" OK " in tagged
    inbox = server.maildir("alice")
    assert (inbox / "dovecot-keywords").read_text() == "0 $Old\n"
    # Past the two seconds in which a scan does not trust mtimes.
    time.sleep(2.2)
    tagged, _ = session.command(b"NOOP")

    staged = inbox / "dovecot-keywords.new"
    staged.write_text("0 $New\n")
    os.rename(staged, inbox / "dovecot-keywords")
    tagged, untagged = session.command(b"NOOP")
    told = without_recent(untagged)
    tagged, untagged = session.command(b"STORE 1 +FLAGS (\\Seen)")
    stored = without_recent(untagged)
    name = file_of(server, 1).name
    assert (told, stored, name.rsplit(",", 1)[1]) == (
        [b"* 1 FETCH (UID 1 FLAGS ($New))\r\n"],
        [b"* 1 FETCH (FLAGS (\\Seen $New))\r\n"],
        "Sa",
    )


def test_a_uidvalidity_change_under_a_selected_session_ends_it(server):
    """The uidlist of a selected INBOX is lost (an administrator removed a
    broken one, Dovecot rebuilt it) while a message was deleted: the
    server gives new UIDs under a new UIDVALIDITY, and the session that
    still holds the old ones must be ended (BYE), as Dovecot does, before
    any reply of it uses a UID that now names another message.

    Found by this pass, fixed in fd9b5ff: catch_up only diffed UIDs and ignored
    the snapshot's new UIDVALIDITY: the session gets "* 3 EXPUNGE" and carries
    on, and its UID 1 (m.0 a moment ago) is now m.1: a client's cached UID 1, or
    its UID STORE/UID EXPUNGE 1, reaches the wrong message.  RFC 3501 2.3.1.1:
    UIDs of the old UIDVALIDITY must never be reused for other messages in a
    session that knows them."""
    fill_inbox(server, 3)
    ledger = Ledger()
    session = Session(server, "a", ledger)
    session.select("INBOX")
    assert ledger.msgid[("INBOX", 1)] == "m.0@sender.test"
    file_of(server, 1).unlink()
    (server.maildir("alice") / "dovecot-uidlist").unlink()

    session.send(b"n NOOP\r\nf UID FETCH 1 (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n")
    told = []
    try:
        while not told or not told[-1].startswith(b"f "):
            told.append(session.read_response(timeout=5))
    except (ConnectionError, TimeoutError):
        pass
    assert told and told[0].startswith(b"* BYE "), told
    assert not any(b"m.1@sender.test" in r for r in told), told


def test_flag_renames_by_another_program_during_deliveries_keep_every_uid(server):
    """A program renames 50 files at a time (toggling \\Seen) as fast as it
    can while 40 messages arrive over SMTP and a session syncs: a rename
    seen mid-scan must not look like a deletion, so no EXPUNGE is sent,
    no message changes its UID and every new message gets a new one."""
    inbox = server.maildir("alice")
    inbox.mkdir(parents=True, exist_ok=True)
    wire_session(server, "prepare").close()
    for i in range(200):
        data = message_bytes(f"old.{i}@sender.test")
        name = f"1700000{i:03d}.M{i}P1.host,S={len(data)},W={len(data)}:2,"
        (inbox / "tmp" / name).write_bytes(data)
        os.rename(inbox / "tmp" / name, inbox / "cur" / name)
    ledger = Ledger()
    session = Session(server, "syncer", ledger)
    session.select("INBOX")
    before = {uid: ledger.msgid[("INBOX", uid)] for uid in session.known()}
    stop = threading.Event()
    renames = itertools.count()

    def rename() -> None:
        rnd = random.Random(3)
        while not stop.is_set():
            for name in rnd.sample(os.listdir(inbox / "cur"), 50):
                toggled = name[:-1] if name.endswith("S") else name + "S"
                try:
                    os.rename(inbox / "cur" / name, inbox / "cur" / toggled)
                    next(renames)
                except FileNotFoundError:
                    pass

    renamer = threading.Thread(target=rename, daemon=True)
    deliverer = SmtpDeliverer(server, "new", 40)
    renamer.start()
    deliverer.start()
    expunges = 0
    while deliverer.is_alive():
        _, untagged = session.command(b"NOOP")
        expunges += sum(r.endswith(b" EXPUNGE\r\n") for r in untagged)
        session.learn()
    stop.set()
    renamer.join()
    session.command(b"NOOP")
    session.learn()
    assert next(renames) > 1000
    assert expunges == 0
    assert not ledger.problems.items and not ledger.conflicts.items
    after = {uid: m for uid, m, _ in listing(Session(server, "v", ledger), "INBOX")}
    assert {u: after.get(u) for u in before} == before
    new = sorted(u for u in after if u not in before)
    assert len(new) == 40 and new[0] > max(before)
    assert sorted(after[u] for u in new) == sorted(deliverer.accepted)
    assert traceback_free(server) == []


# -- 4. many folders ----------------------------------------------------------------


def pipelined(
    session: Session, commands: list[bytes], timeout: float = 60
) -> list[bytes]:
    """Send all commands at once; every response, in order."""
    tags = [b"p%d" % next(session.tags) for _ in commands]
    session.send(
        b"".join(t + b" " + c + b"\r\n" for t, c in zip(tags, commands, strict=True))
    )
    out = []
    for tag in tags:
        tagged, untagged = session.until_tag(tag, timeout)
        out.extend(untagged)
        out.append(tagged)
    return out


def test_five_hundred_folders_list_and_status_correctly_and_fast(server):
    """500 folders (10 parents of 49 children): LIST "" "*" names each once
    with the right children attributes, and a STATUS of every one is right;
    LIST takes under a second, 500 STATUS under ten (timings printed)."""
    session = wire_session(server)
    names = [f"P{p}" if c == 0 else f"P{p}.c{c}" for p in range(10) for c in range(50)]
    started = time.monotonic()
    replies = pipelined(session, [b"CREATE " + n.encode() for n in names])
    created = time.monotonic() - started
    assert all(r.endswith(b" OK Create completed.\r\n") for r in replies)
    filled = names[::25]
    for name in filled:
        data = message_bytes(f"in.{name}@sender.test")
        tagged, _ = session.command(
            b"APPEND %s {%d+}\r\n%s" % (name.encode(), len(data), data)
        )
        assert b" OK [APPENDUID " in tagged

    started = time.monotonic()
    tagged, untagged = session.command(b'LIST "" "*"')
    listed = time.monotonic() - started
    assert tagged.endswith(b" OK List completed.\r\n")
    rows = [
        re.fullmatch(rb'\* LIST \(([^)]*)\) "\." (\S+)\r\n', r).groups()
        for r in untagged
    ]
    shown = [name.decode() for _, name in rows]
    assert sorted(shown) == sorted(["INBOX", "Sent", "Drafts", "Trash", "Junk", *names])
    for attributes, name in rows:
        parent = re.fullmatch(rb"P\d", name) is not None
        assert (b"\\HasChildren" in attributes) == parent, (name, attributes)
    tagged, untagged = session.command(b'LIST "" "P3.%"')
    assert len(untagged) == 49

    started = time.monotonic()
    replies = pipelined(
        session,
        [b"STATUS %s (MESSAGES UIDNEXT UIDVALIDITY)" % n.encode() for n in names],
    )
    statused = time.monotonic() - started
    statuses = {
        m.group(1).decode(): (int(m.group(2)), int(m.group(3)))
        for r in replies
        if (m := re.match(rb"\* STATUS (\S+) \(MESSAGES (\d+) UIDNEXT (\d+) ", r))
    }
    assert statuses == {n: (1, 2) if n in filled else (0, 1) for n in names}
    print(
        f"\n500 folders: CREATE {created:.2f} s, LIST {listed * 1000:.0f} ms, "
        f"STATUS x500 {statused:.2f} s"
    )
    assert listed < 1.0 and statused < 10.0, (listed, statused)


def make_tree(session: Session, parent: str, children: int) -> None:
    replies = pipelined(
        session,
        [b"CREATE " + parent.encode()]
        + [b"CREATE %s.c%d" % (parent.encode(), i) for i in range(children)],
    )
    assert all(r.endswith(b" OK Create completed.\r\n") for r in replies)


def test_rename_of_a_folder_with_fifty_children_keeps_their_mail(server):
    """RENAME Proj Done moves Proj and its 50 children with their UIDs,
    UIDVALIDITY and flags while another session has Proj.c7 selected; that
    session is told the folder is gone (BYE), nothing fails in the log."""
    session = wire_session(server)
    make_tree(session, "Proj", 50)
    data = message_bytes("child@sender.test")
    tagged, _ = session.command(
        b"APPEND Proj.c7 (\\Flagged) {%d+}\r\n%s" % (len(data), data)
    )
    assert b" OK [APPENDUID " in tagged
    _, before = session.command(b"STATUS Proj.c7 (MESSAGES UIDNEXT UIDVALIDITY)")
    other = wire_session(server, "other")
    other.select("Proj.c7")

    started = time.monotonic()
    tagged, _ = session.command(b"RENAME Proj Done")
    took = time.monotonic() - started
    assert tagged.endswith(b" OK Rename completed.\r\n"), tagged
    assert took < 2.0, took
    _, untagged = session.command(b'LIST "" "*"')
    shown = sorted(re.search(rb'"\." (\S+)\r\n', r).group(1).decode() for r in untagged)
    assert shown == sorted(
        ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Done"]
        + [f"Done.c{i}" for i in range(50)]
    )
    _, after = session.command(b"STATUS Done.c7 (MESSAGES UIDNEXT UIDVALIDITY)")
    assert after == [before[0].replace(b"Proj.c7", b"Done.c7")]
    assert listing(session, "Done.c7") == [
        (1, "child@sender.test", frozenset({"\\Flagged"}))
    ]

    other.send(b"n NOOP\r\n")
    told = []
    try:
        while not told or not told[-1].startswith(b"n "):
            told.append(other.read_response(timeout=5))
    except ConnectionError:
        pass
    assert (
        told and told[0].startswith(b"* BYE ") or told == [b"n OK NOOP completed.\r\n"]
    )
    assert traceback_free(server) == []


def test_a_session_idling_in_a_renamed_folder_is_told(server):
    """A session IDLEs in Proj.c8 when another renames Proj (or deletes
    Proj.c8): the idler must be told at once (BYE, as a selected session's
    next command is), and the log stays quiet.

    Found by this pass, fixed in 4eb17c1: FolderNotifier._poll kept syncing the
    detached Folder, which raises FolderError NONEXISTENT; _failed logs it as a
    critical failure with a traceback every second for as long as the client
    idles (up to the 30 min idle timeout), and the client is never told."""
    session = wire_session(server)
    make_tree(session, "Proj", 10)
    idler = wire_session(server, "idler")
    idler.select("Proj.c8")
    start_idle(idler)
    tagged, _ = session.command(b"RENAME Proj Done")
    assert tagged.endswith(b" OK Rename completed.\r\n")
    news = idle_news(idler, 1, timeout=3.0)
    assert news and news[0].startswith(b"* BYE "), news
    assert traceback_free(server) == []


# -- 5. the fixes of the last break-it pass, pushed further --------------------------


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_list_with_a_long_wildcard_pattern_does_not_stall_the_server(server):
    """LIST "" "*%*%...*%b" (300 pairs, 601 octets, far below the 64 KiB
    command line) against two 150-octet folder names.

    Found by this pass, fixed in 4eb17c1: ListPattern.fullmatch tracked a set of
    pattern positions, but its _closure walks every run of wildcards from every
    live position, so a match costs name length x pattern length squared: ~1.5 s
    per name here, all on the reactor (_list_lines runs there), during which no
    session, IMAP or SMTP, is answered; "*%" x 2000 stalls the server for
    minutes.  A run of wildcards is one wildcard (collapse "*%*%" to "*"), and
    LIST's matching belongs in a worker thread like the others."""
    attacker, bystander = (
        wire_session(server, "attacker"),
        wire_session(server, "bystander"),
    )
    for i in range(2):
        tagged, _ = attacker.command(b"CREATE " + b"a" * 148 + b"%02d" % i)
        assert b" OK " in tagged
    attacker.send(b'l LIST "" "' + b"*%" * 300 + b'b"\r\n')
    time.sleep(0.1)
    started = time.monotonic()
    try:
        tagged, _ = bystander.command(b"NOOP", timeout=1.5)
    except TimeoutError:
        tagged = b"(no answer)"
    waited = time.monotonic() - started
    assert tagged.endswith(b" OK NOOP completed.\r\n") and waited < 1.0, (
        f"another session waited {waited:.1f} s for NOOP: {tagged!r}"
    )
    assert attacker.until_tag(b"l", timeout=2.0)[0] == b"l OK List completed.\r\n"


def test_move_and_copy_by_number_after_an_expunge_elsewhere_act_on_the_clients_numbers(
    server,
):
    """Another session expunged UIDs 2 and 4 of 1..5.  A session that still
    numbers them 1..5 sends MOVE 2:3 (its messages UID 2, gone, and UID 3),
    then, numbered 1..4 after that MOVE's own EXPUNGE, COPY 4 (UID 5) and
    MOVE 3 (UID 4, gone): UID 3 is moved, UID 5 copied, nothing else, and
    its next NOOP brings its numbering to what is left."""
    fill_inbox(server, 5)
    mover, expunger = wire_session(server, "mover"), wire_session(server, "expunger")
    # Before SELECT: in the selected state CREATE would bring the EXPUNGEs.
    tagged, _ = mover.command(b"CREATE Archive")
    mover.select("INBOX")
    expunger.select("INBOX")
    tagged, _ = expunger.command(b"UID STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    tagged, untagged = expunger.command(b"EXPUNGE")
    assert untagged == [b"* 4 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]

    tagged, untagged = mover.command(b"MOVE 2:3 Trash")
    moved = [mover.copyuid(r) for r in untagged if b"COPYUID" in r]
    assert moved == [([3], [1])], (untagged, tagged)
    # Its own move renumbered: 1, 2, 3, 4 are now UIDs 1, 2, 4, 5.
    assert mover.uids == [1, 2, 4, 5]
    tagged, _ = mover.command(b"COPY 4 Archive")
    assert mover.copyuid(tagged) == ([5], [1]), tagged
    tagged, untagged = mover.command(b"MOVE 3 Trash")
    assert not any(b"COPYUID" in r for r in untagged) and b" OK " in tagged

    mover.command(b"NOOP")
    assert mover.uids == mover.uid_search_all() == [1, 5]
    assert not mover.ledger.problems.items, mover.ledger.problems.items
    check = wire_session(server, "check")
    assert [m for _, m, _ in listing(check, "Trash")] == ["m.2@sender.test"]
    assert [m for _, m, _ in listing(check, "Archive")] == ["m.4@sender.test"]


def test_large_appends_to_sent_and_subfolders_are_stored_and_leave_no_spool(server):
    """APPENDs over the 64 KiB spool threshold: with a synchronizing
    literal to Sent.2026, two at once to Sent from two sessions, one to a
    folder that does not exist (NO [TRYCREATE]): the stored messages are
    byte for byte what was sent, and no spool file stays in any tmp/."""
    first, second = wire_session(server, "a"), wire_session(server, "b")
    tagged, _ = first.command(b"CREATE Sent.2026")
    body = b"z" * 98 + b"\r\n"
    big = message_bytes("big-sync@sender.test", extra=body * 2000)
    tag = b"t%d" % next(first.tags)
    first.send(tag + b" APPEND Sent.2026 (\\Seen) {%d}\r\n" % len(big))
    assert first.read_response().startswith(b"+ ")
    first.send(big + b"\r\n")
    tagged, _ = first.until_tag(tag)
    assert re.fullmatch(rb"t\d+ OK \[APPENDUID \d+ 1\] Append completed.\r\n", tagged)

    datas = {
        s: message_bytes(f"big-{s.name}@sender.test", extra=body * (1500 + i))
        for i, s in enumerate((first, second))
    }

    def append(session: Session):
        def job() -> None:
            data = datas[session]
            tagged, _ = session.command(b"APPEND Sent {%d+}\r\n%s" % (len(data), data))
            assert b" OK [APPENDUID " in tagged, tagged

        return job

    in_step(append(first), append(second))
    tagged, _ = first.command(b"APPEND Nowhere {%d+}\r\n%s" % (len(big), big))
    assert re.match(rb"t\d+ NO \[TRYCREATE\] ", tagged), tagged

    for folder, expected in (("Sent.2026", [big]), ("Sent", list(datas.values()))):
        first.command(b"EXAMINE " + folder.encode())
        stored = []
        for uid in range(1, len(expected) + 1):
            _, untagged = first.command(b"UID FETCH %d BODY.PEEK[]" % uid)
            size, rest = re.fullmatch(
                rb"\* \d+ FETCH \(UID \d+ BODY\[\] \{(\d+)\}\r\n(.*)\)\r\n",
                untagged[0],
                re.DOTALL,
            ).groups()
            assert int(size) == len(rest)
            stored.append(rest)
        assert sorted(stored) == sorted(expected), folder
    spools = [p for p in server.maildir("alice").rglob("tmp/*")]
    assert spools == []


def test_one_message_fetched_many_times_in_one_command_keeps_memory_bounded(server):
    """FETCH 1 (BODY.PEEK[] BODY.PEEK[] ...) x 60 of a 1 MB message to a
    client that does not read: the server must not hold 60 MB for it.

    Found by this pass, fixed in 4eb17c1 (repeats answered once): _fetch_batch
    bounds a batch by whole messages, and one message's response
    (fetch_response) holds every item it was asked for: 60 items of 1 MB make
    one 60 MB line (+~100 MiB RSS measured, 100 items +160 MiB); the 64 KiB
    command line allows ~5000 items, gigabytes from one session.  Items beyond
    the first should be streamed, or a FETCH refused past a total size."""
    inbox = server.maildir("alice")
    wire_session(server, "prepare").close()
    data = message_bytes("big@sender.test", extra=(b"y" * 76 + b"\r\n") * 13000)
    name = f"1700000000.M1P1.host,S={len(data)},W={len(data)}"
    (inbox / "tmp" / name).write_bytes(data)
    os.rename(inbox / "tmp" / name, inbox / "new" / name)
    session = wire_session(server)
    session.select("INBOX")
    tagged, _ = session.command(b"FETCH 1 BODY.PEEK[]")
    before = vm_rss_kib(server.process.pid)
    session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    session.send(b"f FETCH 1 (" + b" ".join([b"BODY.PEEK[]"] * 60) + b")\r\n")
    time.sleep(2)
    grown = vm_rss_kib(server.process.pid) - before
    assert grown < 16 * 1024, f"server grew by {grown // 1024} MiB"


def test_twenty_partial_sections_of_one_large_message_keep_memory_bounded(server):
    """FETCH 1 (BODY.PEEK[]<0.N> BODY.PEEK[]<1.N> ... <19.N>) of a 2.3 MB
    message to a client that does not read: twenty distinct sections, each
    nearly the whole message, within MAX_FETCH_SECTIONS.

    Found by this pass, fixed in fd9b5ff (such a message is refused with NO
    [LIMIT]): the response of one message is still made whole before it is
    written, so the 20-section cap bounds it at 20 x the message: +89 MiB
    measured for a 4.7 MB message, ~2 GiB for one of the 50 MiB APPENDLIMIT, per
    session.  A section's literal should be streamed from the file (or the sum
    of the sections' sizes bounded) so that a session holds about one message."""
    inbox = server.maildir("alice")
    wire_session(server, "prepare").close()
    data = message_bytes("big@sender.test", extra=(b"y" * 76 + b"\r\n") * 30000)
    name = f"1700000000.M1P1.host,S={len(data)},W={len(data)}"
    (inbox / "tmp" / name).write_bytes(data)
    os.rename(inbox / "tmp" / name, inbox / "new" / name)
    session = wire_session(server)
    session.select("INBOX")
    tagged, _ = session.command(b"FETCH 1 BODY.PEEK[]<0.1000>")
    before = vm_rss_kib(server.process.pid)
    session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sections = [b"BODY.PEEK[]<%d.%d>" % (i, len(data)) for i in range(20)]
    session.send(b"f FETCH 1 (" + b" ".join(sections) + b")\r\n")
    time.sleep(2)
    grown = vm_rss_kib(server.process.pid) - before
    assert grown < 16 * 1024, f"server grew by {grown // 1024} MiB"


def test_several_sections_of_a_large_message_that_add_up_to_it_are_answered(server):
    """A bound on what one FETCH may make in memory must not refuse what
    mail programs ask: the three 1 MB parts of a 3 MB multipart message in
    one FETCH, or its header fields and MIME headers of every part (a few
    hundred octets, however large the message).

    Open bug (from fd9b5ff): _too_big counts every section without a
    partial as the whole message, so when a message is over 1 MiB three
    parts, or five HEADER.FIELDS/MIME sections, "add up to" more than twice
    it plus 1 MiB and the message is left out with NO [LIMIT] (passes at
    aab72d9).  The budget needs each section's real size (the part's size
    from the body structure; header sections are small)."""
    part = (b"p" * 76 + b"\r\n") * 13000
    data = (
        b"Message-ID: <parts@sender.test>\r\nSubject: parts\r\n"
        b"From: carol@sender.test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"".join(
            b"--b\r\nContent-Type: text/plain\r\n\r\n%s\r\n" % part for _ in range(3)
        )
        + b"--b--\r\n"
    )
    session = wire_session(server)
    tagged, _ = session.command(b"APPEND INBOX {%d+}\r\n%s" % (len(data), data))
    assert b" OK [APPENDUID " in tagged
    session.select("INBOX")

    tagged, untagged = session.command(
        b"FETCH 1 (BODY.PEEK[1] BODY.PEEK[2] BODY.PEEK[3])", timeout=30
    )
    assert tagged.endswith(b" OK Fetch completed.\r\n"), tagged
    assert untagged[0].count(part) == 3
    tagged, untagged = session.command(
        b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[HEADER.FIELDS (FROM)]"
        b" BODY.PEEK[1.MIME] BODY.PEEK[2.MIME] BODY.PEEK[3.MIME])"
    )
    assert tagged.endswith(b" OK Fetch completed.\r\n"), tagged
    assert untagged[0].count(b"Content-Type: text/plain") == 3


def test_a_second_server_on_the_same_data_dir_is_refused_until_the_first_dies(
    tmp_path,
):
    """A second `twistd powermail` with other ports on the same data_dir
    stops at once with one line naming data_dir; the first keeps serving.
    Once the first is SIGKILLed (no clean-up) the lock is free: a new one
    starts and has the mail."""
    first = PowerMail(write_config(tmp_path / "one"))
    first.start()
    second_config = write_config(tmp_path / "two")
    second_config.write_text(
        second_config.read_text().replace(
            'data_dir = "data"', f'data_dir = "{first.data_dir}"'
        )
    )
    second = PowerMail(second_config)
    try:
        SmtpDeliverer(first, "before", 3).run()
        with pytest.raises(RuntimeError) as refused:
            second.start()
        assert f"another PowerMail is running with {first.data_dir}" in str(
            refused.value
        )
        assert "Traceback" not in str(refused.value)
        tagged, _ = wire_session(first).command(b"NOOP")
        assert tagged.endswith(b" OK NOOP completed.\r\n")

        first.kill()
        second.start()
        session = wire_session(second)
        session.select("INBOX")
        assert len(session.uids) == 3
    finally:
        first.kill()
        second.kill()


def test_silent_stores_of_two_sessions_at_once_tell_each_the_others_flags(server):
    """Two sessions add different keywords to the same 60 messages at the
    same time with +FLAGS.SILENT; after a NOOP each session must have been
    told the other's keyword on every message (RFC 3501 7.4.2: flag changes
    made elsewhere are announced with an untagged FETCH), so that what the
    client caches is what the server has: {$a, $b} everywhere.

    Found by this pass in 07c08f5, fixed in 4eb17c1: a silent STORE noted the
    message's whole new flags as told, so the other session's keyword, written
    between this session's sync and its STORE, was never sent."""
    fill_inbox(server, 60)
    first, second = wire_session(server, "a"), wire_session(server, "b")
    first.select("INBOX")
    second.select("INBOX")

    def add(session: Session, keyword: str):
        def job() -> None:
            for uid in range(1, 61):
                tagged, _ = session.command(
                    b"UID STORE %d +FLAGS.SILENT (%s)" % (uid, keyword.encode())
                )
                assert b" OK " in tagged, tagged
                # What the client knows: what it was told, and its own change.
                session.flags[uid] = session.flags[uid] | {keyword}

        return job

    in_step(add(first, "$a"), add(second, "$b"))
    for session in (first, second):
        session.command(b"NOOP")
        unknown = sorted(u for u, f in session.flags.items() if f != {"$a", "$b"})
        assert unknown == [], (
            f"{session.name} was never told the other's keyword on {len(unknown)} "
            f"messages: {[(u, sorted(session.flags[u])) for u in unknown[:5]]}"
        )


def test_an_append_or_copy_racing_a_delete_or_rename_of_its_folder_leaves_no_ghost(
    server,
):
    """One session APPENDs (or COPYs 2 messages) to Work{i}.c while another
    DELETEs that folder (or RENAMEs its parent), 10 times each way: the
    command succeeds or says NO [TRYCREATE]/[NONEXISTENT], never
    [SERVERBUG], and no folder is left that LIST shows but that cannot be
    selected or created.

    Found by this pass: the command found the Folder, then (a thread hop
    later) Folder.tmp_path() saw tmp/ missing and makedirs() the deleted
    folder's tmp/ again: a ".Work3.c" with only tmp/ was left, LIST showed
    it as a selectable folder, SELECT said NONEXISTENT, CREATE said
    ALREADYEXISTS (for Trash for good: prepare() took the directory for the
    folder, MOVE to Trash answered TRYCREATE at every login); or the staged
    file went away with the folder: NO [SERVERBUG].  fd9b5ff fixed the
    ghost and those two.

    Open bug: the folder can still be deleted while a COPY into it holds its
    dovecot-uidlist.lock, after the link into cur/: _DotLock.replace's
    os.rename raises FileNotFoundError, NO [SERVERBUG] and a traceback (in
    nearly every run of this test).  UserMail.delete and rename take neither
    the Folder's lock nor its dotlock."""
    fill_inbox(server, 2)
    worker, other = wire_session(server, "worker"), wire_session(server, "other")
    worker.select("INBOX")
    replies = []
    for i in range(40):
        tagged, _ = other.command(b"CREATE Work%d.c" % i)
        assert b" OK " in tagged
        data = message_bytes(f"race{i}@sender.test")
        if i % 4 < 2:
            command = b"APPEND Work%d.c {%d+}\r\n%s" % (i, len(data), data)
        else:
            command = b"UID COPY 1:2 Work%d.c" % i
        change = b"DELETE Work%d.c" % i if i % 2 else b"RENAME Work%d Done%d" % (i, i)

        def work(command=command) -> None:
            replies.append(worker.command(command)[0])

        def remove(change=change) -> None:
            tagged, _ = other.command(change)
            assert b" OK " in tagged, tagged

        in_step(work, remove)
    outcomes = sorted(
        {re.sub(rb"^t\d+ (\w+ (\[\w+)?).*\r\n", rb"\1", r) for r in replies}
    )
    root = server.maildir("alice")
    ghosts = sorted(
        p.name for p in root.glob(".*") if p.is_dir() and not (p / "cur").is_dir()
    )
    _, untagged = other.command(b'LIST "" "Work*"')
    listed = [r for r in untagged if b"\\Noselect" not in r]
    assert (ghosts, listed) == ([], []), outcomes
    assert all(b"SERVERBUG" not in r for r in replies), outcomes
    assert traceback_free(server) == []
