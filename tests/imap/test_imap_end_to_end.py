"""IMAP through the real `twistd powermail`, with imaplib and imapclient.

Mail arrives the way it does in production, over SMTP into the MX, and is
read back over IMAP; files are also dropped into the Maildir by hand, as
another delivery program would.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage

import imapclient
import pytest
from powermail_process import PASSWORD, PowerMail, write_config

ALICE = "alice@example.test"
BOB = "bob@example.test"


def multipart_message(subject: str = "Quarterly report") -> bytes:
    """A real multipart/mixed message: text, HTML alternative, attachment."""
    msg = EmailMessage()
    msg["From"] = "Carol Example <carol@sender.test>"
    msg["To"] = ALICE
    msg["Subject"] = subject
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


def deliver(server: PowerMail, data: bytes, rcpt: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.sendmail("carol@sender.test", [rcpt], data)


def login(server: PowerMail, user: str = ALICE) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=10)
    imap.login(user, PASSWORD)
    return imap


def client(server: PowerMail, user: str = ALICE) -> imapclient.IMAPClient:
    imap = imapclient.IMAPClient(
        "127.0.0.1", port=server.imap_port, ssl=False, timeout=10
    )
    imap.login(user, PASSWORD)
    return imap


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def stored_message(server: PowerMail, local: str = "alice") -> bytes:
    """The one message file in ``local``'s INBOX (new/ or cur/)."""
    maildir = server.maildir(local)
    files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert len(files) == 1, files
    return files[0].read_bytes()


def test_multipart_message_reads_back_identical_with_imaplib_and_imapclient(
    powermail,
):
    """What the MX stored is what both clients fetch, octet for octet."""
    deliver(powermail, multipart_message())
    stored = stored_message(powermail)

    imap = login(powermail)
    typ, data = imap.select("INBOX")
    assert (typ, data) == ("OK", [b"1"])
    typ, data = imap.fetch("1", "(RFC822.SIZE BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == stored
    assert f"RFC822.SIZE {len(stored)}".encode() in data[0][0]
    imap.logout()

    with client(powermail) as imap:
        imap.select_folder("INBOX", readonly=True)
        [(uid, fetched)] = imap.fetch(
            imap.search("ALL"), ["RFC822", "RFC822.SIZE"]
        ).items()
        assert fetched[b"RFC822"] == stored
        assert fetched[b"RFC822.SIZE"] == len(stored)


def test_special_use_folders_exist_after_first_login(powermail):
    with client(powermail) as imap:
        folders = {name: flags for flags, _, name in imap.list_folders()}
        assert folders["INBOX"] == (b"\\HasNoChildren",)
        for name, use in [
            ("Sent", b"\\Sent"),
            ("Drafts", b"\\Drafts"),
            ("Trash", b"\\Trash"),
            ("Junk", b"\\Junk"),
        ]:
            assert use in folders[name]
        subscribed = {name for _, _, name in imap.list_sub_folders()}
        assert {"INBOX", "Sent", "Drafts", "Trash", "Junk"} <= subscribed
    for name in ("Sent", "Drafts", "Trash", "Junk"):
        assert (powermail.maildir("alice") / f".{name}" / "cur").is_dir()


def test_flags_uids_and_uidvalidity_survive_a_restart(powermail):
    for n in range(3):
        deliver(powermail, multipart_message(f"message {n}"))
    with client(powermail) as imap:
        imap.create_folder("Archive")
        imap.select_folder("INBOX")
        imap.add_flags([1], [imapclient.SEEN, b"Project"])
        imap.add_flags([3], [imapclient.FLAGGED, imapclient.DELETED])
        imap.expunge()
        before_validity = imap.folder_status("INBOX", ["UIDVALIDITY"])[b"UIDVALIDITY"]
        imap.select_folder("INBOX")
        before = imap.fetch(imap.search("ALL"), ["UID", "FLAGS"])
        imap.copy([1], "Archive")
    powermail.stop()
    powermail.start()
    with client(powermail) as imap:
        status = imap.folder_status("INBOX", ["UIDVALIDITY", "UIDNEXT"])
        assert status[b"UIDVALIDITY"] == before_validity
        assert status[b"UIDNEXT"] == 4
        imap.select_folder("INBOX")
        after = imap.fetch(imap.search("ALL"), ["UID", "FLAGS"])
        assert {u: set(v[b"FLAGS"]) for u, v in after.items()} == {
            u: set(v[b"FLAGS"]) for u, v in before.items()
        }
        assert sorted(after) == [1, 2]
        assert set(after[1][b"FLAGS"]) == {b"\\Seen", b"Project"}
        deliver(powermail, multipart_message("after restart"))
        imap.noop()
        # UID 3 was expunged: it is never handed out again.
        assert sorted(imap.search("ALL")) == [1, 2, 4]
        imap.select_folder("Archive")
        assert set(imap.fetch("1", ["FLAGS"])[1][b"FLAGS"]) == {b"\\Seen", b"Project"}


def test_idle_client_hears_of_new_mail_within_two_seconds(powermail):
    with client(powermail) as imap:
        imap.select_folder("INBOX")
        imap.idle()
        sent = time.monotonic()
        deliver(powermail, multipart_message())
        responses = imap.idle_check(timeout=5)
        heard = time.monotonic()
        imap.idle_done()
        assert (1, b"EXISTS") in responses
        assert heard - sent < 2.0


def test_file_dropped_into_new_with_bare_lf_is_served_with_crlf(powermail):
    with client(powermail) as imap:
        imap.select_folder("INBOX")
        imap.idle()
        message = b"From: x@y.test\nSubject: dropped\n\nline one\nline two\n"
        new = powermail.maildir("alice") / "new"
        (new.parent / "tmp" / "dropped").write_bytes(message)
        (new.parent / "tmp" / "dropped").rename(new / "1700000000.dropped.host")
        sent = time.monotonic()
        responses = imap.idle_check(timeout=5)
        assert time.monotonic() - sent < 2.0
        imap.idle_done()
        assert (1, b"EXISTS") in responses
        fetched = imap.fetch("1", ["RFC822.SIZE", "BODY.PEEK[]", "BODY.PEEK[TEXT]"])[1]
        crlf = message.replace(b"\n", b"\r\n")
        assert fetched[b"BODY[]"] == crlf
        assert fetched[b"RFC822.SIZE"] == len(crlf)
        assert fetched[b"BODY[TEXT]"] == b"line one\r\nline two\r\n"


def test_dropped_file_is_seen_by_the_next_command(powermail):
    imap = login(powermail)
    imap.select("INBOX")
    new = powermail.maildir("alice") / "new"
    (new / "1700000001.next.host").write_bytes(b"Subject: next\r\n\r\nbody\r\n")
    typ, data = imap.uid("SEARCH", "ALL")
    assert data == [b"1"]
    imap.logout()


def test_uid_sets_with_star_and_gaps(powermail):
    for n in range(6):
        deliver(powermail, multipart_message(f"m{n}"))
    with client(powermail) as imap:
        imap.select_folder("INBOX")
        imap.delete_messages([2, 4])
        imap.expunge()
        assert sorted(imap.search("ALL")) == [1, 3, 5, 6]
        raw = imap._imap
        typ, data = raw.uid("FETCH", "2:4", "(UID)")
        assert [d for d in data] == [b"2 (UID 3)"]
        typ, data = raw.uid("FETCH", "5:*", "(UID)")
        assert data == [b"3 (UID 5)", b"4 (UID 6)"]
        # n:* with n above the highest UID still names the highest (RFC 3501 6.4.8).
        typ, data = raw.uid("FETCH", "100:*", "(UID)")
        assert data == [b"4 (UID 6)"]
        typ, data = raw.uid("FETCH", "1,4,6", "(UID)")
        assert data == [b"1 (UID 1)", b"4 (UID 6)"]
        typ, data = raw.fetch("*", "(UID)")
        assert data == [b"4 (UID 6)"]
        with pytest.raises(imaplib.IMAP4.error, match="Invalid messageset"):
            raw.fetch("5", "(UID)")


def test_partial_fetches(powermail):
    deliver(powermail, multipart_message())
    stored = stored_message(powermail)
    imap = login(powermail)
    imap.select("INBOX")
    typ, data = imap.fetch("1", "(BODY.PEEK[]<0.10>)")
    assert data[0][0].endswith(b"BODY[]<0> {10}")
    assert data[0][1] == stored[:10]
    typ, data = imap.fetch("1", "(BODY.PEEK[]<100.50>)")
    assert data[0][1] == stored[100:150]
    typ, data = imap.fetch("1", f"(BODY.PEEK[]<{len(stored) - 5}.100>)")
    assert data[0][1] == stored[-5:]
    typ, data = imap.fetch("1", f"(BODY.PEEK[]<{len(stored) + 10}.100>)")
    assert b"BODY[]<%d> {0}" % (len(stored) + 10) in data[0][0]
    header_end = stored.index(b"\r\n\r\n") + 4
    typ, data = imap.fetch("1", "(BODY.PEEK[TEXT]<2.7>)")
    assert data[0][1] == stored[header_end + 2 : header_end + 9]
    imap.logout()


NESTED = (
    b'From: "Doe, John" <john@example.test>\r\n'
    b"To: undisclosed-recipients:;\r\n"
    b'Cc: Team: ann@example.test, "B. \\"Bo\\"" <bo@example.test>;\r\n'
    b"Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n"
    b"Date: Wed, 02 Dec 2026 09:30:00 +0000\r\n"
    b"Message-ID: <nested@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Caf=E9 cr=E8me\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<b>Caf\xc3\xa9</b>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: inner message\r\n"
    b"From: x@example.test\r\n"
    b"Content-Type: multipart/mixed; boundary=deep\r\n"
    b"\r\n"
    b"--deep\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"deep text\r\n"
    b"--deep--\r\n"
    b"--outer--\r\n"
)


def test_bodystructure_and_envelope_of_a_nested_message(powermail):
    deliver(powermail, NESTED)
    with client(powermail) as imap:
        imap.select_folder("INBOX", readonly=True)
        fetched = imap.fetch("1", ["BODYSTRUCTURE", "ENVELOPE"])[1]
    structure = fetched[b"BODYSTRUCTURE"]
    assert structure.is_multipart
    parts, subtype = structure[0], structure[1]
    assert subtype == b"mixed"
    alternative, attached = parts
    assert alternative.is_multipart and alternative[1] == b"alternative"
    plain, html = alternative[0]
    assert plain[:3] == (b"text", b"plain", (b"charset", b"iso-8859-1"))
    assert plain[5] == b"quoted-printable"
    assert html[:2] == (b"text", b"html")
    assert attached[:2] == (b"message", b"rfc822")
    inner_envelope, inner_structure = attached[7], attached[8]
    assert inner_envelope[1] == b"inner message"
    # A multipart body starts with its parts (RFC 3501 7.4.2).
    assert isinstance(inner_structure[0], tuple) and inner_structure[1] == b"mixed"
    envelope = fetched[b"ENVELOPE"]
    assert envelope.subject == b"=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?="
    assert envelope.from_[0].name == b"Doe, John"
    assert (
        envelope.from_[0].mailbox == b"john"
        and envelope.from_[0].host == b"example.test"
    )
    assert envelope.message_id == b"<nested@example.test>"
    # The group: its start (host NIL, mailbox the group's name), then members.
    assert [(a.mailbox, a.host) for a in envelope.cc] == [
        (b"Team", None),
        (b"ann", b"example.test"),
        (b"bo", b"example.test"),
        (None, None),
    ]
    imap2 = login(powermail)
    imap2.select("INBOX", readonly=True)
    typ, data = imap2.fetch("1", "(BODY.PEEK[1.1] BODY.PEEK[2.HEADER] BODY.PEEK[2.1])")
    assert data[0][1] == b"Caf=E9 cr=E8me"
    assert data[1][1].startswith(b"Subject: inner message\r\n")
    # 2.1 is the first part inside the attached message (RFC 3501 6.4.5).
    assert data[2][1] == b"deep text"
    imap2.logout()


def test_search_with_utf8_charset_matches_encoded_headers_and_bodies(powermail):
    deliver(powermail, NESTED)
    deliver(powermail, multipart_message("plain subject"))
    imap = login(powermail)
    imap.select("INBOX")
    imap.literal = "Grüße".encode()
    typ, data = imap.search("UTF-8", "SUBJECT")
    assert (typ, data) == ("OK", [b"1"])
    imap.literal = "café".encode()
    typ, data = imap.uid("SEARCH", "CHARSET", "UTF-8", "BODY")
    assert (typ, data) == ("OK", [b"1"])
    typ, data = imap.search(None, "SUBJECT", '"plain"')
    assert data == [b"2"]
    typ, data = imap.search("KOI9-R", "ALL")
    assert typ == "NO"
    imap.logout()


def test_modified_utf7_folder_names(powermail):
    with client(powermail) as imap:
        imap.create_folder("Entwürfe")
        imap.create_folder("Entwürfe.日本語")
        names = {name for _, _, name in imap.list_folders()}
        assert {"Entwürfe", "Entwürfe.日本語"} <= names
        imap.select_folder("Entwürfe.日本語")
        imap.append("Entwürfe.日本語", b"Subject: hi\r\n\r\nhello\r\n")
    root = powermail.maildir("alice")
    assert (root / ".Entw&APw-rfe").is_dir()
    assert (root / ".Entw&APw-rfe.&ZeVnLIqe-").is_dir()
    imap = login(powermail)
    typ, data = imap.create("bad&name")
    assert typ == "NO" or typ == "BAD"
    imap.logout()


def test_append_copy_move_and_uid_expunge_report_uids(powermail):
    imap = login(powermail)
    imap.select("INBOX")
    typ, data = imap.append("INBOX", "(\\Seen)", None, b"Subject: a\r\n\r\nA\r\n")
    assert typ == "OK"
    assert b"[APPENDUID " in data[0]
    _, inbox_validity, first = data[0].split(b"]")[0].split()
    imap.append("INBOX", None, None, b"Subject: b\r\n\r\nB\r\n")
    imap.noop()
    typ, data = imap._simple_command("UID", "COPY", "1:*", "Trash")
    assert typ == "OK"
    assert data[-1].startswith(b"[COPYUID ") and data[-1].endswith(
        b" 1:2 1:2] Copy completed."
    )
    typ, data = imap._simple_command("UID", "MOVE", "2", "Junk")
    assert (typ, data[-1]) == ("OK", b"Move completed.")
    assert imap.untagged_responses["OK"][-1].startswith(b"[COPYUID ")
    assert imap.untagged_responses["EXPUNGE"] == [b"2"]
    typ, data = imap.uid("FETCH", "1:*", "(UID)")
    assert data == [b"1 (UID 1)"]
    imap.uid("STORE", "1", "+FLAGS", "(\\Deleted)")
    typ, data = imap.uid("EXPUNGE", "1")
    assert typ == "OK"
    typ, data = imap.search(None, "ALL")
    assert data == [b""]
    typ, data = imap.append("Nowhere", None, None, b"Subject: x\r\n\r\nx\r\n")
    assert typ == "NO" and b"[TRYCREATE]" in data[0]
    imap.logout()
    assert int(inbox_validity) > 0 and first == b"1"


def test_two_sessions_see_each_others_changes(powermail):
    for n in range(3):
        deliver(powermail, multipart_message(f"m{n}"))
    first = login(powermail)
    second = login(powermail)
    first.select("INBOX")
    second.select("INBOX")
    first.store("2", "+FLAGS", "(\\Deleted)")
    first.expunge()
    typ, data = second.noop()
    assert second.untagged_responses.get("EXPUNGE") == [b"2"]
    first.store("1", "+FLAGS", "(\\Flagged)")
    second.noop()
    fetches = second.untagged_responses.get("FETCH", [])
    assert any(b"\\Flagged" in f for f in fetches)
    deliver(powermail, multipart_message("new"))
    second.noop()
    assert second.untagged_responses.get("EXISTS")[-1] == b"3"
    first.logout()
    second.logout()


def test_no_way_into_another_users_mail(powermail):
    deliver(powermail, multipart_message(), rcpt=BOB)
    imap = login(powermail, ALICE)
    for name in [
        "../bob",
        "../../bob/Maildir",
        "/etc",
        ".",
        "..",
        "INBOX/../../bob",
        "%",
        "*",
        "&Ly4u-",
        "..bob",
        ".bob",
        "a..b",
    ]:
        typ, data = imap.select(f'"{name}"')
        assert typ in ("NO", "BAD"), (name, typ, data)
        typ, data = imap.create(f'"{name}"')
        assert typ in ("NO", "BAD"), (name, typ, data)
    typ, data = imap.list('""', "*")
    assert not any(b"bob" in line for line in data)
    typ, data = imap.list('"../"', "*")
    assert not any(b"bob" in line for line in data if line)
    imap.logout()
    assert not list((powermail.data_dir / "mail").glob("**/.bob*"))


def test_starttls_and_imaps_log_in(powermail):
    imap = imaplib.IMAP4("127.0.0.1", powermail.imap_port, timeout=10)
    assert "STARTTLS" in imap.capabilities
    imap.starttls(unverified())
    assert "STARTTLS" not in imap.capabilities
    imap.login(ALICE, PASSWORD)
    imap.logout()
    imaps = imaplib.IMAP4_SSL(
        "127.0.0.1", powermail.imaps_port, ssl_context=unverified(), timeout=10
    )
    assert "AUTH=PLAIN" in imaps.capabilities
    imaps.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{PASSWORD}".encode())
    imaps.logout()


def test_pipelined_command_behind_starttls_is_discarded(powermail):
    with socket.create_connection(("127.0.0.1", powermail.imap_port), timeout=10) as s:
        assert s.recv(4096).startswith(b"* OK")
        s.sendall(b"a STARTTLS\r\nb CAPABILITY\r\n")
        reply = s.recv(4096)
        assert reply == b"a OK Begin TLS negotiation now.\r\n"
        tls = unverified().wrap_socket(s, server_hostname="mx.example.test")
        tls.sendall(b"c NOOP\r\n")
        # The CAPABILITY sent in the clear is not answered inside TLS.
        assert tls.recv(4096) == b"c OK NOOP completed.\r\n"


@pytest.fixture
def no_loopback_plaintext(tmp_path):
    server = PowerMail(write_config(tmp_path, imap_extra="loopback_plaintext = false"))
    server.start()
    yield server
    server.stop()


def test_login_refused_before_tls_when_loopback_plaintext_is_off(
    no_loopback_plaintext,
):
    server = no_loopback_plaintext
    imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=10)
    assert "LOGINDISABLED" in imap.capabilities
    assert "AUTH=PLAIN" not in imap.capabilities
    typ, data = imap._simple_command("LOGIN", ALICE, PASSWORD)
    assert typ == "NO" and b"[PRIVACYREQUIRED]" in data[-1]
    imap.starttls(unverified())
    assert "LOGINDISABLED" not in imap.capabilities
    imap.login(ALICE, PASSWORD)
    imap.logout()


def test_failed_logins_are_logged_slowed_and_cut_off(powermail):
    imap = imaplib.IMAP4("127.0.0.1", powermail.imap_port, timeout=20)
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap.login(ALICE, "wrong")
    assert time.monotonic() - started >= 1.9
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("nobody@example.test", "wrong")
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError)):
        imap.login(ALICE, "wrong again")
        imap.noop()
    log = powermail.wait_for_log("failed IMAP login for nobody@example.test")
    assert "wrong" not in log


def test_idle_sessions_in_parallel_all_hear(powermail):
    """Three idlers on one folder, one delivery: each is told."""
    clients = [client(powermail) for _ in range(3)]
    heard = []
    for imap in clients:
        imap.select_folder("INBOX")
        imap.idle()

    def wait(imap):
        heard.append(imap.idle_check(timeout=5))

    threads = [threading.Thread(target=wait, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    deliver(powermail, multipart_message())
    for thread in threads:
        thread.join()
    for imap in clients:
        imap.idle_done()
        imap.logout()
    assert all((1, b"EXISTS") in responses for responses in heard)


def test_logout_over_tls_closes_at_once(powermail):
    """TLS close_notify and the TCP close follow the tagged OK (RFC 3501 6.1.3)."""
    raw = socket.create_connection(("127.0.0.1", powermail.imaps_port), timeout=10)
    tls = unverified().wrap_socket(raw, server_hostname="mx.example.test")
    assert tls.recv(4096).startswith(b"* OK")
    tls.sendall(b"a LOGOUT\r\n")
    started = time.monotonic()
    received = b""
    while chunk := tls.recv(4096):
        received += chunk
    assert received == b"* BYE Logging out\r\na OK Logout completed.\r\n"
    assert time.monotonic() - started < 2
    tls.close()
