"""Reading the DATA stream: find its end, unstuff dots, judge every line.

Only a line holding a single dot (``CRLF.CRLF``) ends the message.  Bare CR
or LF, an overlong line and an oversized message do not end anything: they
are noted, the rest of the message is read and thrown away, and the caller
refuses it once its end has come.  Nothing in a body ever runs as a command.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["BodyReader"]

_CRLF = b"\r\n"
_END_AT_START = b".\r\n"
_END = b"\r\n.\r\n"
# The longest line SMTP may carry (RFC 5321 4.5.3.1.6); longer ones are
# accepted up to max_line, and re-encoded before the message is sent on.
TRANSPORT_LINE = 998
# More Received lines than this: a mail loop (RFC 5321 section 6.3).
MAX_HOPS = 50


class BodyReader:
    """Consumes DATA bytes and hands the unstuffed message to ``write``.

    ``feed`` returns ``None`` while the end is not reached, then the bytes
    that followed the end (the next commands of a pipelining client).
    After ``feed`` has found the end, ``problem`` is ``None`` for a good
    message, else one of ``"size"``, ``"line"`` or ``"newline"``.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        *,
        max_size: int,
        max_line: int,
        max_hops: int = MAX_HOPS,
    ) -> None:
        self._write = write
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.too_big = False
        self.line_too_long = False
        self.bare_newline = False
        # Received lines in the header section: a loop adds one per pass.
        self.max_hops = max_hops
        self.received_count = 0
        self._in_headers = True
        # Known only once it passes TRANSPORT_LINE: lines up to it are fine.
        self.longest_line = 0
        self._partial = b""

    @property
    def problem(self) -> str | None:
        if self.too_big:
            return "size"
        if self.received_count > self.max_hops:
            return "loop"
        if self.line_too_long:
            return "line"
        if self.bare_newline:
            return "newline"
        return None

    def feed(self, data: bytes) -> bytes | None:
        # _partial always starts at the beginning of a line, so a dot line
        # can be recognised at the start of buf as well as after a CRLF.
        buf = self._partial + data if self._partial else data
        if buf.startswith(_END_AT_START):
            self._partial = b""
            return buf[3:]
        end = buf.find(_END)
        if end >= 0:
            self._take(buf[: end + 2])
            self._partial = b""
            return buf[end + 5 :]
        last = buf.rfind(_CRLF)
        if last >= 0:
            self._take(buf[: last + 2])
            rest = buf[last + 2 :]
        else:
            rest = buf
        if len(rest) > self.max_line + 1:
            # A line this long is refused anyway: keep only what can still
            # matter, its first octet (not a dot line) and a trailing CR.
            self.line_too_long = True
            rest = b"x" + rest[-1:]
        self._partial = rest
        return None

    def _take(self, lines: bytes) -> None:
        """Check and pass on complete lines, each ending in CRLF."""
        if self._in_headers:
            self._count_hops(lines)
        crlf = lines.count(_CRLF)
        if lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
            self.bare_newline = True
        if lines.startswith(b".") or b"\r\n." in lines:
            lines = (_CRLF + lines).replace(b"\r\n.", _CRLF)[2:]
        if len(lines) - 2 * crlf > min(self.max_line, TRANSPORT_LINE):
            longest = max(map(len, lines.split(_CRLF)))
            self.longest_line = max(self.longest_line, longest)
            if longest > self.max_line:
                self.line_too_long = True
        self.size += len(lines)
        if self.size > self.max_size:
            self.too_big = True
        if self.problem is None:
            self._write(lines)

    def _count_hops(self, lines: bytes) -> None:
        # Only the header section matters: split no further than its end.
        end = lines.find(b"\r\n\r\n")
        if end >= 0:
            lines = lines[: end + 4]
        for line in lines.split(_CRLF):
            if not line:
                # The blank line ends the header section (the split also
                # yields one after the last CRLF: only a real one counts).
                if lines.find(b"\r\n\r\n") >= 0 or lines.startswith(_CRLF):
                    self._in_headers = False
                return
            if line[:9].lower() == b"received:":
                self.received_count += 1
