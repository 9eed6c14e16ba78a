"""The queue's files: concurrent saves, damaged envelopes, leftovers."""

from __future__ import annotations

import json
import threading

from twisted.internet import defer

from powermail.queue.store import QueuedMessage, QueuedRecipient, QueueStore
from powermail.storage.files import write_durably


def run_now(function, *args):
    return defer.maybeDeferred(function, *args)


def entry(msg_id: str = "m1") -> QueuedMessage:
    return QueuedMessage(
        id=msg_id,
        sender="a@b.test",
        created=1.0,
        size=3,
        recipients=[QueuedRecipient("c@d.test", "[127.0.0.1]:25")],
    )


def test_concurrent_writes_of_one_file_never_corrupt_it(tmp_path):
    path = tmp_path / "e.json"
    errors = []

    def writer(n: int) -> None:
        for i in range(200):
            try:
                write_durably(
                    path, json.dumps({"writer": n, "i": i, "pad": "x" * n}).encode()
                )
            except OSError as exc:  # pragma: no cover - the failure being pinned
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 500)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(path.read_bytes())["i"] == 199
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]


def test_damaged_envelopes_are_left_in_place_and_the_rest_loads(tmp_path):
    store = QueueStore(tmp_path / "q", run_blocking=run_now)
    store.ensure_blocking()
    good = entry("good")
    store.enqueue_blocking(good, b"x\r\n")
    damaged = {
        "null": b"null",
        "deep": b"[" * 100000 + b"]" * 100000,
        "noattempt": entry("noattempt")
        .to_json()
        .replace(b'"next_attempt": 0.0', b'"next_attempt": null'),
        "badstate": entry("badstate").to_json().replace(b'"pending"', b'"bogus"'),
        "otherid": entry("../../evil").to_json(),
        "version": entry("version")
        .to_json()
        .replace(b'"version": 1', b'"version": 99'),
    }
    for name, data in damaged.items():
        (store.messages / f"{name}.eml").write_bytes(b"x\r\n")
        (store.messages / f"{name}.json").write_bytes(data)
    (store.messages / "orphan.json").write_bytes(entry("orphan").to_json())
    (store.messages / "half.eml").write_bytes(b"never acknowledged")
    (store.messages / "good.json.1a2b.tmp").write_bytes(b"{")
    loaded = store.load_blocking()
    assert [e.id for e in loaded] == ["good"]
    names = {p.name for p in store.messages.iterdir()}
    assert "half.eml" not in names and "good.json.1a2b.tmp" not in names
    for name in damaged:
        assert f"{name}.json" in names  # left for the administrator
    assert "orphan.json" in names


def test_saves_of_one_entry_are_written_in_order(tmp_path):
    """The last save wins, even when the first is still being written."""
    gate = defer.Deferred()
    calls = []

    def slow_first(function, *args):
        calls.append(args)
        if len(calls) == 1:
            return gate.addCallback(lambda _: function(*args))
        return defer.maybeDeferred(function, *args)

    store = QueueStore(tmp_path / "q", run_blocking=slow_first)
    store.ensure_blocking()
    e = entry()
    store.save(e)
    e.held = True
    store.save(e)
    assert len(calls) == 1  # the second waits for the first
    gate.callback(None)
    assert len(calls) == 2
    assert json.loads((store.messages / "m1.json").read_bytes())["held"] is True
