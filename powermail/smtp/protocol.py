"""The ESMTP server protocol (RFC 5321) with the extensions PowerMail offers.

Twisted's ``smtp.ESMTP`` is not used: its line handling lets a long line in
DATA switch back to command mode, it answers pipelined commands out of order
while a check is pending, keeps commands pipelined behind STARTTLS, refuses
UTF-8 addresses and offers neither NOOP nor VRFY (see docs/architecture.md).
This protocol reads the byte stream itself, handles one command at a time
and holds the next one while a Deferred is pending, so replies always come
in order.  Decisions are the policy's (``smtp.mx``); this module owns only
syntax, sequence and limits.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from powermail.address import AddressError, parse_path
from powermail.smtp import replies
from powermail.smtp.data import TRANSPORT_LINE, BodyReader
from powermail.smtp.replies import Reply, SmtpError
from powermail.smtp.session import Envelope, Session
from powermail.smtp.trace import new_message_id, received_header, return_path_header

__all__ = ["SmtpFactory", "SmtpLimits", "SmtpServerProtocol", "reply_for_failure"]

_log = Logger()

_CRLF = b"\r\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Seconds a closing connection may take to send its last reply.
CLOSE_GRACE = 10
# Octets read ahead while a command waits for its answer (pipelining).
PAUSED_BUFFER_LIMIT = 64 * 1024
_EXTENSIONS_WITHOUT_TLS = (
    "PIPELINING",
    "SIZE {size}",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "HELP",
)


@dataclass(frozen=True)
class SmtpLimits:
    """The limits of one listener; see ``config._schema`` for defaults."""

    max_message_size: int
    max_recipients: int
    max_command_line: int
    max_body_line: int
    max_errors: int
    max_connections: int
    max_connections_per_client: int
    idle_timeout: int
    session_timeout: int


def reply_for_failure(failure: Failure, *, msg_id: str | None = None) -> Reply:
    """Turn any failure into the reply to send; unexpected ones are logged.

    The client learns nothing of an unexpected error beyond a 451.
    """
    if failure.check(SmtpError):
        return failure.value.reply
    if failure.check(OSError) and failure.value.errno in (errno.ENOSPC, errno.EDQUOT):
        _log.error(
            "disk full storing {msg_id}: {error}", msg_id=msg_id, error=failure.value
        )
        return replies.DISK_FULL
    _log.failure("unexpected error for {msg_id}", failure, msg_id=msg_id)
    return replies.TEMPORARY_FAILURE


class SmtpServerProtocol(protocol.Protocol):
    """One ESMTP session.  Input is a byte buffer; modes: command, data."""

    def __init__(self, factory: SmtpFactory, peer_ip: str, peer_port: int) -> None:
        self.factory = factory
        self.limits = factory.limits
        self.session = Session(peer_ip, peer_port)
        self.envelope: Envelope | None = None
        self._buffer = b""
        self._paused = False
        self._processing = False
        self._closed = False
        self._discarding_line = False
        self._body: BodyReader | None = None
        self._sink: Any = None
        self._msg_id: str | None = None
        self._idle_timer: Any = None
        self._session_timer: Any = None
        self._abort_timer: Any = None
        # Why input is not being read: "work" (a reply is pending), "output"
        # (the client is not reading its replies).
        self._holds: set[str] = set()
        self._discard_input = False

    # Twisted's Protocol interface.

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        # As a producer of replies, the session is told when its client stops
        # reading; it then stops reading too, so nothing piles up in memory.
        self.transport.registerProducer(self, True)
        refusal = self.factory.admit(self)
        if refusal is not None:
            refusal = refusal.format(hostname=self.factory.hostname)
            _log.warn(
                "refused connection from {peer}: {code} {status} {text}",
                peer=self.session.peer,
                code=refusal.code,
                status=refusal.status,
                text=refusal.text,
            )
            self._send(refusal)
            self._close()
            return
        clock = self.factory.clock
        self._idle_timer = clock.callLater(
            self.limits.idle_timeout, self._timeout, replies.IDLE_TIMEOUT
        )
        self._session_timer = clock.callLater(
            self.limits.session_timeout, self._timeout, replies.SESSION_TIMEOUT
        )
        self._send(replies.GREETING.format(hostname=self.factory.hostname))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._closed:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.limits.idle_timeout)
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self._closed = True
        self._cancel_timers()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        if self._body is not None and self._sink is not None:
            # The client went away inside DATA: nothing was acknowledged.
            self._sink.abort()
            self._sink = None
            _log.info(
                "connection lost in DATA for {msg_id} from {peer}",
                msg_id=self._msg_id,
                peer=self.session.peer,
            )
        self.factory.release(self)

    # IPushProducer, driven by the transport's write buffer.

    def pauseProducing(self) -> None:  # noqa: N802
        self._hold_input("output")

    def resumeProducing(self) -> None:  # noqa: N802
        self._release_input("output")

    def stopProducing(self) -> None:  # noqa: N802
        self._closed = True

    def _hold_input(self, reason: str) -> None:
        if not self._holds and not self._closed:
            self.transport.pauseProducing()
        self._holds.add(reason)

    def _release_input(self, reason: str) -> None:
        self._holds.discard(reason)
        if self._holds or self._closed:
            return
        self.transport.resumeProducing()
        self._process()

    # Input handling.

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False

    def _process_buffer(self) -> None:
        # Lines are taken at an offset, and the buffer is cut once at the
        # end, so a long burst of pipelined commands costs linear time.
        buffer = self._buffer
        start = 0
        limit = self.limits.max_command_line
        while start < len(buffer) and not self._paused and not self._closed:
            if "output" in self._holds:
                break
            if self._body is not None:
                rest = self._body.feed(buffer[start:] if start else buffer)
                buffer, start = b"", 0
                if rest is None:
                    break
                buffer = rest
                self._end_of_data()
                continue
            end = buffer.find(_CRLF, start)
            if end < 0:
                if len(buffer) - start > limit:
                    # Never buffer a line without end: drop it, keep a CR.
                    self._discarding_line = True
                    buffer, start = buffer[-1:], 0
                break
            line = buffer[start:end]
            start = end + 2
            if self._discarding_line or len(line) + 2 > limit:
                self._discarding_line = False
                self._answer(replies.LINE_TOO_LONG.format(limit=limit), "line")
                continue
            self._command(line)
            if self._discard_input:
                # Whatever the client sent behind STARTTLS was sent in the
                # clear and must not be taken as coming through TLS
                # (CVE-2011-0411).
                self._discard_input = False
                if len(buffer) > start:
                    _log.warn(
                        "discarded {size} octets pipelined behind STARTTLS from {peer}",
                        size=len(buffer) - start,
                        peer=self.session.peer,
                    )
                buffer, start = b"", 0
        self._buffer = b"" if self._closed else (buffer[start:] if start else buffer)
        if self._paused and len(self._buffer) > PAUSED_BUFFER_LIMIT:
            # A command waits for its answer and the client keeps sending:
            # stop reading, so the rest stays in the kernel's buffers.
            self._hold_input("work")

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._answer(replies.BAD_UTF8, "?")
            return
        if _CONTROL.search(text):
            # A bare CR or LF, or any other control character, could end up
            # in a header, a reply or a log line.
            self._answer(replies.CONTROL_CHARACTERS, "?")
            return
        verb, _, argument = text.partition(" ")
        handler = None
        # ASCII first: Unicode upper-casing turns "ſTARTTLS" into "STARTTLS".
        if verb.isascii() and verb.isalpha():
            verb = verb.upper()
            handler = getattr(self, f"do_{verb}", None)
        if handler is None:
            self._answer(replies.UNKNOWN_COMMAND, verb)
            return
        try:
            result = handler(argument.strip(" "))
        except SmtpError as exc:
            self._answer(exc.reply, verb)
            return
        if isinstance(result, defer.Deferred):
            self._paused = True
            result.addErrback(reply_for_failure)
            result.addCallback(self._answer_and_resume, verb)
        elif result is not None:
            self._answer(result, verb)

    def _answer_and_resume(self, reply: Reply, verb: str) -> None:
        self._paused = False
        if self._closed:
            return
        self._answer(reply, verb)
        if "work" in self._holds:
            self._release_input("work")
        else:
            self._process()

    def _answer(self, reply: Reply, verb: str) -> None:
        self._send(reply)
        # A recipient over the limit is the client's cue to send the rest
        # in another transaction, not a fault to count.
        if (
            not reply.is_error
            or verb == "DATA-END"
            or reply is replies.TOO_MANY_RECIPIENTS
        ):
            return
        _log.warn(
            "refused {verb} from {peer}: {code} {status} {text}",
            verb=verb,
            peer=self.session.peer,
            code=reply.code,
            status=reply.status,
            text=reply.text,
        )
        self.session.errors += 1
        if self.session.errors >= self.limits.max_errors and not self._closed:
            self._send(replies.TOO_MANY_ERRORS.format(hostname=self.factory.hostname))
            self._close()

    def _send(self, reply: Reply) -> None:
        if not self._closed:
            self.transport.write(reply.to_bytes())

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._session_timer):
            if timer is not None and timer.active():
                timer.cancel()

    def _close(self) -> None:
        """Close after the last reply is sent, or cut after a grace period.

        A client that does not read (or stalls a TLS handshake) would keep a
        gracefully closing connection, and its slot, for ever.
        """
        self._closed = True
        self._buffer = b""
        self._cancel_timers()
        # TLS sends its close_notify and closes only once no producer is
        # registered; with one it would wait for the grace period.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort_timer = self.factory.clock.callLater(
            CLOSE_GRACE, self.transport.abortConnection
        )

    def _timeout(self, reply: Reply) -> None:
        reply = reply.format(hostname=self.factory.hostname)
        _log.info("{peer}: {text}", peer=self.session.peer, text=reply.text)
        if self._sink is not None and self._body is not None:
            self._sink.abort()
            self._sink = None
        self._send(reply)
        self._close()

    # Commands.

    def do_EHLO(self, argument: str) -> Reply:  # noqa: N802
        return self._greet(argument, esmtp=True)

    def do_HELO(self, argument: str) -> Reply:  # noqa: N802
        return self._greet(argument, esmtp=False)

    def _greet(self, argument: str, *, esmtp: bool) -> Reply:
        verb = "EHLO" if esmtp else "HELO"
        # The name goes into the Received header: printable ASCII only.
        if (
            not argument
            or " " in argument
            or len(argument) > 255
            or not argument.isascii()
            or not argument.isprintable()
        ):
            return replies.SYNTAX_HELO.format(verb=verb)
        self.session.helo = argument
        self.session.esmtp = esmtp
        self.envelope = None
        hostname = self.factory.hostname
        if not esmtp:
            return Reply(250, "", hostname)
        lines = [f"{hostname} Hello {argument} [{self.session.peer_ip}]"]
        lines += [
            x.format(size=self.limits.max_message_size) for x in _EXTENSIONS_WITHOUT_TLS
        ]
        if not self.session.tls and self.factory.tls_options is not None:
            lines.insert(-1, "STARTTLS")
        return Reply(250, "", "\n".join(lines))

    def do_STARTTLS(self, argument: str) -> Reply | None:  # noqa: N802
        if argument:
            return replies.SYNTAX_NO_ARGUMENT.format(verb="STARTTLS")
        if self.session.tls:
            return replies.ALREADY_TLS
        if self.factory.tls_options is None:
            return replies.TLS_UNAVAILABLE
        self._send(replies.START_TLS)
        self._discard_input = True
        self.transport.startTLS(self.factory.tls_options)
        self.session.tls = True
        self.session.helo = None
        self.session.esmtp = False
        self.envelope = None
        return None

    def do_NOOP(self, argument: str) -> Reply:  # noqa: N802
        return replies.OK

    def do_RSET(self, argument: str) -> Reply:  # noqa: N802
        if argument:
            return replies.SYNTAX_NO_ARGUMENT.format(verb="RSET")
        self.envelope = None
        return replies.OK

    def do_HELP(self, argument: str) -> Reply:  # noqa: N802
        return replies.HELP

    def do_VRFY(self, argument: str) -> Reply:  # noqa: N802
        if not argument:
            return replies.SYNTAX_VRFY
        return replies.VRFY

    def do_EXPN(self, argument: str) -> Reply:  # noqa: N802
        return replies.NOT_IMPLEMENTED.format(verb="EXPN")

    def do_QUIT(self, argument: str) -> None:  # noqa: N802
        self._send(replies.BYE)
        self._close()

    def do_MAIL(self, argument: str) -> Reply | defer.Deferred:  # noqa: N802
        if self.session.helo is None:
            return replies.NEED_HELO
        if self.envelope is not None:
            return replies.NESTED_MAIL
        path, params = _split_path(argument, "FROM:")
        if path is None:
            return replies.SYNTAX_MAIL
        if params and not self.session.esmtp:
            return replies.PARAMETER_NEEDS_EHLO
        envelope = Envelope(sender=None)
        for name, value in params.items():
            if name == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()):
                    return replies.BAD_PARAMETER.format(name="SIZE")
                envelope.declared_size = int(value)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_PARAMETER.format(name="BODY")
                envelope.body = value.upper()
            elif name == "SMTPUTF8":
                if value is not None:
                    return replies.BAD_PARAMETER.format(name="SMTPUTF8")
                envelope.smtputf8 = True
            else:
                return replies.UNKNOWN_PARAMETER.format(name=name)
        if not envelope.smtputf8 and not argument.isascii():
            return replies.NEED_SMTPUTF8
        try:
            envelope.sender = parse_path(path, allow_utf8=True, allow_null=True)
        except AddressError as exc:
            return replies.BAD_SENDER_SYNTAX.format(reason=exc.reason)
        if envelope.sender is not None and envelope.sender.domain is None:
            return replies.BAD_SENDER_SYNTAX.format(reason="address has no domain")
        limit = self.limits.max_message_size
        if envelope.declared_size is not None and envelope.declared_size > limit:
            return replies.SIZE_DECLARED_TOO_BIG.format(limit=limit)
        d = defer.maybeDeferred(
            self.factory.policy.check_sender, self.session, envelope
        )
        d.addCallback(self._sender_accepted, envelope)
        return d

    def _sender_accepted(self, _: object, envelope: Envelope) -> Reply:
        self.envelope = envelope
        return replies.SENDER_OK

    def do_RCPT(self, argument: str) -> Reply | defer.Deferred:  # noqa: N802
        envelope = self.envelope
        if envelope is None:
            return replies.NEED_MAIL
        path, params = _split_path(argument, "TO:")
        if path is None:
            return replies.SYNTAX_RCPT
        if params:
            return replies.UNKNOWN_PARAMETER.format(name=next(iter(params)))
        if not envelope.smtputf8 and not argument.isascii():
            envelope.refused_recipients += 1
            return replies.NEED_SMTPUTF8
        try:
            address = parse_path(path, allow_utf8=True, allow_null=False)
        except AddressError as exc:
            envelope.refused_recipients += 1
            if exc.routing:
                return replies.RELAY_DENIED.format(address=path[1:-1])
            return replies.BAD_RECIPIENT_SYNTAX.format(reason=exc.reason)
        if len(envelope.recipients) >= self.limits.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        d = defer.maybeDeferred(
            self.factory.policy.check_recipient, self.session, envelope, address
        )
        d.addCallbacks(
            self._recipient_accepted,
            self._recipient_refused,
            (envelope,),
            None,
            (envelope,),
        )
        return d

    def _recipient_accepted(self, recipient: Any, envelope: Envelope) -> Reply:
        if envelope is self.envelope:
            envelope.recipients.append(recipient)
        return replies.RECIPIENT_OK

    def _recipient_refused(self, failure: Failure, envelope: Envelope) -> Failure:
        envelope.refused_recipients += 1
        return failure

    def do_DATA(self, argument: str) -> Reply | None:  # noqa: N802
        if argument:
            return replies.SYNTAX_NO_ARGUMENT.format(verb="DATA")
        envelope = self.envelope
        if envelope is None:
            return replies.NEED_MAIL_BEFORE_DATA
        if not envelope.recipients:
            return (
                replies.NO_VALID_RECIPIENTS
                if envelope.refused_recipients
                else replies.NEED_RCPT
            )
        self._msg_id = new_message_id()
        self._sink = self.factory.policy.begin_message(
            self.session,
            envelope,
            msg_id=self._msg_id,
            return_path=return_path_header(
                str(envelope.sender) if envelope.sender else None
            ),
            received=self._received_header(envelope),
        )
        self._body = BodyReader(
            self._sink.write,
            max_size=self.limits.max_message_size,
            max_line=self.limits.max_body_line,
        )
        self._send(replies.START_DATA)
        return None

    def _received_header(self, envelope: Envelope) -> bytes:
        session = self.session
        kind = (
            "UTF8SMTP" if envelope.smtputf8 else ("ESMTP" if session.esmtp else "SMTP")
        )
        if session.tls:
            kind += "S"
        recipients = envelope.recipients
        return received_header(
            helo=session.helo or "unknown",
            peer_ip=session.peer_ip,
            hostname=self.factory.hostname,
            protocol=kind,
            msg_id=self._msg_id or "",
            recipient=str(recipients[0].address) if len(recipients) == 1 else None,
        )

    def _end_of_data(self) -> None:
        body, sink, envelope, msg_id = (
            self._body,
            self._sink,
            self.envelope,
            self._msg_id,
        )
        self._body = None
        self._sink = None
        self.envelope = None
        assert body is not None and sink is not None and envelope is not None
        problem = body.problem
        if problem is not None:
            sink.abort()
            reply = {
                "size": replies.MESSAGE_TOO_BIG.format(
                    limit=self.limits.max_message_size
                ),
                "line": replies.BODY_LINE_TOO_LONG.format(
                    limit=self.limits.max_body_line
                ),
                "newline": replies.BARE_NEWLINE,
                "loop": replies.MAIL_LOOP.format(count=body.received_count),
            }[problem]
            _log.warn(
                "refused message {msg_id} from {peer}: {code} {status} {text}",
                msg_id=msg_id,
                peer=self.session.peer,
                code=reply.code,
                status=reply.status,
                text=reply.text,
            )
            self._send(reply)
            return
        self._paused = True
        d = sink.commit(long_lines=body.longest_line > TRANSPORT_LINE)
        d.addCallback(self._stored, envelope, msg_id, body.size)
        d.addErrback(reply_for_failure, msg_id=msg_id)
        d.addCallback(self._answer_and_resume, "DATA-END")

    def _stored(self, _: object, envelope: Envelope, msg_id: str, size: int) -> Reply:
        self.session.messages += 1
        _log.info(
            "accepted {msg_id} from <{sender}> for {rcpts} ({size} octets) peer {peer}",
            msg_id=msg_id,
            sender=str(envelope.sender or ""),
            rcpts=",".join(str(r.address) for r in envelope.recipients),
            size=size,
            peer=self.session.peer,
        )
        return replies.QUEUED.format(msg_id=msg_id)


def _split_path(
    argument: str, keyword: str
) -> tuple[str | None, dict[str, str | None]]:
    """Split ``FROM:<path> PARAM=VALUE ...``; ``None`` for a malformed one.

    A space after the colon is tolerated, as most servers do; a path without
    angle brackets is not.
    """
    if argument[: len(keyword)].upper() != keyword:
        return None, {}
    rest = argument[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        return None, {}
    in_quotes = False
    escaped = False
    end = -1
    for index, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            end = index
            break
    if end < 0:
        return None, {}
    path, tail = rest[: end + 1], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        return None, {}
    params: dict[str, str | None] = {}
    for item in tail.split():
        name, sep, value = item.partition("=")
        name = name.upper()
        if not name or name in params:
            return None, {}
        params[name] = value if sep else None
    return path, params


class SmtpFactory(protocol.Factory):
    """Builds sessions for one listener and enforces connection limits."""

    def __init__(
        self,
        *,
        policy: Any,
        limits: SmtpLimits,
        hostname: Callable[[], str] | str,
        clock: IReactorTime,
        tls_options: Any = None,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self._hostname = hostname
        self.clock = clock
        self.tls_options = tls_options
        self.noisy = False
        self.sessions: set[SmtpServerProtocol] = set()
        self._per_client: dict[str, int] = {}

    @property
    def hostname(self) -> str:
        return self._hostname() if callable(self._hostname) else self._hostname

    def buildProtocol(self, addr: Any) -> SmtpServerProtocol:  # noqa: N802
        host = getattr(addr, "host", "0.0.0.0")
        port = getattr(addr, "port", 0)
        return SmtpServerProtocol(self, host, port)

    def admit(self, session: SmtpServerProtocol) -> Reply | None:
        """Count a new session in, or say why it is refused."""
        ip = session.session.peer_ip
        if len(self.sessions) >= self.limits.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self._per_client.get(ip, 0) >= self.limits.max_connections_per_client:
            return replies.TOO_MANY_FROM_CLIENT
        self.sessions.add(session)
        self._per_client[ip] = self._per_client.get(ip, 0) + 1
        return None

    def release(self, session: SmtpServerProtocol) -> None:
        """Count a finished session out."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        ip = session.session.peer_ip
        left = self._per_client.get(ip, 1) - 1
        if left:
            self._per_client[ip] = left
        else:
            self._per_client.pop(ip, None)
