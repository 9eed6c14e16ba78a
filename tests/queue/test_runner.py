"""The queue runner's schedule and decisions, with a controlled clock.

The next hop is a stand-in for the network here (a function returning the
replies a server would give, in order); the real SMTP client and a real
aiosmtpd peer are exercised in test_client.py and test_forwarding.py.
"""

from __future__ import annotations

import email
import email.policy

import pytest
from twisted.internet import defer, task
from twisted.names.error import DNSQueryTimeoutError

from powermail.config import parse_config
from powermail.queue.client import RecipientOutcome, SessionOutcome
from powermail.queue.nexthop import NextHopResolver
from powermail.queue.runner import QueueRunner
from powermail.queue.store import QueuedMessage, QueuedRecipient, QueueStore

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "data"
[queue]
retry_delays = [60, 300]
max_age = 3600
delay_warning = 600
[domains."example.test"]
[mailboxes."alice@example.test"]
[aliases]
"postmaster@example.test" = ["alice@example.test"]
"abuse@example.test" = ["alice@example.test"]
"""

MESSAGE = b"From: zoe@remote.test\r\nSubject: queued\r\n\r\nbody\r\n"


def run_now(function, *args):
    return defer.maybeDeferred(function, *args)


class SilentDns:
    """A DNS that never answers: bounces to remote.test stay queued."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: defer.fail(DNSQueryTimeoutError(args))


class NextHop:
    """Answers each delivery with the next scripted replies, per recipient."""

    def __init__(self, *script: dict[str, tuple[int, str]]) -> None:
        self.script = list(script)
        self.calls: list[tuple[float, list[str]]] = []
        self.clock: task.Clock | None = None

    def __call__(self, reactor, *, recipients, host, port, **kw):
        assert self.clock is not None
        self.calls.append((self.clock.seconds(), list(recipients)))
        replies = self.script.pop(0) if self.script else {}
        outcomes = tuple(
            RecipientOutcome(r, *replies.get(r, (451, "4.3.0")), "try later")
            for r in recipients
        )
        return defer.succeed(SessionOutcome(host, port, False, outcomes))


@pytest.fixture
def queue(tmp_path):
    config = parse_config(CONFIG, tmp_path / "powermail.toml")
    store = QueueStore(tmp_path / "queue", run_blocking=run_now)
    clock = task.Clock()

    def make(next_hop: NextHop) -> QueueRunner:
        next_hop.clock = clock
        runner = QueueRunner(
            store=store,
            settings=lambda: config,
            resolver=NextHopResolver(SilentDns()),
            clock=clock,
            deliver=next_hop,
        )
        runner.startService()
        return runner

    return store, clock, make


def enqueue(store, runner, *recipients: str, sender: str = "zoe@remote.test"):
    entry = QueuedMessage(
        id="msg1",
        sender=sender,
        created=0.0,
        size=len(MESSAGE),
        recipients=[QueuedRecipient(r, "127.0.0.1:2526") for r in recipients],
    )
    store.enqueue_blocking(entry, MESSAGE)
    runner.add(entry)
    return entry


def reports(store) -> list[tuple[QueuedMessage, email.message.Message]]:
    found = []
    for entry in store.load_blocking():
        if entry.is_report:
            raw = store.message_path(entry.id).read_bytes()
            found.append(
                (entry, email.message_from_bytes(raw, policy=email.policy.default))
            )
    return found


def test_temporary_failure_then_success_retries_only_the_failed(queue):
    store, clock, make = queue
    next_hop = NextHop({"a@x.test": (250, "2.0.0")}, {"b@x.test": (250, "2.0.0")})
    runner = make(next_hop)
    enqueue(store, runner, "a@x.test", "b@x.test")
    clock.advance(0)
    assert next_hop.calls == [(0, ["a@x.test", "b@x.test"])]
    (left,) = store.load_blocking()
    assert [(r.address, r.state) for r in left.recipients] == [
        ("a@x.test", "delivered"),
        ("b@x.test", "pending"),
    ]
    clock.advance(60)
    assert next_hop.calls[1] == (60, ["b@x.test"])
    assert store.load_blocking() == []
    assert runner.queued_ids() == []


def test_retry_schedule_follows_the_delays_and_expires(queue):
    store, clock, make = queue
    next_hop = NextHop()
    runner = make(next_hop)
    enqueue(store, runner, "a@x.test")
    clock.advance(0)
    for _ in range(4000):
        clock.advance(1)
    times = [when for when, rcpts in next_hop.calls if rcpts == ["a@x.test"]]
    # At once, +60, then every 300 s (the last delay repeats) until 3600 s.
    assert times == [
        0,
        60,
        360,
        660,
        960,
        1260,
        1560,
        1860,
        2160,
        2460,
        2760,
        3060,
        3360,
        3660,
    ]
    assert "msg1" not in runner.queued_ids()
    kinds = sorted(msg["Subject"] for _, msg in reports(store))
    assert kinds == [
        "Delayed Mail (still being retried)",
        "Undelivered Mail Returned to Sender",
    ]


def test_permanent_failure_bounces_once_to_the_sender(queue):
    store, clock, make = queue
    next_hop = NextHop({"a@x.test": (250, "2.0.0"), "b@x.test": (550, "5.1.1")})
    runner = make(next_hop)
    enqueue(store, runner, "a@x.test", "b@x.test")
    clock.advance(0)
    ((entry, dsn),) = reports(store)
    assert entry.sender == "" and [r.address for r in entry.recipients] == [
        "zoe@remote.test"
    ]
    assert entry.recipients[0].next_hop == "remote.test"
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; b@x.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "a@x.test" not in text.split("Final-Recipient")[1]
    # The original is gone: every recipient has its answer.
    assert "msg1" not in runner.queued_ids()


def test_no_bounce_for_a_null_sender(queue):
    store, clock, make = queue
    runner = make(NextHop({"a@x.test": (550, "5.1.1")}))
    enqueue(store, runner, "a@x.test", sender="")
    clock.advance(0)
    assert reports(store) == [] and store.load_blocking() == []


def test_hold_release_and_retry_now(queue):
    store, clock, make = queue
    next_hop = NextHop()
    runner = make(next_hop)
    enqueue(store, runner, "a@x.test")
    clock.advance(0)
    runner.hold("msg1")
    clock.advance(1000)
    assert len(next_hop.calls) == 1
    assert store.load_blocking()[0].held
    runner.release("msg1")
    clock.advance(0)
    assert len(next_hop.calls) == 2
    runner.retry("msg1")
    clock.advance(0)
    assert len(next_hop.calls) == 3


def test_queue_survives_a_restart(queue, tmp_path):
    store, clock, make = queue
    first = make(NextHop())
    enqueue(store, first, "a@x.test")
    clock.advance(0)
    first.stopService()
    next_hop = NextHop({"a@x.test": (250, "2.0.0")})
    second = make(next_hop)
    assert second.queued_ids() == ["msg1"]
    clock.advance(60)
    assert next_hop.calls and store.load_blocking() == []


def test_delete_during_an_attempt_leaves_no_file_behind(queue):
    store, clock, make = queue
    pending = defer.Deferred()

    def slow(reactor, *, recipients, host, port, **kw):
        return pending

    runner = make(NextHop())
    runner.deliver = slow
    enqueue(store, runner, "a@x.test")
    clock.advance(0)
    runner.delete("msg1")
    outcome = RecipientOutcome("a@x.test", 451, "4.3.0", "later")
    pending.callback(SessionOutcome("127.0.0.1", 2526, False, (outcome,)))
    assert list(store.messages.iterdir()) == []
    assert runner.queued_ids() == []


def test_an_error_inside_an_attempt_keeps_the_message_queued(queue):
    store, clock, make = queue
    next_hop = NextHop({"a@x.test": (250, "2.0.0")})
    runner = make(next_hop)
    calls = []

    def broken(reactor, **kw):
        calls.append(clock.seconds())
        raise OSError(28, "No space left on device")

    runner.deliver = broken
    enqueue(store, runner, "a@x.test")
    clock.advance(0)
    assert calls == [0] and "msg1" in runner.queued_ids()
    runner.deliver = next_hop
    clock.advance(300)  # tried again after the longest retry delay
    assert next_hop.calls and store.load_blocking() == []


def test_backlog_waits_as_ids_and_is_read_back_from_disk(queue, monkeypatch):
    """Past the limit of attempts in flight, new messages wait without their entry."""
    from powermail.queue import runner as module

    monkeypatch.setattr(module, "MAX_IN_FLIGHT", 1)
    store, clock, make = queue
    pending = defer.Deferred()
    calls = []

    def first_waits(reactor, *, recipients, host, port, **kw):
        calls.append(list(recipients))
        outcome = tuple(RecipientOutcome(r, 250, "2.0.0", "ok") for r in recipients)
        result = SessionOutcome(host, port, False, outcome)
        if len(calls) == 1:
            return pending.addCallback(lambda _: result)
        return defer.succeed(result)

    runner = make(NextHop())
    runner.deliver = first_waits
    for n in range(3):
        entry = QueuedMessage(
            id=f"m{n}",
            sender="zoe@remote.test",
            created=0.0,
            size=len(MESSAGE),
            recipients=[QueuedRecipient(f"r{n}@x.test", "127.0.0.1:2526")],
        )
        store.enqueue_blocking(entry, MESSAGE)
        runner.add(entry)
    clock.advance(0)
    assert calls == [["r0@x.test"]]
    assert set(runner._live) == {"m0"}  # the others wait as ids only
    pending.callback(None)
    assert sorted(c[0] for c in calls) == ["r0@x.test", "r1@x.test", "r2@x.test"]
    assert runner.queued_ids() == [] and store.load_blocking() == []
