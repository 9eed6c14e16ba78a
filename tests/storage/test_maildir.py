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
    for maildir in (alice, bob):
        assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]
        assert list((maildir / "tmp").iterdir()) == []


def test_abort_leaves_nothing(store):
    alice = store.maildir_for("example.test", "alice")
    delivery = store.begin([alice])
    delivery.write(b"partial")
    delivery.abort()
    assert (
        list((alice / "tmp").iterdir()) == [] and list((alice / "new").iterdir()) == []
    )


def test_unique_names_for_many_deliveries(store):
    alice = store.maildir_for("example.test", "alice")
    for _ in range(50):
        delivery = store.begin([alice])
        delivery.write(b"x\r\n")
        committed(delivery)
    assert len(list((alice / "new").iterdir())) == 50


def test_failed_commit_removes_what_it_placed(store, tmp_path):
    alice = store.maildir_for("example.test", "alice")
    bob = store.maildir_for("example.test", "bob")
    delivery = store.begin([alice, bob])
    delivery.write(b"x\r\n")
    # bob's new/ disappears between the start and the commit.
    os.rmdir(bob / "new")
    with pytest.raises(FileNotFoundError):
        committed(delivery)
    assert (
        list((alice / "new").iterdir()) == [] and list((alice / "tmp").iterdir()) == []
    )
