"""The queue runner: attempts, retries, bounces and delay warnings.

Every committed message is attempted at once, then again after each delay
of ``queue.retry_delays`` (the last repeats) until every recipient has a
final answer or ``queue.max_age`` has passed.  Recipients are grouped by
next hop: one SMTP transaction per destination carries all of its
recipients, and only those that failed temporarily are tried again.  A
permanent failure or the expiry bounces to the sender (RFC 3464), never for
a message from ``<>`` and never for PowerMail's own reports.
"""

from __future__ import annotations

import datetime
import heapq
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from powermail.queue.dsn import FailedRecipient, build_dsn
from powermail.queue.nexthop import NextHopError, NextHopResolver
from powermail.queue.store import (
    DELIVERED,
    FAILED,
    QueuedMessage,
    QueuedRecipient,
    QueueStore,
)
from powermail.smtp.trace import new_message_id

__all__ = ["QueueRunner"]

_log = Logger()

# Attempts under way at once; messages due beyond that wait their turn.
MAX_IN_FLIGHT = 100
# Octets of a message read to quote its header section in a DSN.
_HEADER_LIMIT = 256 * 1024


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)


class QueueRunner(Service):
    """Schedules and runs the deliveries of every message in the queue.

    ``settings`` returns the configuration in force (its ``queue``,
    ``server`` and ``tls`` parts are read at each attempt); ``deliver`` is
    ``queue.client.deliver`` or a test double with the same signature.
    """

    def __init__(
        self,
        *,
        store: QueueStore,
        settings: Callable[[], Any],
        resolver: NextHopResolver,
        clock: IReactorTime,
        deliver: Callable[..., defer.Deferred],
        reactor: Any = None,
        trust_root: Any = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self.reactor = reactor if reactor is not None else clock
        self.deliver = deliver
        self.trust_root = trust_root
        # The queue in memory is only an index: id -> due time (None while
        # held), and a heap of due times under one timer.  Envelopes stay on
        # disk; an entry is in memory ("live") only while something works
        # on it, so memory stays flat however long the queue grows.
        self._index: dict[str, float | None] = {}
        self._heap: list[tuple[float, str]] = []
        self._timer: IDelayedCall | None = None
        self._live: dict[str, QueuedMessage] = {}
        self._busy: set[str] = set()
        self._in_flight: dict[str, defer.Deferred] = {}
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}
        self._due: deque[str] = deque()

    # Service

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        for entry in self.store.load_blocking():
            self._index[entry.id] = None if entry.held else entry.next_attempt
        for msg_id, when in self._index.items():
            if when is not None:
                heapq.heappush(self._heap, (when, msg_id))
        self._arm()
        if self._index:
            _log.info("queue: {count} messages to deliver", count=len(self._index))

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # Attempts under way finish (or fail) on their own; their results
        # are recorded if the reactor still runs, else retried at start.
        return defer.succeed(None)

    # What the MX and the administrator call

    def queued_ids(self) -> list[str]:
        """The ids of every message in the queue."""
        return list(self._index)

    def add(self, entry: QueuedMessage) -> None:
        """A message just committed to the queue: attempt it at once."""
        entry.next_attempt = self.clock.seconds()
        self._live[entry.id] = entry
        self._set_due(entry.id, entry.next_attempt)

    def get(self, msg_id: str) -> defer.Deferred[QueuedMessage]:
        """The entry as it stands (from memory while live, else from disk)."""
        if msg_id not in self._index:
            return defer.fail(KeyError(msg_id))
        live = self._live.get(msg_id)
        if live is not None:
            return defer.succeed(live)
        return self.store.run_blocking(self.store.load_one_blocking, msg_id)

    def list_entries(self) -> defer.Deferred[list[QueuedMessage]]:
        """Every entry, read from disk (live ones from memory)."""
        d = self.store.run_blocking(self.store.read_all_blocking)
        d.addCallback(
            lambda found: [
                self._live.get(e.id, e) for e in found if e.id in self._index
            ]
        )
        return d

    def retry(self, msg_id: str | None = None) -> list[str]:
        """Attempt now the given message, or every message; held ones wait."""
        if msg_id is not None and msg_id not in self._index:
            raise KeyError(msg_id)
        chosen = [msg_id] if msg_id else list(self._index)
        chosen = [i for i in chosen if self._index.get(i) is not None]
        now = self.clock.seconds()
        for chosen_id in chosen:
            self._set_due(chosen_id, now)
        return chosen

    def hold(self, msg_id: str) -> defer.Deferred:
        return self._change(msg_id, held=True)

    def release(self, msg_id: str) -> defer.Deferred:
        return self._change(msg_id, held=False)

    def delete(self, msg_id: str) -> defer.Deferred:
        if msg_id not in self._index:
            return defer.fail(KeyError(msg_id))
        del self._index[msg_id]
        live = self._live.pop(msg_id, None)
        _log.info("deleted {msg_id} from the queue", msg_id=msg_id)
        return self.store.remove(live if live is not None else msg_id)

    async def _change_async(self, msg_id: str, held: bool) -> None:
        live = self._live.get(msg_id)
        if live is not None:
            entry = live
        else:
            self._busy.add(msg_id)
            try:
                entry = await self.store.run_blocking(
                    self.store.load_one_blocking, msg_id
                )
            finally:
                self._busy.discard(msg_id)
        if msg_id not in self._index:
            return
        entry.held = held
        await self.store.save(entry)
        if msg_id not in self._index:
            return
        if held:
            self._index[msg_id] = None
        elif msg_id not in self._in_flight:
            self._set_due(msg_id, entry.next_attempt)

    def _change(self, msg_id: str, *, held: bool) -> defer.Deferred:
        if msg_id not in self._index:
            return defer.fail(KeyError(msg_id))
        return defer.ensureDeferred(self._change_async(msg_id, held))

    # Scheduling

    def _set_due(self, msg_id: str, when: float) -> None:
        self._index[msg_id] = when
        heapq.heappush(self._heap, (when, msg_id))
        self._arm()

    def _arm(self) -> None:
        """Set the one timer for the earliest due message."""
        if not self.running or not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            when, msg_id = heapq.heappop(self._heap)
            if self._index.get(msg_id) == when:
                self._attempt(msg_id)
        self._arm()

    def _attempt(self, msg_id: str) -> None:
        if self._index.get(msg_id) is None or msg_id in self._in_flight:
            return
        if msg_id in self._busy:
            self._set_due(msg_id, self.clock.seconds() + 1)
            return
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            # A backlog waits as ids, not as attempts holding their state;
            # a new message's entry is read again from disk when its turn
            # comes (nothing but its due time changed since its commit).
            self._due.append(msg_id)
            self._live.pop(msg_id, None)
            return
        d = defer.ensureDeferred(self._load_and_run(msg_id))
        self._in_flight[msg_id] = d
        d.addBoth(self._attempt_done, msg_id)

    async def _load_and_run(self, msg_id: str) -> None:
        entry = self._live.get(msg_id)
        if entry is None:
            try:
                entry = await self.store.run_blocking(
                    self.store.load_one_blocking, msg_id
                )
            except (OSError, ValueError) as exc:
                _log.error(
                    "queue entry {msg_id} unreadable: {error}", msg_id=msg_id, error=exc
                )
                self._index.pop(msg_id, None)
                return
            if msg_id not in self._index:
                return
            self._live[msg_id] = entry
        try:
            await self._run(entry)
        finally:
            self._live.pop(msg_id, None)

    def _attempt_done(self, _: object, msg_id: str) -> None:
        self._in_flight.pop(msg_id, None)
        while self._due and len(self._in_flight) < MAX_IN_FLIGHT:
            self._attempt(self._due.popleft())

    def _reschedule(self, entry: QueuedMessage) -> None:
        if entry.id not in self._index:
            return
        if entry.held:
            self._index[entry.id] = None
        else:
            self._set_due(entry.id, entry.next_attempt)

    async def _run(self, entry: QueuedMessage) -> None:
        try:
            await self._run_once(entry)
        except Exception:
            # Whatever went wrong (a full disk, a damaged file), the message
            # stays queued and is tried again later, never forgotten.
            _log.failure("queue attempt for {msg_id} failed", msg_id=entry.id)
            delays = self.settings().queue.retry_delays
            entry.next_attempt = self.clock.seconds() + delays[-1]
            self._reschedule(entry)

    async def _run_once(self, entry: QueuedMessage) -> None:
        groups: dict[tuple[str, str], list[QueuedRecipient]] = {}
        for recipient in entry.pending:
            groups.setdefault((recipient.next_hop, recipient.tls), []).append(recipient)
        newly_failed: list[QueuedRecipient] = []
        attempts = [
            self._semaphore(hop).run(
                lambda *args: defer.ensureDeferred(self._deliver_to_hop(*args)),
                entry,
                hop,
                tls,
                group,
                newly_failed,
            )
            for (hop, tls), group in groups.items()
        ]
        await defer.gatherResults(attempts, consumeErrors=True)
        entry.attempts += 1
        now = self.clock.seconds()
        settings = self.settings().queue
        if entry.pending and now - entry.created >= settings.max_age:
            for recipient in entry.pending:
                recipient.state = FAILED
                recipient.status = "4.4.7"
                recipient.text = (
                    f"gave up after {entry.attempts} attempts: {recipient.text or ''}"
                ).strip()
                newly_failed.append(recipient)
        if newly_failed:
            await self._report(entry, newly_failed, "failed")
        elif (
            entry.pending
            and not entry.delay_warned
            and settings.delay_warning
            and now - entry.created >= settings.delay_warning
        ):
            await self._report(entry, entry.pending, "delayed")
            entry.delay_warned = True
        if entry.id not in self._index:
            return  # deleted by the administrator meanwhile
        if not entry.pending:
            self._index.pop(entry.id, None)
            await self.store.remove(entry)
            return
        delays = settings.retry_delays
        entry.next_attempt = now + delays[min(entry.attempts - 1, len(delays) - 1)]
        await self.store.save(entry)
        self._reschedule(entry)

    def _semaphore(self, hop: str) -> defer.DeferredSemaphore:
        limit = self.settings().queue.max_per_destination
        semaphore = self._semaphores.get(hop)
        if semaphore is None or semaphore.limit != limit:
            semaphore = self._semaphores[hop] = defer.DeferredSemaphore(limit)
        return semaphore

    async def _deliver_to_hop(
        self,
        entry: QueuedMessage,
        hop_text: str,
        tls: str,
        recipients: list[QueuedRecipient],
        newly_failed: list[QueuedRecipient],
    ) -> None:
        config = self.settings()
        try:
            targets = await self.resolver.targets_for(
                hop_text, default_port=config.queue.smtp_port
            )
        except NextHopError as exc:
            for recipient in recipients:
                self._record(
                    entry,
                    recipient,
                    code=550 if exc.permanent else 451,
                    status=exc.status,
                    text=f"next hop {hop_text}: {exc}",
                    remote=None,
                    newly_failed=newly_failed,
                )
            return
        waiting = {r.address: r for r in recipients}
        for target in targets:
            outcome = await self.deliver(
                self.reactor,
                host=target.address,
                port=target.port,
                helo=config.server.hostname,
                sender=entry.sender or None,
                recipients=list(waiting),
                message=self.store.message_path(entry.id),
                size=entry.size,
                smtputf8=entry.smtputf8,
                eight_bit=entry.eight_bit,
                tls=tls,
                tls_hostname=target.hostname,
                trust_root=self.trust_root,
                timeout=config.queue.command_timeout,
                connect_timeout=config.queue.connect_timeout,
            )
            remote = f"{target.hostname} [{target.address}]:{target.port}"
            for result in outcome.outcomes:
                recipient = waiting.get(result.recipient)
                if recipient is None:
                    continue
                self._record(
                    entry,
                    recipient,
                    code=result.code,
                    status=result.status,
                    text=result.text,
                    remote=remote,
                    newly_failed=newly_failed,
                )
            if entry.id in self._index and entry.pending:
                # Recorded at once, so a crash now cannot deliver these again
                # (with nothing pending, the removal that follows records it).
                await self.store.save(entry)
            if any(not r.temporary for r in outcome.outcomes):
                # This host answered for the recipients: no other MX is tried.
                return
            waiting = {
                a: r for a, r in waiting.items() if r.state not in (DELIVERED, FAILED)
            }
            if not waiting:
                return

    def _record(
        self,
        entry: QueuedMessage,
        recipient: QueuedRecipient,
        *,
        code: int,
        status: str,
        text: str,
        remote: str | None,
        newly_failed: list[QueuedRecipient],
    ) -> None:
        recipient.attempts += 1
        recipient.code, recipient.status, recipient.text = code, status, text
        recipient.remote_mta = remote
        fields = dict(
            msg_id=entry.id,
            rcpt=recipient.address,
            remote=remote or recipient.next_hop,
            code=code,
            status=status,
            text=text,
        )
        if 200 <= code < 300:
            recipient.state = DELIVERED
            _log.info(
                "delivered {msg_id} to <{rcpt}> via {remote}: {code} {status} {text}",
                **fields,
            )
        elif 500 <= code < 600:
            recipient.state = FAILED
            newly_failed.append(recipient)
            _log.warn(
                "bounced {msg_id} for <{rcpt}> via {remote}: {code} {status} {text}",
                **fields,
            )
        else:
            _log.info(
                "deferred {msg_id} for <{rcpt}> via {remote}: {code} {status} {text}",
                **fields,
            )

    # Reports to the sender

    async def _report(
        self, entry: QueuedMessage, recipients: list[QueuedRecipient], action: str
    ) -> None:
        if not entry.sender or entry.is_report:
            return
        settings = self.settings()
        header_bytes = await self.store.run_blocking(self._read_headers, entry.id)
        until = _utc(entry.created + settings.queue.max_age)
        failed = [
            FailedRecipient(
                recipient=r.address,
                action=action,
                status=r.status or ("4.0.0" if action == "delayed" else "5.0.0"),
                diagnostic=f"{r.code} {r.status} {r.text}" if r.code else r.text,
                remote_mta=r.remote_mta.split(" ")[0] if r.remote_mta else None,
                last_attempt=_utc(self.clock.seconds()),
                will_retry_until=until if action == "delayed" else None,
            )
            for r in recipients
        ]
        report = build_dsn(
            reporting_mta=settings.server.hostname,
            sender=entry.sender,
            msg_id=entry.id,
            arrival=_utc(entry.created),
            recipients=failed,
            original=header_bytes,
            now=_utc(self.clock.seconds()),
            smtputf8=entry.smtputf8,
        )
        domain = entry.sender.rpartition("@")[2]
        if settings.directory.is_hosted(domain.lower()):
            # Our own sender: the report goes through our own MX, which
            # stores or forwards it as for any message, not out to DNS.
            listen = settings.mx.listen[0]
            domain = f"[{listen.host}]:{listen.port}"
        dsn = QueuedMessage(
            id=new_message_id(),
            sender="",
            created=self.clock.seconds(),
            size=len(report),
            smtputf8=entry.smtputf8,
            eight_bit=entry.smtputf8,
            recipients=[QueuedRecipient(entry.sender, domain)],
            is_report=True,
        )
        await self.store.run_blocking(self.store.enqueue_blocking, dsn, report)
        _log.info(
            "sent {action} report {dsn_id} for {msg_id} to <{sender}>",
            action=action,
            dsn_id=dsn.id,
            msg_id=entry.id,
            sender=entry.sender,
        )
        self.add(dsn)

    def _read_headers(self, msg_id: str) -> bytes:
        try:
            with open(self.store.message_path(msg_id), "rb") as file:
                head = file.read(_HEADER_LIMIT)
        except OSError as exc:
            _log.error(
                "cannot read {msg_id} for its report: {error}", msg_id=msg_id, error=exc
            )
            return b""
        end = head.find(b"\r\n\r\n")
        return head if end < 0 else head[: end + 4]
