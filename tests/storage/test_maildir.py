"""MaildirDelivery: the transaction that makes a message durable."""

from __future__ import annotations

import os
import re

import pytest
from twisted.internet import defer

from powermail.storage.maildir import MaildirStore


def run_now(function, *args):
    return defer.maybeDeferred(function, *args)


@pytest.fixture
def store(tmp_path):
    return MaildirStore(tmp_path / "mail", run_blocking=run_now)


def entries(folder):
    """What a folder holds; a folder never made holds nothing."""
    return list(folder.iterdir()) if folder.exists() else []


def committed(delivery):
    results = []
    delivery.commit().addBoth(results.append)
    (result,) = results
    if isinstance(result, Exception) or hasattr(result, "raiseException"):
        result.raiseException()
    return result


def test_commit_links_one_file_into_every_maildir(store):
    alice = store.maildir_for("example.test", "alice")
    bob = store.maildir_for("example.test", "bob")
    delivery = store.begin([alice, bob, alice])
    delivery.write(b"Subject: x\r\n\r\nbody\r\n")
    paths = committed(delivery)
    assert [p.parent for p in paths] == [alice / "new", bob / "new"]
    for path in paths:
        assert path.read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
        assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.[^/:]+,S=20,W=20", path.name)
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino
    assert paths[0].stat().st_mode & 0o777 == 0o600
    for maildir in (alice, bob):
        assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]
        for folder in (maildir, maildir / "new", maildir.parent):
            assert folder.stat().st_mode & 0o777 == 0o700
        assert list((maildir / "tmp").iterdir()) == []


def test_abort_leaves_nothing(store):
    alice = store.maildir_for("example.test", "alice")
    delivery = store.begin([alice])
    delivery.write(b"partial")
    delivery.abort()
    assert entries(alice / "tmp") == [] and entries(alice / "new") == []


def test_large_message_streams_to_disk_before_commit(tmp_path):
    store = MaildirStore(tmp_path / "mail", run_blocking=run_now, spill_threshold=1000)
    alice = store.maildir_for("example.test", "alice")
    delivery = store.begin([alice])
    delivery.write(b"x" * 600)
    assert entries(alice / "tmp") == []
    delivery.write(b"y" * 600)
    assert len(entries(alice / "tmp")) == 1
    delivery.write(b"z\r\n")
    (path,) = committed(delivery)
    assert path.read_bytes() == b"x" * 600 + b"y" * 600 + b"z\r\n"
    assert entries(alice / "tmp") == []


def test_unique_names_for_many_deliveries(store):
    alice = store.maildir_for("example.test", "alice")
    for _ in range(50):
        delivery = store.begin([alice])
        delivery.write(b"x\r\n")
        committed(delivery)
    assert len(list((alice / "new").iterdir())) == 50


def test_failed_commit_removes_what_it_placed(store):
    alice = store.maildir_for("example.test", "alice")
    bob = store.maildir_for("example.test", "bob")
    first = store.begin([alice, bob])
    first.write(b"first\r\n")
    committed(first)
    # bob's Maildir is removed behind the store's back.
    for name in ("new", "cur", "tmp"):
        for entry in (bob / name).iterdir():
            entry.unlink()
        os.rmdir(bob / name)
    delivery = store.begin([alice, bob])
    delivery.write(b"x\r\n")
    with pytest.raises(FileNotFoundError):
        committed(delivery)
    assert len(entries(alice / "new")) == 1 and entries(alice / "tmp") == []
    # The next delivery makes bob's Maildir again.
    again = store.begin([alice, bob])
    again.write(b"again\r\n")
    committed(again)
    assert len(entries(bob / "new")) == 1


def test_concurrent_deliveries_share_directory_fsyncs(tmp_path, monkeypatch):
    """Group commit: every delivery is covered, with fewer fsyncs than messages."""
    import threading

    from powermail.storage import files as module

    calls = []
    real = module.fsync_directory

    def counting(path):
        calls.append(path)
        real(path)

    monkeypatch.setattr(module, "fsync_directory", counting)
    store = MaildirStore(tmp_path / "mail", run_blocking=run_now)
    alice = store.maildir_for("example.test", "alice")
    committed_first = store.begin([alice])
    committed_first.write(b"first\r\n")
    committed(committed_first)
    calls.clear()

    def deliver():
        for _ in range(20):
            delivery = store.begin([alice])
            delivery.write(b"x\r\n")
            committed(delivery)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(entries(alice / "new")) == 161
    assert 1 <= len(calls) <= 160
    assert set(calls) == {alice / "new"}
