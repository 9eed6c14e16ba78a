"""The SMTP client that hands one stored message to the next hop (RFC 5321).

Twisted's ``smtp.SMTPClient`` is not used: its ``transformChunk`` turns every
LF into CRLF (stored messages already end their lines in CRLF, so CR CR LF
would go out), it dot-stuffs wrongly where a line starts at a chunk boundary
and it never pipelines.  ``deliver`` runs one session on a plain
``Protocol``: greeting, EHLO (HELO when refused), STARTTLS as the policy
says, one transaction, QUIT.  Whatever goes wrong becomes a result for each
recipient not yet answered; the Deferred never fails for a network or
protocol problem, so the queue only has to read outcomes.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error, protocol, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["RecipientOutcome", "SessionOutcome", "deliver", "verify"]

_log = Logger()

TLS_POLICIES = ("none", "opportunistic", "required")
# Octets read from the message file per write (and per backpressure check).
CHUNK_SIZE = 64 * 1024
# Seconds to wait for the answer to QUIT once every recipient has its result.
QUIT_WAIT = 5.0
# Seconds a closing connection may take to finish, then it is cut.
CLOSE_GRACE = 10.0
# Octets one reply (all its lines) may take; a longer one is a protocol error.
MAX_REPLY_SIZE = 64 * 1024
# Complete replies that may wait unread; more means the peer is babbling.
MAX_UNREAD_REPLIES = 16
# Characters of a reply's text kept in an outcome (and so in logs and DSNs).
MAX_TEXT = 1000

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?= |$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RecipientOutcome:
    """What became of one recipient in a session.

    ``code`` is the next hop's reply code, or 0 when no reply of its applies
    (the connection failed or timed out, TLS could not be had); ``status``
    is the enhanced status code (RFC 3463) from the reply, or derived from
    its code when the reply had none; ``text`` is one printable line.
    """

    recipient: str
    code: int
    status: str
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return self.code == 0 or 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@dataclass(frozen=True)
class SessionOutcome:
    """The result of one session: one outcome per recipient, in their order.

    ``tls`` says whether the session ran over TLS (a completed handshake).
    """

    host: str
    port: int
    tls: bool
    outcomes: tuple[RecipientOutcome, ...]


def verify(
    reactor: Any,
    *,
    host: str,
    port: int,
    helo: str,
    recipient: str,
    tls: str = "opportunistic",
    tls_hostname: str | None = None,
    trust_root: Any = None,
    timeout: float = 30.0,
    connect_timeout: float = 30.0,
) -> defer.Deferred[RecipientOutcome]:
    """Ask the server at host:port whether it takes mail for ``recipient``.

    A callout: EHLO, ``MAIL FROM:<>``, ``RCPT TO``, QUIT, and no message.
    Fires with the outcome for the recipient (2xx: it exists), never fails.
    """
    if tls not in TLS_POLICIES:
        raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {tls!r}")
    probe = _Delivery(
        reactor,
        host=host,
        port=port,
        helo=helo,
        sender="",
        recipients=[recipient],
        message=None,
        size=0,
        smtputf8=False,
        eight_bit=False,
        tls=tls,
        tls_hostname=tls_hostname or host,
        trust_root=trust_root,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    d = defer.Deferred.fromCoroutine(probe.run())
    d.addCallback(lambda outcome: outcome.outcomes[0])
    return d


def deliver(
    reactor: Any,
    *,
    host: str,
    port: int,
    helo: str,
    sender: str | None,
    recipients: list[str],
    message: Path,
    size: int,
    smtputf8: bool,
    eight_bit: bool,
    tls: str = "opportunistic",
    tls_hostname: str | None = None,
    trust_root: Any = None,
    timeout: float = 300.0,
    connect_timeout: float = 30.0,
) -> defer.Deferred[SessionOutcome]:
    """Deliver ``message`` to ``recipients`` through the SMTP server at host:port.

    ``reactor`` provides TCP, time and name resolution (a
    ``MemoryReactorClock`` in tests).  ``message`` holds the message exactly
    as it is to be sent, CRLF line ends included; ``size`` is its size in
    octets, declared with SIZE and checked against the next hop's limit.
    ``smtputf8`` and ``eight_bit`` say whether the message needs SMTPUTF8 or
    8BITMIME; a non-ASCII address needs SMTPUTF8 whatever ``smtputf8`` says.
    ``tls`` is "none", "opportunistic" (STARTTLS when offered, certificate
    unchecked) or "required" (STARTTLS and a certificate valid for
    ``tls_hostname``, default ``host``, under ``trust_root``, default the
    platform's trust store).  ``timeout`` bounds the wait for each reply and
    each stall while the message is sent.

    The Deferred fires with a ``SessionOutcome`` and never fails; only
    arguments no caller should pass (an unknown policy, a control character
    in ``helo``) raise ``ValueError`` at once.
    """
    if tls not in TLS_POLICIES:
        raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {tls!r}")
    if not helo or not helo.isascii() or _CONTROL.search(helo) or " " in helo:
        raise ValueError(f"not a host name for EHLO: {helo!r}")
    delivery = _Delivery(
        reactor,
        host=host,
        port=port,
        helo=helo,
        sender=sender or "",
        recipients=list(recipients),
        message=message,
        size=size,
        smtputf8=smtputf8,
        eight_bit=eight_bit,
        tls=tls,
        tls_hostname=tls_hostname or host,
        trust_root=trust_root,
        timeout=timeout,
        connect_timeout=connect_timeout,
    )
    return defer.Deferred.fromCoroutine(delivery.run())


@dataclass(frozen=True)
class _Reply:
    """One reply of the next hop.

    ``status`` is the enhanced code the reply gave ("" if none); ``lines``
    keeps each line's text, for EHLO.
    """

    code: int
    status: str
    text: str
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        """The enhanced status code given, or one derived from the code."""
        return self.status or f"{self.code // 100}.0.0"

    def __str__(self) -> str:
        return " ".join(
            str(part) for part in (self.code, self.status, self.text) if part
        )

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def negative(self) -> bool:
        return 400 <= self.code < 600


class _SessionError(Exception):
    """Ends the session: every recipient still unanswered gets this result.

    ``polite``: the connection still works, so QUIT is sent before closing.
    """

    def __init__(self, code: int, status: str, text: str, *, polite: bool) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text
        self.polite = polite

    @classmethod
    def from_reply(cls, reply: _Reply) -> _SessionError:
        # A 421 means the server is closing the connection already.
        return cls(reply.code, reply.enhanced, reply.text, polite=reply.code != 421)


def _printable(text: str) -> str:
    """``text`` on one line, without control characters, at most MAX_TEXT long."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _parse_reply(lines: list[tuple[int, str]]) -> _Reply:
    """Build a reply from its lines; the enhanced code is read from the first.

    RFC 2034 repeats the code on every line; it is taken off each one.  A
    code whose class differs from the reply's is text, not a status.
    """
    code = lines[-1][0]
    match = _STATUS.match(lines[0][1])
    status = ""
    if match is not None and int(match[1]) == code // 100:
        status = match[0]
    texts = []
    for _, text in lines:
        if status and (text == status or text.startswith(status + " ")):
            text = text[len(status) + 1 :]
        texts.append(text)
    text = _printable(" ".join(t for t in texts if t))
    return _Reply(code, status, text, tuple(texts))


def _extensions(reply: _Reply) -> dict[str, str]:
    """The EHLO keywords offered (upper case), each with its parameters."""
    offered = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            offered[keyword.upper()] = params.strip()
    return offered


def _size_limit(extensions: dict[str, str]) -> int:
    """The SIZE advertised (RFC 1870), 0 when there is none or no number."""
    value = extensions.get("SIZE", "").split(" ")[0]
    return int(value) if value.isdigit() else 0


def _stuff(chunk: bytes, at_line_start: bool) -> bytes:
    """Dot-stuff one chunk of the message (RFC 5321 section 4.5.2).

    ``at_line_start``: the chunk before this one ended with a line end, so a
    dot at the very start of this one begins a line.  A line is taken to
    begin after any LF, so a bare LF cannot hide an end of data from a next
    hop that takes a bare LF as a line end.
    """
    stuffed = chunk.replace(b"\n.", b"\n..")
    if at_line_start and chunk.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A TCP endpoint: straight to an IP address, through DNS for a name.

    HostnameEndpoint would also take an IP, but learns of a refused
    connection only at its next 0.3 s tick.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return kind(reactor, host, port, timeout=timeout)


def _describe(reason: BaseException, *, tls_hostname: str = "") -> str:
    """A short, readable account of why a connection or handshake ended."""
    if isinstance(reason, VerificationError):
        return f"the certificate is not valid for {tls_hostname or 'the host'}"
    if isinstance(reason, SSL.Error):
        details = [item[-1] for item in (reason.args[0] if reason.args else []) if item]
        return ", ".join(str(d) for d in details if d) or "TLS error"
    if isinstance(reason, error.ConnectionDone):
        return "closed by the peer"
    if isinstance(reason, error.ConnectionLost):
        return "connection reset or lost"
    return str(reason) or type(reason).__name__


@implementer(IPullProducer)
class _BodyProducer:
    """Streams the message file into the transport, dot-stuffed, chunk by chunk.

    The transport asks for the next chunk when the previous one has left its
    buffer, so a slow next hop never makes PowerMail hold more than a chunk.
    """

    def __init__(
        self,
        file: IO[bytes],
        *,
        write: Callable[[bytes], None],
        progress: Callable[[], None],
        finished: Callable[[bytes], None],
        failed: Callable[[OSError], None],
    ) -> None:
        self._file = file
        self._write = write
        self._progress = progress
        self._finished = finished
        self._failed = failed
        self._at_line_start = True
        self._tail = b""
        self._done = False

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        if self._done:
            return
        self._progress()
        try:
            chunk = self._file.read(CHUNK_SIZE)
        except OSError as exc:
            self._done = True
            self._failed(exc)
            return
        if chunk:
            self._write(_stuff(chunk, self._at_line_start))
            self._at_line_start = chunk.endswith(b"\n")
            self._tail = (self._tail + chunk)[-2:]
            return
        self._done = True
        # The end of data is CRLF.CRLF; for an empty message the CRLF of the
        # DATA command is the first one.
        if self._tail and not self._tail.endswith(b"\r\n"):
            self._finished(b"\r\n.\r\n")
        else:
            self._finished(b".\r\n")

    def stopProducing(self) -> None:  # noqa: N802
        self._done = True


@implementer(IHandshakeListener)
class _ClientConnection(protocol.Protocol):
    """The wire side of one session: replies in, commands and the message out.

    It knows nothing of the transaction; ``_Delivery`` drives it, awaiting one
    thing at a time (a reply, the TLS handshake, the message sent).  Every
    failure (a timeout, a lost connection, a malformed reply) reaches the
    awaiting side as an ``_SessionError``, and ends the connection.
    """

    def __init__(self, *, clock: Any, timeout: float, peer: str) -> None:
        self._clock = clock
        self._timeout = timeout
        self.peer = peer
        self.tls = False
        self._buffer = b""
        self._lines: list[tuple[int, str]] = []
        self._reply_size = 0
        self._replies: deque[_Reply] = deque()
        # What is awaited: "reply", "handshake" or "body"; only that resolves it.
        self._waiter: defer.Deferred[Any] | None = None
        self._waiting_kind = ""
        self._waiting_for = ""
        self._timeout_text = ""
        self._timer: Any = None
        self._abort_timer: Any = None
        self._handshaking = False
        self._tls_hostname = ""
        self._failure: _SessionError | None = None
        self._lost = False

    # Twisted's Protocol interface.

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        # Without it, the 5-octet end of data waits for the peer's delayed
        # ACK of the body (Nagle): about 40 ms lost per message.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._failure is not None:
            return
        self._buffer += data
        # A reply can start TLS or end the session; the buffer is read
        # afresh after each line.
        while self._failure is None:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_SIZE:
                    self._protocol_error("a reply line longer than 64 KiB")
                break
            line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            self._line_received(line)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self._lost = True
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        if self._failure is not None:
            return
        why = _describe(reason.value, tls_hostname=self._tls_hostname)
        early = [r for r in self._replies if r.negative]
        if early and self._waiting_kind == "body":
            # The server refused the message before its end, then hung up.
            self._fail(_SessionError.from_reply(early[0]))
            return
        if self._handshaking:
            self._fail(
                _SessionError(
                    0,
                    "4.7.5",
                    f"TLS handshake with {self.peer} failed: {why}",
                    polite=False,
                )
            )
            return
        doing = f" while {self._waiting_for}" if self._waiter is not None else ""
        self._fail(
            _SessionError(
                0,
                "4.4.2",
                f"connection to {self.peer} lost{doing}: {why}",
                polite=False,
            )
        )

    def handshakeCompleted(self) -> None:  # noqa: N802 (IHandshakeListener)
        self._handshaking = False
        self.tls = True
        _log.debug("TLS established with {peer}", peer=self.peer)
        self._resolve("handshake", None)

    # What _Delivery uses.

    def send(self, commands: list[str]) -> None:
        """Write commands in one segment (a pipelined group, or one command)."""
        if not self._lost:
            self.transport.write(b"".join(c.encode() + b"\r\n" for c in commands))

    def read_reply(
        self, command: str, *, timeout: float | None = None
    ) -> defer.Deferred[_Reply]:
        """The next reply; ``command`` names what it answers, for error texts."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        wait = self._timeout if timeout is None else timeout
        return self._wait(
            "reply",
            f"waiting for the reply to {command}",
            f"no reply from {self.peer} to {command} within {wait:g} seconds",
            timeout,
        )

    def start_tls(self, options: Any, *, hostname: str) -> defer.Deferred[None]:
        """Start TLS now that the server said 220; fires when the handshake ends.

        ``hostname`` is the name the certificate is checked against, if it is.
        """
        # Whatever followed the 220 came in the clear, so it cannot be taken
        # as coming through TLS (the CVE-2011-0411 class).
        self._buffer = b""
        self._replies.clear()
        self._handshaking = True
        self._tls_hostname = hostname
        self.transport.startTLS(options)
        return self._wait(
            "handshake",
            "in the TLS handshake",
            f"TLS handshake with {self.peer} not done within {self._timeout:g} seconds",
        )

    def send_body(self, file: IO[bytes]) -> defer.Deferred[None]:
        """Stream the message and the end of data; fires when all is written."""
        waiting = self._wait(
            "body",
            "sending the message",
            f"{self.peer} took no data for {self._timeout:g} seconds",
        )
        producer = _BodyProducer(
            file,
            write=self.transport.write,
            progress=self._restart_timer,
            finished=self._body_finished,
            failed=self._body_failed,
        )
        self.transport.registerProducer(producer, False)
        return waiting

    def close(self) -> None:
        """Close once what is written has gone, or cut after a grace period."""
        self._cancel_timer()
        if self._lost:
            return
        if self._failure is not None and not self._failure.polite:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        self._abort_timer = self._clock.callLater(
            CLOSE_GRACE, self.transport.abortConnection
        )

    # Internals.

    def _line_received(self, line: bytes) -> None:
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            shown = _printable(line[:80].decode("utf-8", "replace"))
            self._protocol_error(f"a malformed reply line {shown!r}")
            return
        self._reply_size += len(line) + 2
        if self._reply_size > MAX_REPLY_SIZE:
            self._protocol_error("a reply longer than 64 KiB")
            return
        text = (match[3] or b"").decode("utf-8", "replace")
        self._lines.append((int(match[1]), text))
        if match[2] == b"-":
            return
        reply = _parse_reply(self._lines)
        self._lines = []
        self._reply_size = 0
        if self._waiter is not None and self._waiting_kind == "reply":
            self._resolve("reply", reply)
        elif len(self._replies) >= MAX_UNREAD_REPLIES:
            self._protocol_error("replies to commands never sent")
        else:
            self._replies.append(reply)

    def _protocol_error(self, what: str) -> None:
        self._fail(
            _SessionError(0, "4.5.0", f"{self.peer} sent {what}", polite=False),
        )
        self.transport.abortConnection()

    def _wait(
        self, kind: str, doing: str, timeout_text: str, timeout: float | None = None
    ) -> defer.Deferred[Any]:
        if self._failure is not None:
            return defer.fail(self._failure)
        waiting: defer.Deferred[Any] = defer.Deferred()
        self._waiter = waiting
        self._waiting_kind = kind
        self._waiting_for = doing
        self._timeout_text = timeout_text
        self._timer = self._clock.callLater(
            self._timeout if timeout is None else timeout, self._timed_out
        )
        return waiting

    def _resolve(self, kind: str, result: object) -> None:
        if self._waiter is None or self._waiting_kind != kind:
            return
        self._cancel_timer()
        waiting, self._waiter, self._waiting_kind = self._waiter, None, ""
        waiting.callback(result)

    def _fail(self, ended: _SessionError) -> None:
        if self._failure is None:
            self._failure = ended
        self._cancel_timer()
        waiting, self._waiter, self._waiting_kind = self._waiter, None, ""
        if waiting is not None:
            waiting.errback(ended)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(_SessionError(0, "4.4.2", self._timeout_text, polite=False))
        if not self._lost:
            self.transport.abortConnection()

    def _restart_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _body_finished(self, end: bytes) -> None:
        self.transport.unregisterProducer()
        _log.debug("message and end of data written to {peer}", peer=self.peer)
        self.transport.write(end)
        self._resolve("body", None)

    def _body_failed(self, exc: OSError) -> None:
        # Without the end of data the next hop cannot take a partial message.
        self.transport.unregisterProducer()
        self._fail(
            _SessionError(0, "4.3.0", f"cannot read the message: {exc}", polite=False)
        )
        self.transport.abortConnection()


class _OneConnectionFactory(protocol.Factory):
    """Hands out the session's protocol once (an endpoint may try several)."""

    noisy = False

    def __init__(self, connection: _ClientConnection) -> None:
        self._connection: _ClientConnection | None = connection

    def buildProtocol(self, addr: Any) -> protocol.Protocol:  # noqa: N802
        connection, self._connection = self._connection, None
        return connection if connection is not None else protocol.Protocol()


class _Delivery:
    """One session with the next hop, and the result for each recipient."""

    def __init__(
        self,
        reactor: Any,
        *,
        host: str,
        port: int,
        helo: str,
        sender: str,
        recipients: list[str],
        message: Path | None,
        size: int,
        smtputf8: bool,
        eight_bit: bool,
        tls: str,
        tls_hostname: str,
        trust_root: Any,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        self._reactor = reactor
        self.host = host
        self.port = port
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._helo = helo
        self._sender = sender
        self._recipients = recipients
        self._message = message
        self._size = size
        addresses = [sender, *recipients]
        self._smtputf8 = smtputf8 or not all(a.isascii() for a in addresses)
        self._eight_bit = eight_bit
        self._tls = tls
        self._tls_hostname = tls_hostname
        self._trust_root = trust_root
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._results: list[RecipientOutcome | None] = [None] * len(recipients)
        self._connection: _ClientConnection | None = None
        self._file: IO[bytes] | None = None

    async def run(self) -> SessionOutcome:
        """Run the session; every problem ends as outcomes, never as an error."""
        try:
            if await self._session_or_abandon():
                await self._quit()
        except Exception:
            _log.failure("unexpected error delivering to {peer}", peer=self.peer)
            self._answer_all(0, "4.3.0", f"local error delivering to {self.peer}")
        finally:
            if self._connection is not None:
                self._connection.close()
            if self._file is not None:
                self._file.close()
        outcome = SessionOutcome(
            host=self.host,
            port=self.port,
            tls=self._connection is not None and self._connection.tls,
            outcomes=tuple(r for r in self._results if r is not None),
        )
        _log.info(
            "delivery to {peer} (TLS {tls}): {results}",
            peer=self.peer,
            tls="yes" if outcome.tls else "no",
            results="; ".join(
                f"<{o.recipient}> {o.code} {o.status} {o.text}"
                for o in outcome.outcomes
            ),
        )
        return outcome

    # The steps of a session.

    async def _session_or_abandon(self) -> bool:
        """Run the session; whether the connection is fit for a QUIT."""
        try:
            await self._session()
        except _SessionError as ended:
            self._answer_all(ended.code, ended.status, ended.text)
            return ended.polite
        return True

    async def _session(self) -> None:
        if _CONTROL.search(self._sender):
            raise _SessionError(
                553, "5.1.7", "sender address holds a control character", polite=False
            )
        for index, recipient in enumerate(self._recipients):
            if _CONTROL.search(recipient):
                self._results[index] = RecipientOutcome(
                    recipient,
                    553,
                    "5.1.3",
                    "recipient address holds a control character",
                )
        if not self._unanswered():
            return
        if self._message is not None:
            try:
                self._file = self._message.open("rb")
            except OSError as exc:
                raise _SessionError(
                    0, "4.3.0", f"cannot read the message: {exc}", polite=False
                ) from None

        connection = await self._connect()
        reply = await self._read("the greeting")
        if reply.code != 220:
            raise self._refusal(reply, "the greeting")
        extensions = await self._greet()

        if self._tls != "none" and "STARTTLS" in extensions:
            if await self._start_tls():
                extensions = await self._greet()
        if self._tls == "required" and not connection.tls:
            raise _SessionError(
                0,
                "4.7.4",
                f"TLS required but not offered by {self.peer}",
                polite=True,
            )

        self._check_capabilities(extensions)
        await self._transaction(extensions)

    async def _connect(self) -> _ClientConnection:
        connection = _ClientConnection(
            clock=self._reactor, timeout=self._timeout, peer=self.peer
        )
        endpoint = _endpoint(self._reactor, self.host, self.port, self._connect_timeout)
        try:
            await endpoint.connect(_OneConnectionFactory(connection))
        except error.ConnectionRefusedError:
            raise _SessionError(
                0, "4.4.1", f"connection to {self.peer} refused", polite=False
            ) from None
        except (error.TimeoutError, error.TCPTimedOutError, defer.CancelledError):
            raise _SessionError(
                0,
                "4.4.1",
                f"connection to {self.peer} timed out after "
                f"{self._connect_timeout:g} seconds",
                polite=False,
            ) from None
        except error.DNSLookupError as exc:
            raise _SessionError(
                0, "4.4.3", f"cannot resolve {self.host}: {exc}", polite=False
            ) from None
        except (error.ConnectError, OSError) as exc:
            raise _SessionError(
                0,
                "4.4.1",
                f"cannot connect to {self.peer}: {_describe(exc)}",
                polite=False,
            ) from None
        self._connection = connection
        return connection

    async def _read(self, command: str, *, timeout: float | None = None) -> _Reply:
        assert self._connection is not None
        reply = await self._connection.read_reply(command, timeout=timeout)
        if reply.code == 421:
            # The server is going away, whatever the command was.
            raise _SessionError.from_reply(reply)
        return reply

    def _refusal(self, reply: _Reply, command: str) -> _SessionError:
        """The end of a session whose ``command`` got ``reply``, not what it needed."""
        if reply.negative:
            return _SessionError.from_reply(reply)
        return _SessionError(
            0,
            "4.5.0",
            f"unexpected reply from {self.peer} to {command}: {reply}",
            polite=False,
        )

    async def _greet(self) -> dict[str, str]:
        """EHLO, or HELO if EHLO is refused; the extensions offered."""
        assert self._connection is not None
        self._connection.send([f"EHLO {self._helo}"])
        reply = await self._read("EHLO")
        if reply.positive:
            return _extensions(reply)
        if 500 <= reply.code < 600:
            self._connection.send([f"HELO {self._helo}"])
            reply = await self._read("HELO")
            if reply.positive:
                return {}
        raise self._refusal(reply, "EHLO")

    async def _start_tls(self) -> bool:
        """STARTTLS (RFC 3207); whether TLS now runs.

        Opportunistic TLS goes on in the clear when the server refuses
        STARTTLS, but not when the handshake fails: the session then ends.
        """
        assert self._connection is not None
        self._connection.send(["STARTTLS"])
        reply = await self._read("STARTTLS")
        if reply.code != 220:
            if self._tls == "required":
                raise _SessionError(
                    0,
                    "4.7.4",
                    f"TLS required but {self.peer} refused STARTTLS: {reply}",
                    polite=True,
                )
            _log.info(
                "{peer} refused STARTTLS ({reply}), going on in the clear",
                peer=self.peer,
                reply=str(reply),
            )
            return False
        if self._tls == "required":
            options = ssl.optionsForClientTLS(
                self._tls_hostname, trustRoot=self._trust_root
            )
        else:
            options = ssl.CertificateOptions(verify=False)
        await self._connection.start_tls(options, hostname=self._tls_hostname)
        return True

    def _check_capabilities(self, extensions: dict[str, str]) -> None:
        """Refuse here what the next hop said it cannot take, before MAIL."""
        limit = _size_limit(extensions)
        if limit and self._size > limit:
            raise _SessionError(
                552,
                "5.3.4",
                f"message of {self._size} octets exceeds the limit of {limit} "
                f"octets of {self.peer}",
                polite=True,
            )
        # RFC 6152 section 3 would also allow converting to 7 bits; PowerMail
        # does not, so such a message bounces.
        if self._eight_bit and "8BITMIME" not in extensions:
            raise _SessionError(
                554,
                "5.6.3",
                f"{self.peer} does not offer 8BITMIME, needed by this 8-bit message",
                polite=True,
            )
        if self._smtputf8 and "SMTPUTF8" not in extensions:
            raise _SessionError(
                553,
                "5.6.7",
                f"{self.peer} does not offer SMTPUTF8, needed by this message",
                polite=True,
            )

    async def _transaction(self, extensions: dict[str, str]) -> None:
        """MAIL, RCPT for each recipient, DATA and the message."""
        assert self._connection is not None
        connection = self._connection
        mail = f"MAIL FROM:<{self._sender}>"
        if "SIZE" in extensions:
            mail += f" SIZE={self._size}"
        if self._eight_bit:
            mail += " BODY=8BITMIME"
        if self._smtputf8:
            mail += " SMTPUTF8"
        pending = self._unanswered()
        rcpts = [f"RCPT TO:<{self._recipients[i]}>" for i in pending]

        # With PIPELINING (RFC 2920) the envelope goes in one segment and the
        # replies are read in order; without it, one command at a time.
        pipelining = "PIPELINING" in extensions
        connection.send([mail, *rcpts] if pipelining else [mail])
        reply = await self._read("MAIL FROM")
        if not reply.positive:
            if pipelining and reply.negative:
                await self._skip_replies(len(rcpts))
            raise self._refusal(reply, "MAIL FROM")

        accepted = []
        for index, rcpt in zip(pending, rcpts, strict=True):
            if not pipelining:
                connection.send([rcpt])
            reply = await self._read("RCPT TO")
            if reply.positive and self._file is None:
                # A recipient check (verify): the RCPT reply is the answer.
                self._answer(index, reply)
            elif reply.positive:
                accepted.append(index)
            elif reply.negative:
                self._answer(index, reply)
            else:
                raise self._refusal(reply, "RCPT TO")
        if not accepted:
            return

        connection.send(["DATA"])
        reply = await self._read("DATA")
        if reply.code != 354:
            if not reply.negative:
                raise self._refusal(reply, "DATA")
            for index in accepted:
                self._answer(index, reply)
            return
        # Lines over 998 octets (RFC 5321 section 4.5.3.1.6) go out as
        # stored: the message is made fit for transport before it is queued.
        await connection.send_body(self._file)
        # TODO(RFC 5321 section 4.5.3.2): one timeout serves every reply; the
        # RFC suggests 10 minutes for this one, 5 for most others.
        reply = await self._read("the end of data")
        if not (reply.positive or reply.negative):
            raise self._refusal(reply, "the end of data")
        for index in accepted:
            self._answer(index, reply)

    async def _skip_replies(self, count: int) -> None:
        """Read the replies to pipelined RCPTs that a refused MAIL made moot."""
        assert self._connection is not None
        try:
            for _ in range(count):
                await self._connection.read_reply("RCPT TO")
        except _SessionError:
            pass

    async def _quit(self) -> None:
        """Say QUIT and wait briefly for the answer, which changes nothing."""
        connection = self._connection
        if connection is None:
            return
        connection.send(["QUIT"])
        try:
            await connection.read_reply("QUIT", timeout=min(QUIT_WAIT, self._timeout))
        except _SessionError:
            pass

    # Results.

    def _unanswered(self) -> list[int]:
        return [i for i, result in enumerate(self._results) if result is None]

    def _answer(self, index: int, reply: _Reply) -> None:
        self._results[index] = RecipientOutcome(
            self._recipients[index], reply.code, reply.enhanced, reply.text
        )

    def _answer_all(self, code: int, status: str, text: str) -> None:
        for index in self._unanswered():
            self._results[index] = RecipientOutcome(
                self._recipients[index], code, status, text
            )
