"""mbsync and offlineimap mirror a mailbox through the real `twistd powermail`.

Each test fills alice's mailbox the way production does (mail over SMTP, a
folder with a non-ASCII name made over IMAP), mirrors it into a local Maildir
over TLS with the Debian sync program, and compares every message octet for
octet with what IMAP serves.  It then changes the local copy (a flag, a
deletion, a new message), syncs back, checks the server with imaplib, and
ends with a sync that must change nothing on either side.
"""

from __future__ import annotations

import hashlib
import imaplib
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import NamedTuple

import pytest
from powermail_process import PASSWORD, PowerMail

ALICE = "alice@example.test"
# "Entwürfe" in modified UTF-7 (RFC 3501 5.1.3); both clients keep this
# name on disk as it is (isync 1.4, offlineimap without utf8foldernames).
ENTWURFE = "Entw&APw-rfe"
# Maildir info letters and the IMAP system flags they stand for.
MAILDIR_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
# One sync of a handful of messages over loopback takes well under a second;
# a session that ends only when the server cuts it after its 10 s close grace
# (powermail.imap.protocol.CLOSE_GRACE) is a failure, not a slow machine.
SYNC_BUDGET = 5
SYNC_TIMEOUT = 20
# mbsync adds this header to every message it propagates, at the end of the
# header section, to find the message again if it gets no UID for it.
TUID_LINE = re.compile(rb"X-TUID: [A-Za-z0-9+/]{12}")
# The UID a sync client puts into a Maildir file name: the server's UID for
# offlineimap, the local folder's own UID for mbsync (see mbsync_uids).
UID_IN_NAME = re.compile(r",U=(\d+)(?=[,:]|$)")
# What either client prints when something went wrong.
TROUBLE = re.compile(r"\b(error|warning)\b", re.IGNORECASE)


# -- the mailbox ----------------------------------------------------------------


def report_with_attachment() -> bytes:
    """A multipart/mixed message: text, HTML alternative, binary attachment."""
    msg = EmailMessage()
    msg["From"] = "Carol Example <carol@sender.test>"
    msg["To"] = ALICE
    msg["Subject"] = "Quarterly report"
    msg["Message-ID"] = "<report-1@sender.test>"
    msg["Date"] = "Tue, 01 Dec 2026 10:00:00 +0100"
    msg.set_content("Hello Alice,\n\nthe report is attached.\n")
    msg.add_alternative("<p>Hello Alice,</p><p>the report is attached.</p>", "html")
    msg.add_attachment(
        bytes(range(256)) * 40,
        maintype="application",
        subtype="octet-stream",
        filename="report.bin",
    )
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


PLAIN = (
    b"From: carol@sender.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: Lunch?\r\n"
    b"Message-ID: <plain-1@sender.test>\r\n"
    b"\r\n"
    b"Noon at the usual place?\r\n"
)

# 8-bit UTF-8 in the header (RFC 6532) and in the body (8BITMIME).
UTF8 = (
    "From: Jörg <jörg@sender.test>\r\n"
    "To: alice@example.test\r\n"
    "Subject: Grüße aus Köln\r\n"
    "Message-ID: <utf8-1@sender.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Schöne Grüße — 日本語のテキスト\r\n"
).encode()

# A body line over the 998 octets of RFC 5322 2.1.1, which the MX stores as is.
LONG_LINE = (
    b"From: carol@sender.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: One long line\r\n"
    b"Message-ID: <long-1@sender.test>\r\n"
    b"Content-Type: text/html\r\n"
    b"\r\n" + b"<p>" + b"word " * 600 + b"</p>\r\n" + b"end\r\n"
)

# Already read, in the folder with the non-ASCII name.
FILED = (
    b"From: alice@example.test\r\n"
    b"Subject: Draft of the plan\r\n"
    b"Message-ID: <filed-1@example.test>\r\n"
    b"\r\n"
    b"First draft.\r\n"
)

# Written by a local mail program into the local copy, with bare LF line ends
# as Maildir files have them.
WRITTEN_LOCALLY = (
    b"From: alice@example.test\n"
    b"To: bob@example.test\n"
    b"Subject: Second draft\n"
    b"Message-ID: <local-1@example.test>\n"
    b"Date: Thu, 03 Dec 2026 09:00:00 +0000\n"
    b"\n"
    b"Written offline.\n"
)


def deliver(server: PowerMail, data: bytes, *, eight_bit: bool = False) -> None:
    options = ["SMTPUTF8", "BODY=8BITMIME"] if eight_bit else []
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("carol@sender.test", [ALICE], data, mail_options=options)


def login(server: PowerMail) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=10)
    imap.login(ALICE, PASSWORD)
    return imap


def fill_mailbox(server: PowerMail) -> None:
    """Four deliveries to INBOX; one read message in ``Entw&APw-rfe``."""
    deliver(server, report_with_attachment())
    deliver(server, PLAIN)
    deliver(server, UTF8, eight_bit=True)
    deliver(server, LONG_LINE)

    imap = login(server)
    typ, data = imap.create(ENTWURFE)
    assert typ == "OK", data
    typ, data = imap.append(ENTWURFE, "(\\Seen)", None, FILED)
    assert typ == "OK", data
    imap.logout()


# -- what the server serves -------------------------------------------------------


class Folder(NamedTuple):
    validity: int
    uid_next: int
    # UID: (flags, BODY[])
    messages: dict[int, tuple[frozenset[str], bytes]]


LIST_LINE = re.compile(rb'\((?P<attrs>[^)]*)\) (?:NIL|"[^"]*") (?P<name>.+)')


def folder_names(imap: imaplib.IMAP4) -> list[str]:
    typ, data = imap.list('""', "*")
    assert typ == "OK", data
    names = []
    for line in data:
        name = LIST_LINE.fullmatch(line).group("name")
        names.append(name.strip(b'"').decode("ascii"))
    return names


def server_state(server: PowerMail) -> dict[str, Folder]:
    """Every folder of alice's: UIDVALIDITY, UIDNEXT, each message's flags and octets."""
    imap = login(server)
    state = {}
    for name in folder_names(imap):
        typ, data = imap.status(name, "(UIDVALIDITY UIDNEXT)")
        assert typ == "OK", data
        validity = int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))
        uid_next = int(re.search(rb"UIDNEXT (\d+)", data[0]).group(1))

        typ, data = imap.select(name, readonly=True)
        assert typ == "OK", data
        typ, data = imap.uid("SEARCH", "ALL")
        assert typ == "OK", data
        messages = {}
        for uid in data[0].split():
            typ, data = imap.uid("FETCH", uid, "(FLAGS)")
            assert typ == "OK", data
            flags = re.search(rb"FLAGS \(([^)]*)\)", data[0]).group(1).decode()
            typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            assert typ == "OK", data
            messages[int(uid)] = (frozenset(flags.split()) - {"\\Recent"}, data[0][1])
        imap.unselect()
        state[name] = Folder(validity, uid_next, messages)
    imap.logout()
    return state


# -- the local copy ---------------------------------------------------------------


class LocalMessage(NamedTuple):
    path: Path
    flags: frozenset[str]
    data: bytes


def maildir_flags(path: Path) -> frozenset[str]:
    _, _, info = path.name.partition(":2,")
    return frozenset(MAILDIR_FLAGS[letter] for letter in info)


def uid_in_name(path: Path) -> int | None:
    found = UID_IN_NAME.search(path.name)
    return int(found.group(1)) if found else None


def local_state(
    root: Path, server_uids: Callable[[Path], dict[int, int]] | None = None
) -> dict[str, dict[int | None, list[LocalMessage]]]:
    """Every folder under ``root``, its messages by their UID on the server.

    Both clients lay folders out the same here: ``root/INBOX``,
    ``root/<name>``.  ``server_uids`` maps the UIDs in a folder's file names
    to the server's, where they differ.  A file the client has not synced
    yet has no UID.
    """
    state: dict[str, dict[int | None, list[LocalMessage]]] = {}
    for folder in sorted(root.iterdir()):
        if not (folder / "cur").is_dir():
            continue
        to_server = server_uids(folder) if server_uids else None
        messages = state.setdefault(folder.name, {})
        for sub in ("new", "cur"):
            for path in (folder / sub).iterdir():
                uid = uid_in_name(path)
                if to_server is not None and uid is not None:
                    uid = to_server.get(uid)
                message = LocalMessage(path, maildir_flags(path), path.read_bytes())
                messages.setdefault(uid, []).append(message)
    return state


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (state files too), by its relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def served_form(local: bytes) -> bytes:
    """A Maildir file as IMAP serves it: CRLF line ends (RFC 3501 2.3.3)."""
    # Both clients write files with bare LF, and nothing else may differ.
    assert b"\r" not in local
    return local.replace(b"\n", b"\r\n")


def has_tuid(data: bytes) -> bool:
    header = data.partition(b"\r\n\r\n")[0]
    return TUID_LINE.fullmatch(header.rsplit(b"\r\n", 1)[-1]) is not None


def without_tuid(data: bytes) -> bytes:
    """``data`` (CRLF) without the X-TUID line mbsync put at its header's end."""
    header, blank, body = data.partition(b"\r\n\r\n")
    fields, _, last = header.rpartition(b"\r\n")
    assert TUID_LINE.fullmatch(last), last
    return fields + blank + body


def offlineimap_copy(local: bytes, served: bytes) -> bool:
    """offlineimap changes nothing but the line ends."""
    return served_form(local) == served


def mbsync_copy(local: bytes, served: bytes) -> bool:
    """mbsync changes the line ends and adds one X-TUID line to the copy it
    writes: the local file of a message it downloads, the server's copy of
    one it uploads."""
    local = served_form(local)
    if has_tuid(local):
        return without_tuid(local) == served
    return local == without_tuid(served)


def assert_mirrors(
    root: Path,
    server: PowerMail,
    same: Callable[[bytes, bytes], bool],
    server_uids: Callable[[Path], dict[int, int]] | None = None,
) -> dict[str, Folder]:
    """The local copy holds exactly the server's folders, messages and flags.

    ``same(local file, BODY[])`` says whether the file is the client's copy
    of the message; the server's state is returned.
    """
    remote = server_state(server)
    local = local_state(root, server_uids)
    assert sorted(local) == sorted(remote)
    for name, folder in remote.items():
        assert None not in local[name], f"not synced in {name}: {local[name][None]}"
        assert sorted(local[name]) == sorted(folder.messages), name
        for uid, (flags, data) in folder.messages.items():
            [copy] = local[name][uid]
            assert copy.flags == flags, (name, uid, copy.path.name)
            assert same(copy.data, data), (name, uid, copy.path.name, data)
    return remote


# -- running the clients ----------------------------------------------------------


def require(program: str, package: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} not installed (Debian package {package})")


def run_sync(command: list[str], home: Path) -> str:
    """Run one sync to the end; it must succeed and report no trouble."""
    env = dict(os.environ, HOME=str(home))
    env.pop("PYTHONPATH", None)
    started = time.monotonic()
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        timeout=SYNC_TIMEOUT,
        check=False,
    )
    took = time.monotonic() - started
    output = done.stdout.decode("utf-8", errors="replace")
    assert done.returncode == 0, output
    assert not TROUBLE.search(output), output
    assert took < SYNC_BUDGET, f"{command[0]} took {took:.1f} s:\n{output}"
    return output


def certificate(server: PowerMail) -> Path:
    """The self-signed certificate the server made on its first start."""
    return server.data_dir / "tls" / "selfsigned.crt"


def rename_flags(message: LocalMessage, letters: str) -> Path:
    """Give a local message new Maildir flags, moving it to cur/ as a MUA does."""
    base, _, _ = message.path.name.partition(":2,")
    target = message.path.parent.parent / "cur" / f"{base}:2,{letters}"
    message.path.rename(target)
    return target


def drop_into_new(folder: Path, name: str, data: bytes) -> Path:
    """Write a message into a Maildir folder the way a delivery program does."""
    partial = folder / "tmp" / name
    partial.write_bytes(data)
    return partial.rename(folder / "new" / name)


def find(local: dict[int | None, list[LocalMessage]], subject: bytes) -> LocalMessage:
    [message] = [
        m
        for copies in local.values()
        for m in copies
        if f"\nSubject: {subject.decode()}\n".encode() in m.data
    ]
    return message


def uid_of(folder: Folder, message_id: bytes) -> int:
    [uid] = [
        uid
        for uid, (_, data) in folder.messages.items()
        if b"\r\nMessage-ID: " + message_id + b"\r\n" in data
    ]
    return uid


def change_locally(root: Path) -> None:
    """Flag the lunch message, delete the long one, write a draft."""
    inbox = local_state(root)["INBOX"]
    rename_flags(find(inbox, b"Lunch?"), "FS")
    find(inbox, b"One long line").path.unlink()
    drop_into_new(root / ENTWURFE, "1796374800.P1Q1.laptop", WRITTEN_LOCALLY)


def assert_changes_reached_server(
    before: dict[str, Folder], after: dict[str, Folder]
) -> None:
    """The flag change, the expunge and the upload, and nothing else."""
    inbox_before, inbox = before["INBOX"], after["INBOX"]
    lunch = uid_of(inbox_before, b"<plain-1@sender.test>")
    long = uid_of(inbox_before, b"<long-1@sender.test>")
    assert inbox.messages[lunch][0] == {"\\Flagged", "\\Seen"}
    assert long not in inbox.messages
    assert sorted(inbox.messages) == sorted(set(inbox_before.messages) - {long})
    for uid in inbox.messages:
        if uid != lunch:
            assert inbox.messages[uid] == inbox_before.messages[uid]

    drafts_before, drafts = before[ENTWURFE], after[ENTWURFE]
    [new_uid] = set(drafts.messages) - set(drafts_before.messages)
    assert new_uid >= drafts_before.uid_next
    assert drafts.messages[new_uid][0] == frozenset()
    for name, folder in after.items():
        assert folder.validity == before[name].validity, name


# -- mbsync (isync) ---------------------------------------------------------------


def mbsync_tls_keyword() -> str:
    """isync 1.5 renamed SSLType to TLSType; Debian 12 ships 1.4."""
    done = subprocess.run(
        ["mbsync", "--version"], capture_output=True, text=True, check=True
    )
    major, minor = (int(n) for n in re.findall(r"\d+", done.stdout)[:2])
    return "TLSType" if (major, minor) >= (1, 5) else "SSLType"


def write_mbsyncrc(tmp_path: Path, server: PowerMail, local: Path) -> Path:
    # STARTTLS on the plain listener, mbsync's default; the self-signed
    # certificate is trusted as a host certificate, the system's CAs not.
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"""\
IMAPAccount powermail
Host 127.0.0.1
Port {server.imap_port}
User {ALICE}
Pass {PASSWORD}
{mbsync_tls_keyword()} STARTTLS
SystemCertificates no
CertificateFile {certificate(server)}

IMAPStore remote
Account powermail

MaildirStore local
Path {local}/
Inbox {local}/INBOX
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
    return rc


def mbsync_uids(folder: Path) -> dict[int, int]:
    """A local folder's UIDs (in its file names) to the server's.

    mbsync numbers a Maildir's messages itself and pairs them with the
    server's UIDs in the folder's .mbsyncstate: a header, a blank line, then
    one "server-UID local-UID flags" line per message.
    """
    text = (folder / ".mbsyncstate").read_text("ascii")
    _, _, records = text.partition("\n\n")
    pairs = {}
    for record in records.splitlines():
        far, near = (int(uid) for uid in record.split()[:2])
        if far and near:
            pairs[near] = far
    return pairs


def test_mbsync_mirrors_both_ways_and_then_has_nothing_to_do(powermail, tmp_path):
    """Every octet and flag down, then a flag, a deletion and a new draft up."""
    require("mbsync", "isync")
    fill_mailbox(powermail)
    local = tmp_path / "Mail"
    local.mkdir()
    rc = write_mbsyncrc(tmp_path, powermail, local)
    sync = ["mbsync", "-a", "-c", str(rc)]

    run_sync(sync, tmp_path)
    before = assert_mirrors(local, powermail, mbsync_copy, mbsync_uids)
    assert sorted(before) == sorted(
        ["INBOX", "Drafts", "Sent", "Trash", "Junk", ENTWURFE]
    )
    assert len(before["INBOX"].messages) == 4
    [(filed_flags, _)] = before[ENTWURFE].messages.values()
    assert filed_flags == {"\\Seen"}
    # Every downloaded file carries the X-TUID line.
    assert all(
        has_tuid(served_form(m.data))
        for folder in local_state(local).values()
        for copies in folder.values()
        for m in copies
    )

    change_locally(local)
    run_sync(sync, tmp_path)
    after = assert_mirrors(local, powermail, mbsync_copy, mbsync_uids)
    assert_changes_reached_server(before, after)
    [new_uid] = set(after[ENTWURFE].messages) - set(before[ENTWURFE].messages)
    served = after[ENTWURFE].messages[new_uid][1]
    assert without_tuid(served) == served_form(WRITTEN_LOCALLY)
    draft = find(local_state(local)[ENTWURFE], b"Second draft")
    assert draft.data == WRITTEN_LOCALLY
    assert draft.path.name.startswith("1796374800.P1Q1.laptop,")

    files = snapshot(local)
    run_sync(sync, tmp_path)
    assert server_state(powermail) == after
    assert snapshot(local) == files


# -- offlineimap ------------------------------------------------------------------


def certificate_fingerprint(server: PowerMail) -> str:
    """SHA-256 of the server's certificate (DER), as offlineimap pins it."""
    pem = certificate(server).read_text("ascii")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def write_offlineimaprc(tmp_path: Path, server: PowerMail, local: Path) -> Path:
    # Implicit TLS with the certificate pinned by fingerprint: offlineimap
    # checks a CA file's certificate against the host name, and the
    # certificate names mx.example.test, not 127.0.0.1.  (Its STARTTLS does
    # not verify the certificate at all.)
    rc = tmp_path / "offlineimaprc"
    rc.write_text(
        f"""\
[general]
accounts = powermail
metadata = {tmp_path / "offlineimap-state"}

[Account powermail]
localrepository = laptop
remoterepository = server

[Repository laptop]
type = Maildir
localfolders = {local}

[Repository server]
type = IMAP
remotehost = 127.0.0.1
remoteport = {server.imaps_port}
ssl = yes
cert_fingerprint = {certificate_fingerprint(server)}
remoteuser = {ALICE}
remotepass = {PASSWORD}
""",
        encoding="utf-8",
    )
    return rc


def test_offlineimap_mirrors_both_ways_and_then_has_nothing_to_do(powermail, tmp_path):
    """Every octet and flag down, then a flag, a deletion and a new draft up."""
    require("offlineimap", "offlineimap3")
    fill_mailbox(powermail)
    local = tmp_path / "Mail"
    rc = write_offlineimaprc(tmp_path, powermail, local)
    sync = ["offlineimap", "-c", str(rc), "-o", "-u", "basic"]

    run_sync(sync, tmp_path)
    before = assert_mirrors(local, powermail, offlineimap_copy)
    assert sorted(before) == sorted(
        ["INBOX", "Drafts", "Sent", "Trash", "Junk", ENTWURFE]
    )
    assert len(before["INBOX"].messages) == 4
    [(filed_flags, _)] = before[ENTWURFE].messages.values()
    assert filed_flags == {"\\Seen"}

    change_locally(local)
    run_sync(sync, tmp_path)
    after = assert_mirrors(local, powermail, offlineimap_copy)
    assert_changes_reached_server(before, after)
    # With UIDPLUS, offlineimap adds no X-OfflineIMAP header to find it by.
    [new_uid] = set(after[ENTWURFE].messages) - set(before[ENTWURFE].messages)
    assert after[ENTWURFE].messages[new_uid][1] == served_form(WRITTEN_LOCALLY)
    draft = find(local_state(local)[ENTWURFE], b"Second draft")
    assert draft.data == WRITTEN_LOCALLY
    assert uid_in_name(draft.path) == new_uid

    files = snapshot(local)
    state_files = snapshot(tmp_path / "offlineimap-state")
    output = run_sync(sync, tmp_path)
    assert not re.search(r"Copy message|Deleting|Adding flag|Removing flag", output)
    assert server_state(powermail) == after
    assert snapshot(local) == files
    assert snapshot(tmp_path / "offlineimap-state") == state_files
