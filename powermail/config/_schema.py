"""Every configuration key PowerMail knows, with its type and default.

This table is the one place where defaults are declared: the loader, the
documentation of the limits and the embedded default all follow it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DOMAIN_KEYS",
    "Key",
    "MAILBOX_KEYS",
    "MAILBOX_MODES",
    "NEXT_HOP_TLS",
    "SECTIONS",
]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Key:
    """One setting: ``kind`` is int, ints, str, bool, path, listen or servers.

    ``default`` may be a callable, evaluated when a file leaves the key out.
    """

    kind: str
    default: Any
    doc: str
    minimum: int | None = None
    maximum: int | None = None

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


SECTIONS: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key("str", _fqdn, "name used in greetings and trace headers"),
        "data_dir": Key("path", "var", "where mail and server state live"),
        "recipient_delimiter": Key(
            "str", "+", "alice+tag@ reaches alice@; empty to switch off"
        ),
        "reload_interval": Key(
            "int", 1, "seconds between checks of this file for changes", 1, 5
        ),
    },
    "tls": {
        "certificate": Key("path", "", "PEM certificate chain; empty: self-signed"),
        "private_key": Key("path", "", "PEM private key; empty: self-signed"),
        "ca_file": Key(
            "path", "", "CA certificates for verified next hops; empty: the system's"
        ),
    },
    "dns": {
        "servers": Key(
            "servers", [], "DNS servers 'ip' or 'ip:port'; empty: the system's"
        ),
    },
    "queue": {
        "retry_delays": Key(
            "ints",
            [60, 300, 900, 1800, 3600, 7200, 14400],
            "seconds before each retry; the last one repeats",
            1,
            86400,
        ),
        "max_age": Key("int", 5 * 86400, "seconds before a message is given up", 60),
        "delay_warning": Key(
            "int", 4 * 3600, "seconds before the sender is told of a delay; 0: never", 0
        ),
        "smtp_port": Key(
            "int", 25, "port of next hops named without one (MX lookups)", 1, 65535
        ),
        "max_per_destination": Key(
            "int", 10, "sessions at once to one next hop", 1, 1000
        ),
        "connect_timeout": Key("int", 30, "seconds to connect to a next hop", 1, 600),
        "command_timeout": Key(
            "int", 300, "seconds to wait for a next hop's reply", 1, 3600
        ),
    },
    "mx": {
        "listen": Key("listen", ["127.0.0.1:25"], "addresses of the MX listener"),
        "max_message_size": Key("int", 50 * MiB, "octets, advertised as SIZE", 1024),
        "max_recipients": Key("int", 100, "recipients per message", 1, 100000),
        "max_command_line": Key(
            "int", 2048, "octets in a command line, CRLF included", 512, 65536
        ),
        "max_body_line": Key(
            "int", 65536, "octets in a message line, CRLF excluded", 998, 16 * MiB
        ),
        "max_errors": Key("int", 20, "refused commands before hanging up", 1, 1000),
        "max_connections": Key("int", 1000, "sessions at once", 1, 100000),
        "max_connections_per_client": Key(
            "int", 50, "sessions at once from one address", 1, 100000
        ),
        "idle_timeout": Key("int", 300, "seconds without a command", 1, 86400),
        "session_timeout": Key("int", 1800, "seconds for a whole session", 1, 604800),
    },
    "imap": {
        "listen": Key(
            "listen", ["127.0.0.1:143"], "addresses of the IMAP listener (STARTTLS)"
        ),
        "tls_listen": Key(
            "listen", ["127.0.0.1:993"], "addresses of the IMAPS listener (TLS)"
        ),
        "loopback_plaintext": Key(
            "bool", True, "allow LOGIN before TLS from loopback clients"
        ),
        "max_literal_size": Key(
            "int", 50 * MiB, "octets in one literal (APPEND message)", 1024
        ),
        "max_command_line": Key(
            "int", 65536, "octets in a command outside its literals", 1024, 16 * MiB
        ),
        "max_errors": Key(
            "int", 20, "bad commands in a row before hanging up", 1, 1000
        ),
        "max_login_failures": Key(
            "int", 3, "failed logins in a session before hanging up", 1, 100
        ),
        "login_failure_delay": Key(
            "int", 2, "seconds a failed login waits for its answer", 0, 60
        ),
        "max_connections": Key("int", 1000, "sessions at once", 1, 100000),
        "max_connections_per_client": Key(
            "int", 50, "sessions at once from one address", 1, 100000
        ),
        "idle_timeout": Key(
            "int", 1800, "seconds without a command (RFC 3501: 30 min)", 60, 86400
        ),
        "login_timeout": Key(
            "int", 60, "seconds a connection may take to log in", 5, 3600
        ),
    },
}

MAILBOX_MODES = ("local", "redirect")
NEXT_HOP_TLS = ("none", "opportunistic", "required")

DOMAIN_KEYS: dict[str, Key] = {
    "catch_all": Key("str", "", "mailbox that takes unknown local parts"),
}

MAILBOX_KEYS: dict[str, Key] = {
    "mode": Key("str", "local", "local: stored here; redirect: sent to next_hop"),
    "password": Key("str", "", "argon2 hash made by `powermail mailbox passwd`"),
    "next_hop": Key("str", "", "redirect: 'host', 'host:port', '[host]:port' or an IP"),
    "next_hop_tls": Key(
        "str", "opportunistic", "redirect: none, opportunistic, required"
    ),
    "verify_recipients": Key(
        "bool", False, "redirect catch-all: ask the next hop at RCPT time"
    ),
}
