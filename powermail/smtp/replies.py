"""Every SMTP reply PowerMail sends, with its enhanced status code.

Replies are named constants so that policy code and tests speak of the same
thing.  RFC 2034 puts an enhanced code on every reply except the greeting and
the EHLO/HELO answer; ``Reply.status`` is empty for those.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Reply", "SmtpError"]


@dataclass(frozen=True)
class Reply:
    """One reply: ``code`` 250, ``status`` "2.0.0", ``text`` (may hold lines)."""

    code: int
    status: str
    text: str

    def format(self, **fields: object) -> Reply:
        """A copy whose text has ``{name}`` fields filled in."""
        return Reply(self.code, self.status, self.text.format(**fields))

    def to_bytes(self) -> bytes:
        lines = self.text.split("\n")
        prefix = f"{self.status} " if self.status else ""
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def is_error(self) -> bool:
        return self.code >= 400


class SmtpError(Exception):
    """A failure that carries the reply to send for it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.status} {reply.text}")
        self.reply = reply


# Session
GREETING = Reply(220, "", "{hostname} ESMTP PowerMail")
BYE = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
QUEUED = Reply(250, "2.0.0", "OK: message {msg_id} stored")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
HELP = Reply(
    214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT STARTTLS"
)
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message for it")

# Temporary failures
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "{hostname} Idle timeout, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "{hostname} Session too long, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Too many connections, try later")
TOO_MANY_FROM_CLIENT = Reply(
    421, "4.7.0", "{hostname} Too many connections from your address, try later"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} Too many errors, closing connection")
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary local problem, try again later")
DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
UNVERIFIED = Reply(450, "4.1.1", "Cannot verify {address} now, try again later")

# Permanent failures: syntax and sequence
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognised")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (limit {limit} octets)")
BAD_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
CONTROL_CHARACTERS = Reply(500, "5.5.2", "Command contains a control character")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: {verb} hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_NO_ARGUMENT = Reply(501, "5.5.4", "Syntax: {verb} takes no argument")
SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax: {reason}")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax: {reason}")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad {name} parameter value")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "{verb} not implemented")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
NEED_MAIL_BEFORE_DATA = Reply(503, "5.5.1", "Need MAIL before DATA")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter {name}")
PARAMETER_NEEDS_EHLO = Reply(555, "5.5.4", "Parameters need EHLO, not HELO")

# Permanent failures: policy and content
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here: {address}")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: {address}")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
SIZE_DECLARED_TOO_BIG = Reply(
    552, "5.3.4", "Message size exceeds the limit of {limit} octets"
)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message exceeds the limit of {limit} octets")
MAIL_LOOP = Reply(554, "5.4.6", "Too many hops ({count} Received lines): mail loop")
BARE_NEWLINE = Reply(
    554, "5.6.0", "Message refused: bare CR or LF, lines must end in CRLF"
)
BODY_LINE_TOO_LONG = Reply(
    554, "5.6.0", "Message refused: a line is longer than {limit} octets"
)
