"""The IMAP4rev1 wire: lines, literals, TLS, limits and the order of replies.

Twisted's ``imap4.IMAP4Server`` is not subclassed (see docs/architecture.md):
this protocol reads the byte stream itself.  A command is complete when a
line ends without a literal marker; a literal (``{n}``, or LITERAL+'s
``{n+}``) is read as counted octets, in memory or, for a large APPEND, on
disk.  One command runs at a time: the next is not read until the current
one has sent its tagged reply, so replies always come in order.  What each
command does is ``imap.commands``'s; this module owns framing and limits.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from powermail.imap.parser import LITERAL_MARK, Literal
from powermail.storage.spool import SpoolFile

__all__ = ["ImapFactory", "ImapLimits", "ImapServerProtocol"]

_log = Logger()

# A literal marker ends its line: "{123}" or, with LITERAL+, "{123+}".
_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")
_APPEND = re.compile(rb"\A[^ ]+ (?:UID )?APPEND ", re.IGNORECASE)
# Before login only short literals (a user name, a password) make sense.
PREAUTH_LITERAL_LIMIT = 8 * 1024
# Literals above this size go to a file in the user's Maildir tmp/.
SPOOL_THRESHOLD = 64 * 1024
# Octets read ahead while a command is still running (pipelining).
PAUSED_BUFFER_LIMIT = 256 * 1024
CLOSE_GRACE = 10
_session_numbers = itertools.count(1)


@dataclass(frozen=True)
class ImapLimits:
    """The limits of the IMAP listeners; see ``config._schema`` for defaults."""

    loopback_plaintext: bool
    max_literal_size: int
    max_command_line: int
    max_errors: int
    max_login_failures: int
    login_failure_delay: int
    max_connections: int
    max_connections_per_client: int
    idle_timeout: int
    login_timeout: int = 60


def is_loopback(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


class ImapServerProtocol(protocol.Protocol):
    """One IMAP connection."""

    def __init__(
        self, factory: ImapFactory, peer_ip: str, peer_port: int, *, tls: bool
    ) -> None:
        from powermail.imap.commands import Commands

        self.factory = factory
        self.limits = factory.limits
        self.peer_ip = peer_ip
        self.peer = f"{peer_ip}:{peer_port}"
        self.session_id = next(_session_numbers)
        self.tls = tls
        self.closed = False
        self.commands = Commands(self)
        self._buffer = b""
        self._pieces: list[bytes] = []
        self._literals: list[Literal] = []
        self._command_size = 0
        self._literal_left = 0
        self._literal_sink: SpoolFile | bytearray | None = None
        self._discarding = False
        self._busy = False
        self._line_waiter: defer.Deferred | None = None
        self._discard_input = False
        self._processing = False
        self._holds: set[str] = set()
        self._writable: list[defer.Deferred] = []
        self._idle_timer: Any = None
        self._login_timer: Any = None
        self._abort_timer: Any = None

    # -- Twisted's Protocol interface -----------------------------------------

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        # Responses go out in many small writes: Nagle's algorithm would
        # hold each batch for the client's delayed ACK (about 40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.transport.registerProducer(self, True)
        if not self.factory.admit(self):
            _log.warn("refused IMAP connection from {peer}: too many", peer=self.peer)
            self.send(b"* BYE Too many connections, try again later\r\n")
            self.close()
            return
        self._idle_timer = self.factory.clock.callLater(
            self.limits.idle_timeout, self._timed_out
        )
        # A connection that never logs in must not hold its slot for the
        # whole idle timeout.
        self._login_timer = self.factory.clock.callLater(
            self.limits.login_timeout, self._login_timed_out
        )
        self.send(
            b"* OK [CAPABILITY %s] PowerMail ready.\r\n"
            % self.commands.capabilities().encode()
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.closed:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.limits.idle_timeout)
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self.closed = True
        for timer in (self._idle_timer, self._login_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._drop_command()
        self.commands.connection_lost()
        waiter, self._line_waiter = self._line_waiter, None
        if waiter is not None:
            waiter.errback(ConnectionError("connection lost"))
        for waiting in self._writable:
            waiting.errback(ConnectionError("connection lost"))
        self._writable = []
        self.factory.release(self)

    # -- IPushProducer: the transport says when the client stops reading ------

    def pauseProducing(self) -> None:  # noqa: N802
        self._hold("output")

    def resumeProducing(self) -> None:  # noqa: N802
        self._release("output")
        waiting, self._writable = self._writable, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:  # noqa: N802
        self.closed = True

    def _hold(self, reason: str) -> None:
        """Stop taking commands; ``work`` (input piling up) also stops reading.

        An ``output`` hold never pauses the transport: TLS pauses its
        producer during a handshake, and reading must go on for the
        handshake to finish.  Input then piles up only to the buffer limit.
        """
        if reason == "work" and "work" not in self._holds and not self.closed:
            self.transport.pauseProducing()
        self._holds.add(reason)

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if reason == "work" and not self.closed:
            self.transport.resumeProducing()
        if not self._holds and not self.closed:
            self._process()

    def writable(self) -> defer.Deferred:
        """Fires once the client has read enough of what was sent."""
        if "output" not in self._holds or self.closed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._writable.append(d)
        return d

    # -- output ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self, farewell: bytes | None = None) -> None:
        """Say ``farewell`` (a ``* BYE`` line), close, cut after a grace period."""
        if self.closed:
            return
        if farewell is not None:
            self.send(farewell)
        self.closed = True
        self._buffer = b""
        self._drop_command()
        for timer in (self._idle_timer, self._login_timer):
            if timer is not None and timer.active():
                timer.cancel()
        # TLS sends its close_notify and closes only once no producer is
        # registered; with one it would wait for the grace period.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort_timer = self.factory.clock.callLater(
            CLOSE_GRACE, self.transport.abortConnection
        )

    def logged_in(self) -> None:
        """The session is authenticated: only the idle timeout applies now."""
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()

    def _login_timed_out(self) -> None:
        _log.info("IMAP session from {peer} did not log in in time", peer=self.peer)
        self.close(b"* BYE Login timeout\r\n")

    def _timed_out(self) -> None:
        _log.info("IMAP session from {peer} timed out", peer=self.peer)
        self.close(b"* BYE Autologout; idle for too long\r\n")

    # -- input ----------------------------------------------------------------

    def wait_for_line(self) -> defer.Deferred:
        """The next line the client sends, for a continuation (AUTHENTICATE,
        IDLE's DONE); the tagged reply is still to come."""
        assert self._line_waiter is None
        self._line_waiter = defer.Deferred()
        self.factory.clock.callLater(0, self._process)
        return self._line_waiter

    def discard_pending_input(self) -> None:
        """Drop what the client sent behind this command (after STARTTLS)."""
        self._discard_input = True

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False

    def _process_buffer(self) -> None:
        buffer = self._buffer
        start = 0
        limit = self.limits.max_command_line
        while start < len(buffer) and not self.closed and "output" not in self._holds:
            if self._busy and self._line_waiter is None:
                break
            if self._literal_left:
                take = min(self._literal_left, len(buffer) - start)
                self._literal_write(buffer[start : start + take])
                start += take
                if self._literal_left:
                    break
                self._literal_done()
                continue
            end = buffer.find(b"\n", start)
            if end < 0:
                if len(buffer) - start > limit:
                    self.close(b"* BYE Command line too long\r\n")
                    return
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._line_waiter is not None:
                waiter, self._line_waiter = self._line_waiter, None
                waiter.callback(line)
                continue
            self._line(line)
            if self._discard_input:
                # What was sent behind STARTTLS came in the clear and must
                # not be taken as coming through TLS (CVE-2011-0411).
                self._discard_input = False
                if len(buffer) > start:
                    _log.warn(
                        "discarded {size} octets pipelined behind STARTTLS from {peer}",
                        size=len(buffer) - start,
                        peer=self.peer,
                    )
                buffer, start = b"", 0
        self._buffer = b"" if self.closed else buffer[start:]
        stalled = self._busy or "output" in self._holds
        if stalled and len(self._buffer) > PAUSED_BUFFER_LIMIT:
            # The client keeps sending while its commands wait: leave the
            # rest in the kernel's buffers.
            self._hold("work")

    def _line(self, line: bytes) -> None:
        self._command_size += len(line) + 2
        if self._command_size > self.limits.max_command_line:
            self._drop_command()
            self.close(b"* BYE Command line too long\r\n")
            return
        marker = _LITERAL_AT_END.search(line)
        if marker is None:
            self._pieces.append(line)
            text = b"".join(self._pieces)
            literals = self._literals
            self._pieces, self._literals, self._command_size = [], [], 0
            self._run(text, literals)
            return
        size = int(marker.group(1))
        plus = bool(marker.group(2))
        head = line[: marker.start()]
        self._pieces.append(head + bytes([LITERAL_MARK]))
        first = self._pieces[0]
        is_append = bool(_APPEND.match(first)) and len(self._literals) <= 1
        if not self.commands.authenticated:
            allowed = PREAUTH_LITERAL_LIMIT
        elif is_append:
            allowed = self.limits.max_literal_size
        else:
            allowed = self.limits.max_command_line - self._command_size
        if size > allowed:
            tag = first.split(b" ", 1)[0].decode("ascii", "replace") or "*"
            self._drop_command()
            if plus:
                # The octets are on their way and too many to skip.
                self.close(b"* BYE Literal too large\r\n")
                return
            self.send(
                b"%s NO [TOOBIG] Literal of %d octets is over the limit of %d\r\n"
                % (tag.encode(), size, allowed)
            )
            self.commands.count_error()
            return
        if is_append and size > SPOOL_THRESHOLD:
            self._literal_sink = SpoolFile(
                self.commands.spool_path(), threshold=SPOOL_THRESHOLD
            )
            self._command_size = len(b"".join(self._pieces))
        else:
            self._literal_sink = bytearray()
            self._command_size += size
        self._literal_left = size
        if not plus:
            self.send(b"+ Ready for literal data\r\n")
        if size == 0:
            self._literal_done()

    def _literal_write(self, data: bytes) -> None:
        self._literal_left -= len(data)
        sink = self._literal_sink
        if isinstance(sink, bytearray):
            sink += data
        elif sink is not None:
            sink.write(data)

    def _literal_done(self) -> None:
        sink, self._literal_sink = self._literal_sink, None
        if isinstance(sink, bytearray):
            self._literals.append(Literal(len(sink), data=bytes(sink)))
        elif sink is not None:
            self._literals.append(Literal(sink.size, spool=sink))

    def _drop_command(self) -> None:
        sink, self._literal_sink = self._literal_sink, None
        if isinstance(sink, SpoolFile):
            sink.discard()
        for literal in self._literals:
            literal.discard()
        self._pieces, self._literals = [], []
        self._command_size = 0
        self._literal_left = 0

    def _run(self, text: bytes, literals: list[Literal]) -> None:
        self._busy = True
        try:
            result = self.commands.run(text, literals)
        except BaseException:
            self._busy = False
            for literal in literals:
                literal.discard()
            raise
        if isinstance(result, defer.Deferred):
            result.addBoth(self._finished, literals)
        else:
            self._finished(None, literals)

    def _finished(self, result: Any, literals: list[Literal]) -> None:
        for literal in literals:
            literal.discard()
        self._busy = False
        if isinstance(result, Failure):
            _log.failure("IMAP command failed from {peer}", result, peer=self.peer)
            self.close(b"* BYE Internal error\r\n")
            return
        if self.closed:
            return
        if "work" in self._holds and "output" not in self._holds:
            self._release("work")
        else:
            self.factory.clock.callLater(0, self._process)


class ImapFactory(protocol.Factory):
    """Builds IMAP sessions for the listeners; counts them for the limits.

    ``tls`` says the listener speaks TLS from the first octet (port 993).
    """

    def __init__(
        self,
        *,
        portal: Any,
        limits: ImapLimits,
        clock: IReactorTime,
        tls_options: Any,
        notifier: Any,
        tls: bool = False,
        run_blocking: Callable[..., defer.Deferred] | None = None,
    ) -> None:
        self.portal = portal
        self.limits = limits
        self.clock = clock
        self.tls_options = tls_options
        self.notifier = notifier
        # Runs file system work off the reactor; tests may run it at once.
        self.run_blocking = run_blocking or deferToThread
        self.tls = tls
        self.noisy = False
        self.sessions: set[ImapServerProtocol] = set()
        self.shared_counts: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> ImapServerProtocol:  # noqa: N802
        host = getattr(addr, "host", "0.0.0.0")
        port = getattr(addr, "port", 0)
        return ImapServerProtocol(self, host, port, tls=self.tls)

    def admit(self, session: ImapServerProtocol) -> bool:
        counts = self.shared_counts
        if sum(counts.values()) >= self.limits.max_connections:
            return False
        if counts.get(session.peer_ip, 0) >= self.limits.max_connections_per_client:
            return False
        self.sessions.add(session)
        counts[session.peer_ip] = counts.get(session.peer_ip, 0) + 1
        return True

    def release(self, session: ImapServerProtocol) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        counts = self.shared_counts
        left = counts.get(session.peer_ip, 1) - 1
        if left:
            counts[session.peer_ip] = left
        else:
            counts.pop(session.peer_ip, None)
