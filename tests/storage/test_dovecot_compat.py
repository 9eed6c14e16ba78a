"""Maildirpp and a real Dovecot 2.3 share one Maildir and agree on all of it.

An administrator may point Dovecot at a Maildir PowerMail wrote, or the
other way round: the UIDs, UIDVALIDITY, flags, keywords, sizes, received
dates, folders and subscriptions must read the same on both sides.
"""

from __future__ import annotations

import imaplib
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from dovecot import dovecot_available, start_dovecot

from powermail.storage import maildirpp
from powermail.storage.maildirpp import UserMail

pytestmark = pytest.mark.skipif(
    not dovecot_available(), reason="needs dovecot-imapd and root"
)

USER = "alice@example.test"
PASSWORD = "test-password"
UMLAUT_FOLDER = "Entw&APw-rfe"  # "Entwürfe" in modified UTF-7


@pytest.fixture(autouse=True)
def fresh_registry():
    maildirpp.forget_folders()
    yield
    maildirpp.forget_folders()


@pytest.fixture
def dovecot_for(tmp_path):
    """Start Dovecot on a Maildir; every one started is stopped at the end."""
    started = []

    def start(maildir: Path):
        server = start_dovecot(tmp_path / f"dovecot{len(started)}", maildir)
        started.append(server)
        return server

    yield start
    complaints = []
    for server in started:
        server.stop()
        complaints += [
            line
            for line in server.log().splitlines()
            if re.search(r": (Warning|Error|Fatal|Panic):", line)
            and "Killed with signal 15" not in line
        ]
    # Dovecot says so when it finds a file of ours broken and repairs it.
    assert complaints == []


def connect(server) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    client.login(USER, PASSWORD)
    return client


def check(result):
    typ, data = result
    assert typ == "OK", data
    return data


_LIST_LINE = re.compile(rb'\((?P<attrs>[^)]*)\) "\." (?P<name>.+)')


def listed(client: imaplib.IMAP4, command: str) -> dict[str, set[str]]:
    """The names LIST or LSUB shows, with their attributes."""
    data = check(client.list() if command == "LIST" else client.lsub('""', "*"))
    out = {}
    for line in data:
        match = _LIST_LINE.fullmatch(line)
        assert match, line
        name = match["name"].decode().strip('"')
        out[name] = set(match["attrs"].decode().split())
    return out


_FETCH = re.compile(
    rb"\d+ \(UID (?P<uid>\d+) FLAGS \((?P<flags>[^)]*)\) "
    rb'RFC822\.SIZE (?P<size>\d+) INTERNALDATE "(?P<date>[^"]+)"\)'
)


def mailbox_state(client: imaplib.IMAP4, name: str) -> tuple[int, int, dict]:
    """(UIDVALIDITY, UIDNEXT, {uid: (flags, size, internaldate)}) via EXAMINE."""
    check(client.select(name, readonly=True))
    uidvalidity = int(client.untagged_responses["UIDVALIDITY"][-1])
    uidnext = int(client.untagged_responses["UIDNEXT"][-1])
    messages = {}
    typ, data = client.uid("FETCH", "1:*", "(FLAGS RFC822.SIZE INTERNALDATE)")
    assert typ == "OK", data
    for line in data:
        if line is None:
            continue
        match = _FETCH.fullmatch(line)
        assert match, line
        flags = frozenset(match["flags"].decode().split()) - {"\\Recent"}
        date = datetime.strptime(match["date"].decode(), "%d-%b-%Y %H:%M:%S %z")
        messages[int(match["uid"])] = (flags, int(match["size"]), int(date.timestamp()))
    check(client.close())
    return uidvalidity, uidnext, messages


def our_state(mail: UserMail, name: str) -> tuple[int, int, dict]:
    """The same triple as UserMail sees it."""
    folder = mail.folder(name)
    snapshot = folder.sync(move_new=False)
    messages = {
        e.uid: (e.flags, folder.message_size(e.uid), int(e.internaldate))
        for e in snapshot.entries
    }
    return snapshot.uidvalidity, snapshot.next_uid, messages


def append(folder, data: bytes, flags=(), internaldate=None) -> int:
    path = folder.tmp_path()
    path.write_bytes(data)
    return folder.append(path, flags=frozenset(flags), internaldate=internaldate)


def test_dovecot_serves_a_maildir_usermail_wrote(tmp_path, dovecot_for):
    """Dovecot shows what UserMail wrote: UIDs, flags, keywords, folders."""
    mail = UserMail(tmp_path / "Maildir")
    mail.prepare()
    inbox = mail.folder("INBOX")
    append(inbox, b"Subject: one\r\n\r\nfirst\r\n", {"\\Seen", "$Forwarded", "Work"})
    append(inbox, b"Subject: two\n\nbare LF lines\n", {"\\Flagged", "\\Answered"})
    append(inbox, b"Subject: three\r\n\r\n3\r\n", {"\\Draft"}, internaldate=1.6e9)
    append(inbox, b"Subject: four\r\n\r\n4\r\n", {"\\Deleted", "Work"})
    # Delivered by another program (LF line ends, no sizes in the name):
    # the size UserMail counts goes into the uidlist as a W extension.
    (inbox.path / "new" / "1700000000.M1P1Q1.mx").write_bytes(
        b"Subject: five\n\nbody\n"
    )
    assert inbox.message_size(inbox.sync().entries[-1].uid) == 23
    inbox.expunge([3])
    assert (
        "\n5 W23 :1700000000.M1P1Q1.mx\n"
        in (inbox.path / "dovecot-uidlist").read_text()
    )
    inbox.store_flags({2: frozenset({"\\Flagged", "\\Seen", "Later"})})
    mail.create(UMLAUT_FOLDER)
    mail.create("Archive.2024")
    append(mail.folder(UMLAUT_FOLDER), b"Subject: draft\r\n\r\nx\r\n", {"Projekt"})
    mail.subscribe(UMLAUT_FOLDER)
    mail.subscribe("Archive.2024")
    mail.unsubscribe("Junk")

    names = ["INBOX", "Archive.2024", "Drafts", "Junk", "Sent", "Trash", UMLAUT_FOLDER]
    assert sorted(mail.folder_names()) == sorted(names)
    ours = {name: our_state(mail, name) for name in names}
    assert set(ours["INBOX"][2]) == {1, 2, 4, 5}

    server = dovecot_for(tmp_path / "Maildir")
    client = connect(server)
    try:
        folders = listed(client, "LIST")
        assert set(folders) == set(names) | {"Archive"}
        assert "\\Noselect" in folders["Archive"]
        assert set(listed(client, "LSUB")) == set(mail.subscriptions())
        assert set(mail.subscriptions()) == {
            "INBOX", "Sent", "Drafts", "Trash", UMLAUT_FOLDER, "Archive.2024"
        }  # fmt: skip
        for name in names:
            assert mailbox_state(client, name) == ours[name], name
        check(client.select("INBOX", readonly=True))
        typ, data = client.uid("FETCH", "2", "(BODY.PEEK[])")
        assert data[0][1] == b"Subject: two\r\n\r\nbare LF lines\r\n"
        check(client.close())

        # Dovecot goes on from UserMail's next UID...
        typ, data = client.append("INBOX", None, None, b"Subject: six\r\n\r\n")
        assert typ == "OK"
        assert f"[APPENDUID {ours['INBOX'][0]} {ours['INBOX'][1]}]" in data[0].decode()
        # ...and from its UIDVALIDITY counter.
        check(client.create("FromDovecot"))
        validity = mailbox_state(client, "FromDovecot")[0]
        assert validity > max(state[0] for state in ours.values())
    finally:
        client.logout()


def test_usermail_reads_a_maildir_dovecot_wrote(tmp_path, dovecot_for):
    """UserMail sees what Dovecot wrote, and Dovecot sees UserMail's changes."""
    maildir = tmp_path / "Maildir"
    server = dovecot_for(maildir)
    client = connect(server)
    try:
        for name in (UMLAUT_FOLDER, "Projects.2025", "Sent"):
            check(client.create(name))
        for name in ("INBOX", UMLAUT_FOLDER, "Projects.2025"):
            check(client.subscribe(name))
        check(
            client.append(
                "INBOX", r"(\Seen $Label1)", 1.7e9, b"Subject: a\r\n\r\na\r\n"
            )
        )
        check(client.append("INBOX", None, None, b"Subject: b\n\nLF only\n"))
        check(client.append("INBOX", r"(\Draft)", None, b"Subject: c\r\n\r\nc\r\n"))
        check(client.append("INBOX", None, None, b"Subject: d\r\n\r\nd\r\n"))
        check(client.append(UMLAUT_FOLDER, r"(Entwurf)", None, b"Subject: e\r\n\r\n"))
        check(client.select("INBOX"))
        check(client.uid("STORE", "2", "+FLAGS", r"(\Flagged Work)"))
        check(client.uid("STORE", "3", "+FLAGS", r"(\Deleted)"))
        check(client.expunge())
        check(client.close())
        theirs = {
            name: mailbox_state(client, name)
            for name in ("INBOX", UMLAUT_FOLDER, "Projects.2025", "Sent")
        }
        subscribed = set(listed(client, "LSUB"))
    finally:
        client.logout()
    server.stop()

    mail = UserMail(maildir)
    assert mail.folder_names() == ["INBOX", "Entw&APw-rfe", "Projects.2025", "Sent"]
    assert set(mail.subscriptions()) == subscribed == {
        "INBOX", UMLAUT_FOLDER, "Projects.2025"
    }  # fmt: skip
    for name, state in theirs.items():
        assert our_state(mail, name) == state, name
    assert set(theirs["INBOX"][2]) == {1, 2, 4}
    assert theirs["INBOX"][2][2][0] == {"\\Flagged", "Work"}

    # New UIDs go on from Dovecot's, and Dovecot (with its indexes from
    # before) sees the changes UserMail made.
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: f\r\n\r\nf\r\n", {"\\Seen", "Work", "Fresh"})
    assert uid == theirs["INBOX"][1] == 5
    inbox.store_flags({1: frozenset({"\\Answered", "Fresh"})})
    inbox.expunge([4])
    mail.subscribe("Sent")
    mail.unsubscribe("Projects.2025")
    mail.create("Later")
    time.sleep(0.01)
    expected = our_state(mail, "INBOX")
    assert set(expected[2]) == {1, 2, 5}

    server = dovecot_for(maildir)
    client = connect(server)
    try:
        assert mailbox_state(client, "INBOX") == expected
        assert set(listed(client, "LSUB")) == {"INBOX", UMLAUT_FOLDER, "Sent"}
        assert "Later" in listed(client, "LIST")
    finally:
        client.logout()
