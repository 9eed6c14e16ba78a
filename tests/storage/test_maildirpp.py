"""UserMail and Folder: Dovecot's Maildir++ layout, UIDs, flags and folders."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from powermail.storage import maildirpp
from powermail.storage.maildirpp import FolderError, UserMail

SPECIALS = ["Drafts", "Junk", "Sent", "Trash"]


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test starts as a new process would: no shared Folder objects."""
    maildirpp.forget_folders()
    yield
    maildirpp.forget_folders()


@pytest.fixture
def mail(tmp_path):
    user = UserMail(tmp_path / "users" / "alice" / "Maildir")
    user.prepare()
    return user


def reopen(mail: UserMail) -> UserMail:
    """The same Maildir as another process would see it."""
    maildirpp.forget_folders()
    return UserMail(mail.root)


def append(folder, data: bytes, flags=(), internaldate=None) -> int:
    path = folder.tmp_path()
    path.write_bytes(data)
    return folder.append(path, flags=frozenset(flags), internaldate=internaldate)


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("Archive", "Archive"),
        ("Archive.2024", "Archive.2024"),
        ("Entw&APw-rfe", "Entw&APw-rfe"),
        ("&-", "&-"),
        ("&AOk-", "&AOk-"),
        ("~home", "~home"),
        ("With space", "With space"),
        ("inbox", "INBOX"),
        ("InBoX", "INBOX"),
        ("inbox.Sub", "INBOX.Sub"),
        (".".join(["a"] * 20), ".".join(["a"] * 20)),
        ("x" * 200, "x" * 200),
    ],
)
def test_valid_names_are_stored_as_given(mail, name, stored):
    assert mail.canonical(name) == stored


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".hidden",
        "trailing.",
        "double..dot",
        "a/b",
        "a\\b",
        "100%",
        "star*",
        "nul\x00",
        "tab\there",
        "del\x7f",
        "&",  # an unterminated shift
        "&Jjo",  # shift without its closing "-"
        "&AGE-",  # "a" encoded although it is printable ASCII
        "&AC8-",  # "/" hidden in base64
        "&AAA-",  # NUL hidden in base64
        "&AOk-&AOk-",  # two shifts where one would do
        "&U/BTFw-",  # "/" instead of "," in modified base64
        "Entwürfe",  # raw UTF-8 instead of modified UTF-7
        "x" * 201,
        ".".join(["a"] * 21),
    ],
)
def test_invalid_names_are_refused_without_paths(mail, name):
    with pytest.raises(FolderError) as caught:
        mail.canonical(name)
    assert caught.value.code == "CANNOT"
    assert caught.value.text.startswith("Invalid folder name")
    assert str(mail.root) not in caught.value.text
    with pytest.raises(FolderError):
        mail.create(name)


# -- the tree ------------------------------------------------------------------


def test_prepare_makes_private_maildir_with_special_folders(mail):
    root = mail.root
    for directory in (root, root / "cur", root / "new", root / "tmp", root / ".Sent"):
        assert directory.stat().st_mode & 0o777 == 0o700
    assert (root.parent).stat().st_mode & 0o777 == 0o700
    assert mail.folder_names() == ["INBOX", *SPECIALS]
    assert mail.subscriptions() == ["INBOX", "Sent", "Drafts", "Trash", "Junk"]
    sent = root / ".Sent"
    assert names_in(sent) == ["cur", "dovecot-uidlist", "maildirfolder", "new", "tmp"]
    assert (sent / "maildirfolder").read_bytes() == b""
    for file in ("maildirfolder", "dovecot-uidlist"):
        assert (sent / file).stat().st_mode & 0o777 == 0o600
    assert (root / "subscriptions").stat().st_mode & 0o777 == 0o600


def test_prepare_subscribes_inbox_of_a_maildir_the_mx_made(tmp_path):
    root = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    UserMail(root).prepare()
    assert UserMail(root).subscriptions() == [
        "INBOX",
        "Sent",
        "Drafts",
        "Trash",
        "Junk",
    ]


def test_prepare_is_idempotent_and_recreates_a_missing_special(mail):
    validity = mail.folder("Sent").snapshot.uidvalidity
    mail.prepare()
    assert mail.folder_names() == ["INBOX", *SPECIALS]
    assert mail.subscriptions() == ["INBOX", "Sent", "Drafts", "Trash", "Junk"]
    assert mail.folder("Sent").snapshot.uidvalidity == validity

    mail.unsubscribe("Junk")
    mail.delete("Junk")
    mail.prepare()
    assert "Junk" in mail.folder_names()
    assert mail.subscriptions() == ["INBOX", "Sent", "Drafts", "Trash", "Junk"]


def test_create_makes_only_that_folder(mail):
    mail.create("Archive.2024.Q1")
    assert mail.exists("Archive.2024.Q1")
    assert not mail.exists("Archive")
    assert not mail.exists("Archive.2024")
    assert mail.folder_names() == ["INBOX", "Archive.2024.Q1", *SPECIALS]
    # Nothing half-built is left in INBOX's tmp/.
    assert names_in(mail.root / "tmp") == []
    folder = mail.folder("Archive.2024.Q1")
    assert folder.path == mail.root / ".Archive.2024.Q1"
    assert folder.snapshot.entries == ()
    assert folder.snapshot.next_uid == 1


def test_create_refuses_an_existing_folder(mail):
    mail.create("Work")
    for name in ("Work", "INBOX", "inbox"):
        with pytest.raises(FolderError) as caught:
            mail.create(name)
        assert caught.value.code == "ALREADYEXISTS"


def test_inbox_children_live_in_dot_inbox_dirs(mail):
    mail.create("inbox.Lists")
    assert (mail.root / ".INBOX.Lists").is_dir()
    assert mail.exists("INBOX.Lists")
    assert "INBOX.Lists" in mail.folder_names()


def test_folder_names_ignore_junk_in_the_root(mail):
    (mail.root / "..DOVECOT-TRASHED").mkdir()
    (mail.root / ".stray-file").write_text("")
    (mail.root / ".bad%name").mkdir()
    assert mail.folder_names() == ["INBOX", *SPECIALS]


def test_folder_of_a_missing_name_is_nonexistent(mail):
    with pytest.raises(FolderError) as caught:
        mail.folder("Nope")
    assert caught.value.code == "NONEXISTENT"


def test_one_folder_object_per_folder(mail):
    first = mail.folder("Sent")
    assert UserMail(mail.root).folder("Sent") is first
    assert mail.folder("INBOX") is mail.folder("inbox")
    assert mail.folder("INBOX") is not first


# -- delete ----------------------------------------------------------------------


def test_delete_removes_folder_keeps_children_and_subscriptions(mail):
    mail.create("Old")
    mail.create("Old.Child")
    mail.subscribe("Old")
    held = mail.folder("Old")
    append(held, b"Subject: x\r\n\r\n")
    old_validity = held.snapshot.uidvalidity

    mail.delete("Old")
    assert mail.folder_names() == ["INBOX", *SPECIALS[:2], "Old.Child", *SPECIALS[2:]]
    assert not (mail.root / ".Old").exists()
    assert not (mail.root / "..DOVECOT-TRASHED").exists()
    assert "Old" in mail.subscriptions()  # RFC 3501 6.3.4
    with pytest.raises(FolderError) as caught:
        held.sync()
    assert caught.value.code == "NONEXISTENT"

    # A new folder of that name is new to clients too.
    mail.create("Old")
    again = mail.folder("Old")
    assert again is not held
    assert again.snapshot.entries == ()
    assert again.snapshot.uidvalidity > old_validity


def test_delete_refuses_inbox_and_missing_folders(mail):
    with pytest.raises(FolderError) as caught:
        mail.delete("inbox")
    assert caught.value.code == "CANNOT"
    with pytest.raises(FolderError) as caught:
        mail.delete("Nope")
    assert caught.value.code == "NONEXISTENT"


def test_recreated_folder_gets_a_higher_uidvalidity_in_the_same_second(mail):
    seen = []
    for _ in range(3):
        mail.create("Again")
        seen.append(mail.folder("Again").snapshot.uidvalidity)
        mail.delete("Again")
    assert seen == sorted(set(seen))
    # Dovecot's counter is moved past ours, so Dovecot goes on above it.
    counter = int((mail.root / "dovecot-uidvalidity").read_text(), 16)
    assert counter >= seen[-1]
    assert (mail.root / f"dovecot-uidvalidity.{counter:08x}").exists()


# -- rename ----------------------------------------------------------------------


def test_rename_moves_children_and_keeps_uids(mail):
    for name in ("A", "A.b", "A.b.c", "Ab"):
        mail.create(name)
    child = mail.folder("A.b")
    uid = append(child, b"Subject: keep\r\n\r\n", {"\\Seen"})
    validity = child.snapshot.uidvalidity

    mail.rename("A", "Z.A")
    assert mail.folder_names() == ["INBOX", "Ab", *SPECIALS, "Z.A", "Z.A.b", "Z.A.b.c"]
    moved = mail.folder("Z.A.b")
    assert moved.snapshot.uidvalidity == validity
    assert [(e.uid, e.flags) for e in moved.snapshot.entries] == [
        (uid, frozenset({"\\Seen"}))
    ]
    with pytest.raises(FolderError) as caught:
        child.sync()
    assert caught.value.code == "NONEXISTENT"


def test_rename_refusals(mail):
    mail.create("A")
    mail.create("B")
    cases = [
        (("A", "B"), "ALREADYEXISTS"),
        (("A", "INBOX"), "ALREADYEXISTS"),
        (("Nope", "C"), "NONEXISTENT"),
        (("A", "A.inside"), "CANNOT"),
        (("A", "bad%"), "CANNOT"),
    ]
    for (old, new), code in cases:
        with pytest.raises(FolderError) as caught:
            mail.rename(old, new)
        assert caught.value.code == code, (old, new)
    assert mail.exists("A") and mail.exists("B")


def test_rename_inbox_moves_its_messages_into_a_new_folder(mail):
    inbox = mail.folder("INBOX")
    append(inbox, b"Subject: 1\r\n\r\n", {"\\Seen", "Work"})
    append(inbox, b"Subject: 2\r\n\r\n", {"\\Flagged"})
    mail.create("INBOX.Sub")
    before = inbox.snapshot

    mail.rename("INBOX", "Old Inbox")
    old = mail.folder("Old Inbox")
    assert [(e.uid, e.flags) for e in old.snapshot.entries] == [
        (1, frozenset({"\\Seen", "Work"})),
        (2, frozenset({"\\Flagged"})),
    ]
    assert old.snapshot.uidvalidity != before.uidvalidity
    assert old.read_message(1) == b"Subject: 1\r\n\r\n"
    # INBOX stays, empty, and never gives those UIDs again; its children stay.
    after = mail.folder("INBOX").sync()
    assert after.entries == ()
    assert after.uidvalidity == before.uidvalidity
    assert after.next_uid == 3
    assert mail.exists("INBOX.Sub")


# -- subscriptions ------------------------------------------------------------------


def test_subscriptions_written_as_dovecot_does(mail):
    mail.subscribe("Archive.2024")
    mail.subscribe("Entw&APw-rfe")
    mail.subscribe("Archive.2024")  # already there
    mail.unsubscribe("Trash")
    mail.subscribe("NotCreated")
    assert (mail.root / "subscriptions").read_bytes() == (
        b"V\t2\n\nINBOX\nSent\nDrafts\nJunk\nArchive\t2024\nEntw&APw-rfe\nNotCreated\n"
    )
    assert mail.subscriptions() == [
        "INBOX", "Sent", "Drafts", "Junk", "Archive.2024", "Entw&APw-rfe", "NotCreated"
    ]  # fmt: skip
    assert not (mail.root / "subscriptions.lock").exists()


def test_subscriptions_read_the_old_format_and_upgrade_it(mail):
    (mail.root / "subscriptions").write_bytes(b"inbox\nArchive.2024\n\nSent\n")
    assert mail.subscriptions() == ["INBOX", "Archive.2024", "Sent"]
    mail.unsubscribe("Sent")
    assert (
        mail.root / "subscriptions"
    ).read_bytes() == b"V\t2\n\nINBOX\nArchive\t2024\n"


def test_subscriptions_unescape_dovecot_tab_escapes(mail):
    (mail.root / "subscriptions").write_bytes(b"V\t2\n\nA\x011b\tc\n")
    assert mail.subscriptions() == ["A\x01b.c"]


# -- the uidlist -------------------------------------------------------------------


def test_uidlist_byte_exact_for_a_small_case(mail):
    inbox = mail.root
    (inbox / "dovecot-uidlist").write_bytes(
        b"3 V1234 N2 G0123456789abcdef0123456789abcdef\n"
        b"1 W30 :1000.M1P1.host,S=28\n"
        # Appended by Dovecot after the header's N was written.
        b"3 :1001.M2P1.host,S=10,W=12\n"
    )
    (inbox / "cur" / "1000.M1P1.host,S=28:2,S").write_bytes(b"x" * 28)
    (inbox / "cur" / "1001.M2P1.host,S=10,W=12:2,").write_bytes(b"y\n" * 5)
    (inbox / "new" / "1002.M3P1.host").write_bytes(b"z\r\n")

    snapshot = mail.folder("INBOX").sync()
    assert (inbox / "dovecot-uidlist").read_bytes() == (
        b"3 V1234 N5 G0123456789abcdef0123456789abcdef\n"
        b"1 W30 :1000.M1P1.host,S=28\n"
        b"3 :1001.M2P1.host,S=10,W=12\n"
        b"4 :1002.M3P1.host\n"
    )
    assert [(e.uid, e.name, e.vsize) for e in snapshot.entries] == [
        (1, "1000.M1P1.host,S=28:2,S", 30),
        (3, "1001.M2P1.host,S=10,W=12:2,", 12),
        (4, "1002.M3P1.host:2,", None),
    ]
    assert (snapshot.uidvalidity, snapshot.next_uid) == (1234, 5)
    assert names_in(inbox / "new") == []
    assert not (inbox / "dovecot-uidlist.lock").exists()


def test_uidlist_version_1_is_read(mail):
    (mail.root / "dovecot-uidlist").write_bytes(b"1 777 9\n2 1000.M1P1.host:2,S\n")
    (mail.root / "cur" / "1000.M1P1.host:2,FS").write_bytes(b"hi\r\n")
    snapshot = mail.folder("INBOX").sync()
    assert (snapshot.uidvalidity, snapshot.next_uid) == (777, 9)
    assert [(e.uid, e.flags) for e in snapshot.entries] == [
        (2, frozenset({"\\Flagged", "\\Seen"}))
    ]


def test_new_files_get_uids_in_timestamp_order(mail):
    cur = mail.root / "cur"
    for name in ("1300.M5P1.b:2,S", "1200.M9P1.a:2,", "1200.M10P1.a:2,T"):
        (cur / name).write_bytes(b"m\r\n")
    snapshot = mail.folder("INBOX").sync()
    assert [(e.uid, e.name) for e in snapshot.entries] == [
        (1, "1200.M9P1.a:2,"),
        (2, "1200.M10P1.a:2,T"),
        (3, "1300.M5P1.b:2,S"),
    ]


def test_uids_survive_reopening(mail):
    inbox = mail.folder("INBOX")
    uids = [append(inbox, b"Subject: %d\r\n\r\n" % i, {"\\Seen"}) for i in range(3)]
    before = inbox.snapshot

    again = reopen(mail).folder("INBOX")
    assert again is not inbox
    assert again.snapshot == before
    assert [e.uid for e in again.snapshot.entries] == uids == [1, 2, 3]


def test_uids_are_never_reused(mail):
    inbox = mail.folder("INBOX")
    for i in range(3):
        append(inbox, b"Subject: %d\r\n\r\n" % i)
    assert inbox.expunge([3, 2]) == [3, 2]
    assert inbox.expunge([3]) == []

    inbox = reopen(mail).folder("INBOX")
    assert inbox.snapshot.next_uid == 4
    assert append(inbox, b"Subject: again\r\n\r\n") == 4
    assert [e.uid for e in inbox.snapshot.entries] == [1, 4]


def test_uidlist_lost_means_a_new_uidvalidity(mail):
    inbox = mail.folder("INBOX")
    append(inbox, b"Subject: x\r\n\r\n")
    old = inbox.snapshot.uidvalidity
    (mail.root / "dovecot-uidlist").unlink()
    snapshot = reopen(mail).folder("INBOX").snapshot
    assert snapshot.uidvalidity > old
    assert [e.uid for e in snapshot.entries] == [1]


# -- scanning ----------------------------------------------------------------------


def test_new_mail_moves_to_cur_and_is_recent_once(mail):
    inbox = mail.folder("INBOX")
    (mail.root / "new" / "1700000000.M1P1Q1.mx,S=3,W=3").write_bytes(b"a\r\n")

    examined = inbox.sync(move_new=False)
    assert [e.name for e in examined.entries] == ["1700000000.M1P1Q1.mx,S=3,W=3"]
    assert names_in(mail.root / "new") == ["1700000000.M1P1Q1.mx,S=3,W=3"]

    selected = inbox.sync()
    assert [e.name for e in selected.entries] == ["1700000000.M1P1Q1.mx,S=3,W=3:2,"]
    assert selected.entries[0].uid == examined.entries[0].uid == 1
    assert names_in(mail.root / "new") == []
    assert inbox.claim_recent([1, 2]) == {1}
    assert inbox.claim_recent([1]) == set()


def test_external_flag_changes_are_picked_up(mail):
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: x\r\n\r\n", {"\\Seen"})
    (name,) = names_in(mail.root / "cur")
    os.rename(
        mail.root / "cur" / name, mail.root / "cur" / name.replace(":2,S", ":2,FRS")
    )
    (entry,) = inbox.sync().entries
    assert entry.uid == uid
    assert entry.flags == {"\\Flagged", "\\Answered", "\\Seen"}


def test_files_removed_by_another_program_leave_the_snapshot(mail):
    inbox = mail.folder("INBOX")
    append(inbox, b"Subject: 1\r\n\r\n")
    append(inbox, b"Subject: 2\r\n\r\n")
    first = sorted(names_in(mail.root / "cur"))[0]
    (mail.root / "cur" / first).unlink()
    assert [e.uid for e in inbox.sync().entries] == [2]


def test_a_file_dropped_right_after_a_sync_is_not_missed(mail):
    inbox = mail.folder("INBOX")
    inbox.sync()
    # Same clock tick as the scan, most likely: the mtime may not move.
    (mail.root / "new" / "1700000000.M1P1Q9.mx").write_bytes(b"a\r\n")
    assert len(inbox.sync().entries) == 1
    (mail.root / "cur" / "1700000001.M1P1Q9.mx:2,S").write_bytes(b"b\r\n")
    assert len(inbox.sync().entries) == 2


def test_sync_skips_the_scan_when_nothing_changed(mail):
    inbox = mail.folder("INBOX")
    append(inbox, b"Subject: x\r\n\r\n")
    past = time.time() - 60
    for path in ("cur", "new", "dovecot-uidlist"):
        set_mtime(mail.root / path, past)
    scanned = inbox.sync()
    assert inbox.sync() is scanned

    # A file slipped in without moving the mtime is not looked for...
    (mail.root / "cur" / "1700000000.M1P1Q9.mx:2,").write_bytes(b"a\r\n")
    set_mtime(mail.root / "cur", past)
    assert inbox.sync() is scanned
    # ...until the directory changes.
    set_mtime(mail.root / "cur", time.time())
    assert len(inbox.sync().entries) == 2


def test_status_counts_without_moving_new_mail(mail):
    inbox = mail.folder("INBOX")
    append(inbox, b"Subject: x\r\n\r\n", {"\\Seen"})
    append(inbox, b"Subject: y\r\n\r\n")
    (mail.root / "new" / "1700000000.M1P1Q9.mx").write_bytes(b"a\r\n")
    # All three are recent: no session has claimed them yet.
    assert inbox.status() == {
        "MESSAGES": 3,
        "RECENT": 3,
        "UIDNEXT": 4,
        "UIDVALIDITY": inbox.snapshot.uidvalidity,
        "UNSEEN": 2,
    }
    assert names_in(mail.root / "new") == ["1700000000.M1P1Q9.mx"]


# -- messages ----------------------------------------------------------------------


def test_append_is_durable_and_private(mail):
    inbox = mail.folder("INBOX")
    path = inbox.tmp_path()
    assert path.parent == mail.root / "tmp"
    path.write_bytes(b"Subject: x\n\nbody\n")
    uid = inbox.append(path, flags=frozenset({"\\Seen", "\\Draft"}), internaldate=1.5e9)

    assert not path.exists()
    (name,) = names_in(mail.root / "cur")
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.[^:/]+,S=17,W=20:2,DS", name)
    file = mail.root / "cur" / name
    assert file.stat().st_mode & 0o777 == 0o600
    assert file.stat().st_mtime == 1.5e9
    base = name.split(":")[0]
    assert f"{uid} :{base}\n" in (mail.root / "dovecot-uidlist").read_text()
    (entry,) = inbox.snapshot.entries
    assert (entry.uid, entry.flags, entry.internaldate, entry.vsize) == (
        uid,
        {"\\Seen", "\\Draft"},
        1.5e9,
        20,
    )
    assert reopen(mail).folder("INBOX").snapshot.entries[0].uid == uid


def test_append_takes_only_files_from_its_own_tmp(mail, tmp_path):
    outside = tmp_path / "message"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError):
        mail.folder("INBOX").append(outside, flags=frozenset(), internaldate=None)


def test_lf_messages_are_served_with_crlf(mail):
    inbox = mail.folder("INBOX")
    # Delivered by another program, without W= in its name.
    (mail.root / "cur" / "1700000000.M1P1Q1.mx:2,").write_bytes(b"a\nb\r\nc\n")
    (entry,) = inbox.sync().entries
    assert entry.vsize is None
    assert inbox.message_size(entry.uid) == 9
    assert inbox.read_message(entry.uid) == b"a\r\nb\r\nc\r\n"
    with inbox.open_message(entry.uid) as file:
        assert file.read() == b"a\nb\r\nc\n"
    # The size we counted goes into the uidlist for next time (and Dovecot).
    append(inbox, b"Subject: other\r\n\r\n")
    assert (
        f"{entry.uid} W9 :1700000000.M1P1Q1.mx\n"
        in (mail.root / "dovecot-uidlist").read_text()
    )
    again = reopen(mail).folder("INBOX")
    assert again.snapshot.by_uid()[entry.uid].vsize == 9


def test_vsize_counts_crlf_split_across_reads(mail):
    data = b"x" * ((1 << 20) - 1) + b"\r\n" + b"y\n"
    inbox = mail.folder("INBOX")
    uid = append(inbox, data)
    assert inbox.message_size(uid) == len(data) + 1


def test_open_message_follows_a_rename_and_reports_expunged(mail):
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: x\r\n\r\n")
    (name,) = names_in(mail.root / "cur")
    os.rename(mail.root / "cur" / name, mail.root / "cur" / (name + "S"))
    with inbox.open_message(uid) as file:
        assert file.read() == b"Subject: x\r\n\r\n"
    (mail.root / "cur" / (name + "S")).unlink()
    with pytest.raises(FolderError) as caught:
        inbox.read_message(uid)
    assert (caught.value.code, caught.value.text) == (
        "NONEXISTENT",
        "The message was expunged.",
    )


# -- flags and keywords ----------------------------------------------------------------


def test_store_flags_renames_with_dovecot_letters(mail):
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: x\r\n\r\n", {"\\Seen"})
    snapshot = inbox.store_flags(
        {
            uid: frozenset(
                {"\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "$Label1", "Work"}
            )
        }
    )
    (name,) = names_in(mail.root / "cur")
    assert name.endswith(":2,DFRTab")
    assert snapshot.by_uid()[uid].flags == {
        "\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "$Label1", "Work"
    }  # fmt: skip
    assert (mail.root / "dovecot-keywords").read_text() == "0 $Label1\n1 Work\n"
    assert inbox.store_flags({uid: frozenset({"work", "\\recent"})}).by_uid()[
        uid
    ].flags == {"Work"}
    assert names_in(mail.root / "cur")[0].endswith(":2,b")


def test_store_flags_keeps_letters_it_does_not_know(mail):
    (mail.root / "cur" / "1700000000.M1P1Q1.mx:2,PSz").write_bytes(b"a\r\n")
    inbox = mail.folder("INBOX")
    (entry,) = inbox.sync().entries
    assert entry.flags == {"\\Seen"}  # P (passed) has no IMAP flag; z no keyword
    inbox.store_flags({entry.uid: frozenset({"\\Flagged"})})
    assert names_in(mail.root / "cur") == ["1700000000.M1P1Q1.mx:2,FPz"]


def test_store_flags_skips_expunged_and_retries_renamed(mail):
    inbox = mail.folder("INBOX")
    one = append(inbox, b"Subject: 1\r\n\r\n")
    two = append(inbox, b"Subject: 2\r\n\r\n")
    names = sorted(names_in(mail.root / "cur"))
    (mail.root / "cur" / names[0]).unlink()
    os.rename(mail.root / "cur" / names[1], mail.root / "cur" / (names[1] + "T"))
    snapshot = inbox.store_flags(
        {one: frozenset({"\\Seen"}), two: frozenset({"\\Seen"})}
    )
    assert [(e.uid, e.flags) for e in snapshot.entries] == [(two, {"\\Seen"})]
    assert names_in(mail.root / "cur") == [names[1] + "S"]


def test_a_folder_names_at_most_26_keywords(mail):
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: x\r\n\r\n")
    keywords = {f"k{i:02d}" for i in range(26)}
    flags = inbox.store_flags({uid: frozenset(keywords)}).by_uid()[uid].flags
    assert flags == keywords
    name = names_in(mail.root / "cur")[0]
    assert name.endswith(":2," + "abcdefghijklmnopqrstuvwxyz")

    with pytest.raises(FolderError) as caught:
        inbox.store_flags({uid: frozenset({"\\Seen", "one-too-many"})})
    assert caught.value.code == "LIMIT"
    assert names_in(mail.root / "cur") == [name]
    with pytest.raises(FolderError) as caught:
        append(inbox, b"Subject: y\r\n\r\n", {"one-too-many"})
    assert caught.value.code == "LIMIT"
    assert [e.uid for e in inbox.sync().entries] == [uid]


def test_keywords_written_by_another_program_are_read(mail):
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: x\r\n\r\n")
    (mail.root / "dovecot-keywords").write_text("0 $Junk\n3 Later\n")
    (name,) = names_in(mail.root / "cur")
    os.rename(mail.root / "cur" / name, mail.root / "cur" / (name + "ad"))
    assert inbox.sync().by_uid()[uid].flags == {"$Junk", "Later"}
    inbox.store_flags({uid: frozenset({"Later", "New"})})
    assert (mail.root / "dovecot-keywords").read_text() == "0 $Junk\n1 New\n3 Later\n"
    assert names_in(mail.root / "cur")[0].endswith(":2,bd")


# -- expunge and copy -------------------------------------------------------------------


def test_expunge_removes_files_and_records(mail):
    inbox = mail.folder("INBOX")
    for i in range(3):
        append(inbox, b"Subject: %d\r\n\r\n" % i)
    assert inbox.expunge([2, 9]) == [2]
    assert len(names_in(mail.root / "cur")) == 2
    uidlist = (mail.root / "dovecot-uidlist").read_text().splitlines()
    assert [line.split()[0] for line in uidlist[1:]] == ["1", "3"]
    assert " N4 " in uidlist[0]
    assert [e.uid for e in inbox.snapshot.entries] == [1, 3]


def test_copy_to_remaps_keywords_and_links(mail):
    mail.create("Target")
    source = mail.folder("INBOX")
    target = mail.folder("Target")
    append(target, b"Subject: t\r\n\r\n", {"Beta"})
    one = append(source, b"Subject: 1\r\n\r\n", {"Alpha", "Beta", "\\Seen"}, 1.6e9)
    two = append(source, b"Subject: 2\n\nbody\n", {"Beta"})

    pairs = source.copy_to([two, one, 42], target)
    assert pairs == [(two, 2), (one, 3)]
    assert (target.path / "dovecot-keywords").read_text() == "0 Beta\n1 Alpha\n"
    copied = target.snapshot.by_uid()
    assert copied[2].flags == {"Beta"} and copied[2].name.endswith(":2,a")
    assert copied[3].flags == {"Alpha", "Beta", "\\Seen"}
    assert copied[3].name.endswith(":2,Sab")
    assert copied[3].internaldate == 1.6e9
    assert copied[2].vsize == 20
    assert target.read_message(2) == b"Subject: 2\r\n\r\nbody\r\n"
    inode = (source.path / "cur" / source.snapshot.by_uid()[one].name).stat().st_ino
    assert (target.path / "cur" / copied[3].name).stat().st_ino == inode
    assert names_in(target.path / "tmp") == []
    assert target.claim_recent([2, 3]) == {2, 3}


def test_copy_to_itself(mail):
    inbox = mail.folder("INBOX")
    uid = append(inbox, b"Subject: x\r\n\r\n", {"\\Flagged"})
    assert inbox.copy_to([uid], inbox) == [(uid, uid + 1)]
    assert [(e.uid, e.flags) for e in inbox.snapshot.entries] == [
        (uid, {"\\Flagged"}),
        (uid + 1, {"\\Flagged"}),
    ]


# -- locking ---------------------------------------------------------------------


def test_a_stale_uidlist_lock_is_taken_over(mail):
    inbox = mail.folder("INBOX")
    lock = mail.root / "dovecot-uidlist.lock"
    lock.write_text("")
    set_mtime(lock, time.time() - 300)
    assert append(inbox, b"Subject: x\r\n\r\n") == 1
    assert not lock.exists()


def test_a_held_uidlist_lock_means_inuse(mail, monkeypatch):
    monkeypatch.setattr(maildirpp, "_LOCK_WAIT", 0.2)
    inbox = mail.folder("INBOX")
    (mail.root / "dovecot-uidlist.lock").write_text("")
    with pytest.raises(FolderError) as caught:
        append(inbox, b"Subject: x\r\n\r\n")
    assert caught.value.code == "INUSE"
    assert names_in(mail.root / "cur") == []
    # Reading goes on; new mail waits for the lock, however old the mtimes.
    (mail.root / "cur" / "1700000000.M1P1Q9.mx:2,").write_bytes(b"a\r\n")
    for path in ("cur", "new", "dovecot-uidlist"):
        set_mtime(mail.root / path, time.time() - 60)
    assert inbox.sync().entries == ()
    (mail.root / "dovecot-uidlist.lock").unlink()
    assert len(inbox.sync().entries) == 1


def test_threads_appending_at_once_get_distinct_uids(mail):
    inbox = mail.folder("INBOX")
    uids: list[int] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            folder = UserMail(mail.root).folder("INBOX")
            for i in range(10):
                uids.append(append(folder, b"Subject: %d %d\r\n\r\n" % (n, i)))
                folder.sync()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(uids) == list(range(1, 61))
    assert [e.uid for e in inbox.sync().entries] == list(range(1, 61))
    reopened = reopen(mail).folder("INBOX").snapshot
    assert [e.uid for e in reopened.entries] == list(range(1, 61))
