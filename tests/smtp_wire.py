"""A raw SMTP client for tests that must send exact bytes and read exact replies."""

from __future__ import annotations

import re
import socket
import ssl

_LAST_LINE = re.compile(rb"^\d{3} [^\r\n]*\r\n", re.M)


class Wire:
    """Writes bytes as given and reads whole replies (multi-line included)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """The next complete reply, with its CRLFs."""
        while True:
            match = _LAST_LINE.search(self.buffer)
            if match:
                end = match.end()
                reply, self.buffer = self.buffer[:end], self.buffer[end:]
                return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """Whether the server has closed the connection (after any data)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def start_tls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()
