"""PowerMail and Dovecot take turns serving one Maildir; mbsync fetches nothing twice.

The promise under test: an administrator may point Dovecot at the Maildir
PowerMail wrote, or move a Dovecot Maildir to PowerMail, and no client
downloads its mail again.  Each test fills alice's mailbox on one server,
mirrors it into a local Maildir with mbsync, stops that server and starts
the other on the same Maildir.  mbsync then runs again with the same
configuration and the same state files, pointed only at the other port: its
IMAP traffic must show no message fetched or written that it had already
seen, and imaplib must read the same UIDVALIDITY, UIDs, flags and keywords
from both servers.

mbsync logs in without TLS: the private Dovecot of ``tests/dovecot.py``
has none, and both servers allow a plaintext login over loopback.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import pytest
from dovecot import DovecotProcess, dovecot_available, start_dovecot
from powermail_process import PASSWORD, PowerMail, write_config
from test_sync_clients import (
    ALICE,
    ENTWURFE,
    FILED,
    LONG_LINE,
    PLAIN,
    SYNC_BUDGET,
    SYNC_TIMEOUT,
    TROUBLE,
    UTF8,
    LocalMessage,
    deliver,
    folder_names,
    mbsync_copy,
    mbsync_tls_keyword,
    mbsync_uids,
    report_with_attachment,
    snapshot,
    uid_in_name,
)

pytestmark = [
    pytest.mark.skipif(not dovecot_available(), reason="needs dovecot-imapd and root"),
    pytest.mark.skipif(shutil.which("mbsync") is None, reason="needs mbsync (isync)"),
]

# Maildir info letters as mbsync 1.4 maps them: the system flags, and P for
# the one keyword it carries.
MBSYNC_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "P": "$Forwarded",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
# PowerMail makes these at every login if they are missing.
SPECIAL_FOLDERS = ["Drafts", "Junk", "Sent", "Trash"]

NEWSLETTER = (
    b"From: news@sender.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: December news\r\n"
    b"Message-ID: <news-1@sender.test>\r\n"
    b"\r\n"
    b"Nothing new this month.\r\n"
)

# Appended while Dovecot serves the Maildir, after the last sync.
WHILE_ON_DOVECOT = (
    b"From: alice@example.test\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: Written while Dovecot served\r\n"
    b"Message-ID: <dovecot-1@example.test>\r\n"
    b"\r\n"
    b"Sent from the webmail on Dovecot.\r\n"
)

# Delivered by PowerMail's MX once it has taken over.
AFTER_TAKEOVER = (
    b"From: carol@sender.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: First mail after the move\r\n"
    b"Message-ID: <after-1@sender.test>\r\n"
    b"\r\n"
    b"Welcome to the new server.\r\n"
)

# mbsync's only complaint about a plaintext login: expected here, nothing else.
CLEARTEXT_WARNING = re.compile(
    r"\*\*\* IMAP Warning \*\*\* Password is being sent in the clear"
)
# With -Dn mbsync prints each command it sends after ">>> " and its tag, at
# the start of a line or, pipelined, after "(N in progress) ".
SENT = re.compile(r">>> \d+ (?P<command>.*)$", re.MULTILINE)
REFUSED = re.compile(r"^\d+ (?:NO|BAD)\b.*$", re.MULTILINE)
BODY_FETCH = re.compile(r"UID FETCH (?P<uids>\S+) \(.*(?:BODY(?:\.PEEK)?\[\]|RFC822\b)")
# Commands that change the server: none may go out unless the test expects it.
WRITES = re.compile(
    r"(?:UID )?(?:APPEND|STORE|EXPUNGE|COPY|MOVE|CREATE|DELETE|RENAME|SUBSCRIBE)\b"
)
# What PowerMail logs when something went wrong.
POWERMAIL_COMPLAINT = re.compile(r"#(?:warn|error|critical)\]|Traceback")
# Dovecot logs these when it finds a file it does not like and repairs it.
DOVECOT_COMPLAINT = re.compile(r": (?:Warning|Error|Fatal|Panic):")


# -- what a server serves ---------------------------------------------------------


class Message(NamedTuple):
    flags: frozenset[str]
    size: int
    internaldate: float
    data: bytes


class Box(NamedTuple):
    validity: int
    uid_next: int
    messages: dict[int, Message]


def connect(port: int) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    imap.login(ALICE, PASSWORD)
    return imap


def check(result: tuple[str, list]) -> list:
    typ, data = result
    assert typ == "OK", data
    return data


def served(port: int) -> dict[str, Box]:
    """Every folder as the server on ``port`` reads it, looked at read-only."""
    imap = connect(port)
    boxes = {}
    for name in folder_names(imap):
        [status] = check(imap.status(name, "(UIDVALIDITY UIDNEXT)"))
        validity = int(re.search(rb"UIDVALIDITY (\d+)", status).group(1))
        uid_next = int(re.search(rb"UIDNEXT (\d+)", status).group(1))

        check(imap.select(name, readonly=True))
        messages = {}
        for uid in check(imap.uid("SEARCH", "ALL"))[0].split():
            [meta] = check(imap.uid("FETCH", uid, "(FLAGS RFC822.SIZE INTERNALDATE)"))
            flags = re.search(rb"FLAGS \(([^)]*)\)", meta).group(1).decode().split()
            size = int(re.search(rb"RFC822\.SIZE (\d+)", meta).group(1))
            date = re.search(rb'INTERNALDATE "([^"]+)"', meta).group(1).decode()
            received = datetime.strptime(date, "%d-%b-%Y %H:%M:%S %z").timestamp()
            data = check(imap.uid("FETCH", uid, "(BODY.PEEK[])"))[0][1]
            messages[int(uid)] = Message(
                frozenset(flags) - {"\\Recent"}, size, received, data
            )
        check(imap.unselect())
        boxes[name] = Box(validity, uid_next, messages)
    imap.logout()
    return boxes


def uid_of(box: Box, message_id: bytes) -> int:
    [uid] = [
        uid
        for uid, message in box.messages.items()
        if b"\r\nMessage-ID: " + message_id + b"\r\n" in message.data
    ]
    return uid


def store(port: int, folder: str, uid: int, change: str, flags: str) -> None:
    imap = connect(port)
    check(imap.select(folder))
    check(imap.uid("STORE", str(uid), change, flags))
    imap.logout()


def append(port: int, folder: str, flags: str, data: bytes) -> None:
    imap = connect(port)
    check(imap.append(folder, flags, None, data))
    imap.logout()


# -- the host whose Maildir changes hands -----------------------------------------


class MailHost:
    """alice's Maildir in PowerMail's data directory, served by one server at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = write_config(directory / "powermail")
        self.maildir = PowerMail(self.config).maildir("alice")
        self._running: list[PowerMail | DovecotProcess] = []
        self._dovecots = 0

    def start_powermail(self) -> PowerMail:
        server = PowerMail(self.config)
        self._running.append(server)
        server.start()
        return server

    def start_dovecot(self) -> DovecotProcess:
        self._dovecots += 1
        workdir = self.directory / f"dovecot{self._dovecots}"
        server = start_dovecot(workdir, self.maildir, user=ALICE, password=PASSWORD)
        self._running.append(server)
        return server

    def stop(self, server: PowerMail | DovecotProcess) -> None:
        """Stop ``server``, which must have found nothing wrong in the Maildir."""
        server.stop()
        self._running.remove(server)
        if isinstance(server, PowerMail):
            log = server.log_text()
            assert not POWERMAIL_COMPLAINT.search(log), log
        else:
            complaints = [
                line
                for line in server.log().splitlines()
                if DOVECOT_COMPLAINT.search(line)
                and "Killed with signal 15" not in line
            ]
            assert complaints == [], server.log()

    def stop_all(self) -> None:
        for server in reversed(self._running):
            server.stop()
        self._running.clear()


@pytest.fixture
def host(tmp_path):
    mail_host = MailHost(tmp_path)
    yield mail_host
    # Dovecot gives the Maildir back to root only when stopped.
    mail_host.stop_all()


# -- mbsync -----------------------------------------------------------------------


class Sync(NamedTuple):
    """What one mbsync run sent to the server."""

    commands: list[str]

    def downloads(self) -> list[tuple[str, str]]:
        """(folder, UID set) of every message body fetched."""
        out = []
        folder = None
        for command in self.commands:
            selected = re.fullmatch(r'(?:SELECT|EXAMINE) "?(.*?)"?', command)
            if selected:
                folder = selected.group(1)
            fetch = BODY_FETCH.match(command)
            if fetch:
                out.append((folder, fetch.group("uids")))
        return out

    def writes(self) -> list[str]:
        return [command for command in self.commands if WRITES.match(command)]


class Laptop:
    """A local Maildir that mbsync keeps in step with whichever server runs."""

    def __init__(self, directory: Path) -> None:
        self.home = directory
        self.mail = directory / "Mail"
        self.mail.mkdir(parents=True)
        self.rc = directory / "mbsyncrc"

    def point_at(self, port: int) -> None:
        """The one line of the configuration that changes between servers."""
        self.rc.write_text(
            f"""\
IMAPAccount host
Host 127.0.0.1
Port {port}
User {ALICE}
Pass {PASSWORD}
{mbsync_tls_keyword()} None

IMAPStore remote
Account host

MaildirStore local
Path {self.mail}/
Inbox {self.mail}/INBOX
SubFolders Verbatim

Channel mirror
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
""",
            encoding="utf-8",
        )

    def sync(self) -> Sync:
        """One run of mbsync, which must succeed with no complaint."""
        env = dict(os.environ, HOME=str(self.home))
        env.pop("PYTHONPATH", None)
        started = time.monotonic()
        done = subprocess.run(
            ["mbsync", "-Dn", "-a", "-c", str(self.rc)],
            capture_output=True,
            env=env,
            timeout=SYNC_TIMEOUT,
            check=False,
        )
        took = time.monotonic() - started
        output = done.stdout.decode("utf-8", errors="replace").replace("\r\n", "\n")
        errors = done.stderr.decode("utf-8", errors="replace")
        assert done.returncode == 0, output + errors
        assert [
            line
            for line in errors.splitlines()
            if not CLEARTEXT_WARNING.fullmatch(line)
        ] == [], errors
        assert not TROUBLE.search(output), output
        assert not REFUSED.search(output), output
        assert took < SYNC_BUDGET, f"mbsync took {took:.1f} s:\n{output}"
        return Sync(SENT.findall(output))

    def copies(self) -> dict[tuple[str, int], LocalMessage]:
        """Every local message by (folder, the server's UID)."""
        out = {}
        for name in self.folders():
            to_server = mbsync_uids(self.mail / name)
            for path in sorted((self.mail / name).glob("*/*")):
                if path.parent.name not in ("new", "cur"):
                    continue
                uid = to_server.get(uid_in_name(path))
                assert uid is not None, f"not synced: {path}"
                assert (name, uid) not in out, f"twice: {path}"
                info = path.name.partition(":2,")[2]
                flags = frozenset(MBSYNC_FLAGS[letter] for letter in info)
                out[name, uid] = LocalMessage(path, flags, path.read_bytes())
        return out

    def assert_mirrors(self, boxes: dict[str, Box]) -> None:
        """The local copy holds the server's folders, messages and the flags
        mbsync carries."""
        copies = self.copies()
        assert self.folders() == sorted(boxes)
        assert sorted(copies) == sorted(
            (name, uid) for name, box in boxes.items() for uid in box.messages
        )
        for (name, uid), copy in copies.items():
            message = boxes[name].messages[uid]
            assert copy.flags == message.flags & set(MBSYNC_FLAGS.values()), (name, uid)
            assert mbsync_copy(copy.data, message.data), (name, uid)

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.mail.iterdir() if (p / "cur").is_dir())


def assert_kept(
    before: dict[tuple[str, int], LocalMessage],
    after: dict[tuple[str, int], LocalMessage],
) -> None:
    """Every message in both is still the same file: not downloaded again.

    A fresh download would get a new name and a new random X-TUID; a flag
    change only renames the file's ``:2,`` part.
    """
    for key in before.keys() & after.keys():
        old, new = before[key], after[key]
        stem = old.path.name.partition(":2,")[0]
        assert new.path.name.partition(":2,")[0] == stem, (key, new.path.name)
        assert new.data == old.data, key


def assert_same_mail(powermail: dict[str, Box], dovecot: dict[str, Box]) -> None:
    """Both servers show each folder with the same UIDs, flags and octets."""
    assert sorted(powermail) == sorted(dovecot)
    for name, box in powermail.items():
        other = dovecot[name]
        assert (box.validity, box.uid_next) == (other.validity, other.uid_next), name
        assert sorted(box.messages) == sorted(other.messages), name
        for uid, message in box.messages.items():
            assert message == other.messages[uid], (name, uid)


# -- the tests --------------------------------------------------------------------


def fill_on_powermail(server: PowerMail) -> None:
    """Five deliveries to INBOX with flags and keywords; one in ``Entw&APw-rfe``."""
    for data in (report_with_attachment(), PLAIN, LONG_LINE, NEWSLETTER):
        deliver(server, data)
    deliver(server, UTF8, eight_bit=True)
    imap = connect(server.imap_port)
    check(imap.create(ENTWURFE))
    imap.logout()
    append(server.imap_port, ENTWURFE, "(\\Seen)", FILED)

    inbox = served(server.imap_port)["INBOX"]
    for message_id, flags in [
        (b"<report-1@sender.test>", "(\\Seen $Forwarded)"),
        (b"<plain-1@sender.test>", "(\\Flagged \\Answered Work)"),
        (b"<news-1@sender.test>", "(\\Seen Work)"),
        (b"<utf8-1@sender.test>", "(\\Draft)"),
    ]:
        store(server.imap_port, "INBOX", uid_of(inbox, message_id), "+FLAGS", flags)


def test_dovecot_takes_over_a_powermail_maildir_and_back(host, tmp_path):
    """Dovecot on PowerMail's Maildir: nothing to sync; back: only Dovecot's changes."""
    laptop = Laptop(tmp_path / "laptop")

    # Mail arrives at PowerMail and is mirrored once.
    powermail = host.start_powermail()
    fill_on_powermail(powermail)
    laptop.point_at(powermail.imap_port)
    first = laptop.sync()
    on_powermail = served(powermail.imap_port)
    assert len(first.downloads()) == 6
    laptop.assert_mirrors(on_powermail)
    inbox = on_powermail["INBOX"]
    long_uid = uid_of(inbox, b"<long-1@sender.test>")
    report_uid = uid_of(inbox, b"<report-1@sender.test>")
    plain_uid = uid_of(inbox, b"<plain-1@sender.test>")
    assert inbox.messages[report_uid].flags == {"\\Seen", "$Forwarded"}
    assert inbox.messages[plain_uid].flags == {"\\Flagged", "\\Answered", "Work"}
    host.stop(powermail)

    # Dovecot on the same Maildir: mbsync has nothing to do, on either side.
    files = snapshot(laptop.mail)
    assert {"INBOX/.mbsyncstate", f"{ENTWURFE}/.mbsyncstate"} <= set(files)
    dovecot = host.start_dovecot()
    laptop.point_at(dovecot.port)
    handover = laptop.sync()
    assert handover.downloads() == []
    assert handover.writes() == []
    assert snapshot(laptop.mail) == files
    assert_same_mail(on_powermail, served(dovecot.port))

    # Changes on Dovecot: a flag, a keyword dropped, a message appended.
    store(dovecot.port, "INBOX", long_uid, "+FLAGS", "(\\Flagged Work)")
    store(dovecot.port, "INBOX", report_uid, "-FLAGS", "($Forwarded)")
    append(dovecot.port, "INBOX", "(\\Seen)", WHILE_ON_DOVECOT)
    on_dovecot = served(dovecot.port)
    new_uid = uid_of(on_dovecot["INBOX"], b"<dovecot-1@example.test>")
    assert new_uid == inbox.uid_next
    host.stop(dovecot)

    # PowerMail again: it reads Dovecot's changes, and mbsync fetches only them.
    before = laptop.copies()
    powermail = host.start_powermail()
    assert_same_mail(served(powermail.imap_port), on_dovecot)
    laptop.point_at(powermail.imap_port)
    back = laptop.sync()
    assert back.downloads() == [("INBOX", str(new_uid))]
    assert back.writes() == []
    laptop.assert_mirrors(on_dovecot)
    after = laptop.copies()
    assert after.keys() - before.keys() == {("INBOX", new_uid)}
    assert before.keys() <= after.keys()
    assert_kept(before, after)
    assert after["INBOX", long_uid].flags == {"\\Flagged"}
    assert after["INBOX", report_uid].flags == {"\\Seen"}

    # And then all is quiet.
    files = snapshot(laptop.mail)
    quiet = laptop.sync()
    assert (quiet.downloads(), quiet.writes()) == ([], [])
    assert snapshot(laptop.mail) == files


def fill_on_dovecot(port: int) -> None:
    """A Dovecot account: INBOX, Sent and ``Entw&APw-rfe``, with flags and keywords."""
    for flags, data in [
        ("(\\Seen $Forwarded)", report_with_attachment()),
        ("(\\Flagged Work)", PLAIN),
        ("()", LONG_LINE),
        ("(\\Seen \\Answered)", UTF8),
        ("()", NEWSLETTER),
    ]:
        append(port, "INBOX", flags, data)
    imap = connect(port)
    check(imap.create(ENTWURFE))
    check(imap.create("Sent"))
    imap.logout()
    append(port, ENTWURFE, "(\\Seen \\Draft)", FILED)
    append(port, "Sent", "(\\Seen)", WHILE_ON_DOVECOT)


def test_powermail_takes_over_a_dovecot_maildir(host, tmp_path):
    """A Dovecot Maildir moved to PowerMail: mbsync gets only what changed since."""
    laptop = Laptop(tmp_path / "laptop")

    # A Dovecot account, mirrored once.
    dovecot = host.start_dovecot()
    fill_on_dovecot(dovecot.port)
    laptop.point_at(dovecot.port)
    first = laptop.sync()
    assert len(first.downloads()) == 7
    laptop.assert_mirrors(served(dovecot.port))

    # After that sync: a flag, an expunge of INBOX's last message, an append.
    inbox = served(dovecot.port)["INBOX"]
    plain_uid = uid_of(inbox, b"<plain-1@sender.test>")
    news_uid = uid_of(inbox, b"<news-1@sender.test>")
    assert news_uid == max(inbox.messages)
    store(dovecot.port, "INBOX", plain_uid, "+FLAGS", "(\\Seen)")
    imap = connect(dovecot.port)
    check(imap.select("INBOX"))
    check(imap.uid("STORE", str(news_uid), "+FLAGS", "(\\Deleted)"))
    check(imap.expunge())
    imap.logout()
    append(dovecot.port, ENTWURFE, "()", WHILE_ON_DOVECOT)
    on_dovecot = served(dovecot.port)
    draft_uid = uid_of(on_dovecot[ENTWURFE], b"<dovecot-1@example.test>")
    host.stop(dovecot)

    # PowerMail serves what Dovecot did, and adds its missing special folders.
    before = laptop.copies()
    powermail = host.start_powermail()
    on_powermail = served(powermail.imap_port)
    added = sorted(set(on_powermail) - set(on_dovecot))
    assert added == sorted(set(SPECIAL_FOLDERS) - set(on_dovecot))
    for name in added:
        assert on_powermail[name].messages == {}, name
    assert_same_mail({name: on_powermail[name] for name in on_dovecot}, on_dovecot)

    # mbsync fetches the one new message, drops the expunged one, renames
    # the flagged one; it finds the empty special folders and makes them.
    laptop.point_at(powermail.imap_port)
    takeover = laptop.sync()
    assert takeover.downloads() == [(ENTWURFE, str(draft_uid))]
    assert takeover.writes() == []
    laptop.assert_mirrors(on_powermail)
    after = laptop.copies()
    assert before.keys() - after.keys() == {("INBOX", news_uid)}
    assert after.keys() - before.keys() == {(ENTWURFE, draft_uid)}
    assert_kept(before, after)
    assert after["INBOX", plain_uid].flags == {"\\Flagged", "\\Seen"}

    # PowerMail's MX goes on after Dovecot's last UID, the expunged one too.
    deliver(powermail, AFTER_TAKEOVER)
    inbox = served(powermail.imap_port)["INBOX"]
    assert uid_of(inbox, b"<after-1@sender.test>") == news_uid + 1
    assert inbox.validity == on_dovecot["INBOX"].validity
    fresh = laptop.sync()
    assert fresh.downloads() == [("INBOX", str(news_uid + 1))]
    assert fresh.writes() == []

    files = snapshot(laptop.mail)
    quiet = laptop.sync()
    assert (quiet.downloads(), quiet.writes()) == ([], [])
    assert snapshot(laptop.mail) == files
